"""Kernel dynamics on arrays: distance, velocity, alignment, eigenpairs, energies, KRR.

Every function takes NumPy arrays or torch tensors (any dtype, any device), converts
them to float64 NumPy arrays and returns NumPy arrays or Python floats. Definitions
and citations: ``docs/spectral.md``.

Kernel kinds are told apart by the number of axes of the array:

* ``(N1, N2)``: one scalar per pair of inputs (``trace``/``pseudo`` eNTK, NNGP kernel);
* ``(N1, N2, C)``: ``diagonal`` eNTK, Θ_cc(x_n, x_m) for each logit c;
* ``(N1, N2, C, C)``: ``full`` eNTK, Θ_cd(x_n, x_m).

Where a matrix is needed (eigenpairs, alignment, regression) a full kernel is read as
the (N1·C, N2·C) matrix whose row ``n*C + c`` is the pair (example n, logit c)
(example-major), and a diagonal kernel as the same matrix with the cross-logit blocks
set to zero: see :func:`kernel_matrix`. Targets ``Y`` of shape (N, C) then become the
vector ``vec(Y) = Y.reshape(-1)`` in the same order.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import scipy.linalg
import torch

from ._args import integer, number, one_of, positive

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "EnergyBaselines",
    "Eigenpairs",
    "KernelDistanceTrajectory",
    "KernelRegressionScores",
    "KernelRegressionSweep",
    "align_signs",
    "effective_rank",
    "eigen_energy",
    "energy_baselines",
    "kernel_angle",
    "kernel_distance",
    "kernel_distance_trajectory",
    "kernel_frobenius_norm",
    "kernel_matrix",
    "kernel_regression",
    "kernel_regression_scores",
    "kernel_regression_sweep",
    "kernel_target_alignment",
    "kernel_trace",
    "kernel_velocity",
    "nngp_kernel",
    "nystrom_extension",
    "output_energy",
    "residual_energy",
    "subspace_overlap",
    "target_energy",
    "top_eigenpairs",
]

# Relative asymmetry ||K - K^T||_F / ||K||_F above which a kernel is refused as not
# symmetric. Kernels computed in float32 are symmetric to ~1e-7; 1e-4 leaves room.
_SYMMETRY_RTOL = 1e-4


# --------------------------------------------------------------------------- helpers
def _as_float64(x: ArrayLike, name: str) -> np.ndarray:
    """Return ``x`` as a float64 NumPy array (torch tensors detached and moved to CPU)."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be real; got a complex tensor of dtype {x.dtype}.")
        x = x.detach().to(dtype=torch.float64).cpu().numpy()
    elif isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be a NumPy array or a torch tensor; got {type(x).__name__}.")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a NumPy array or a torch tensor of real numbers; "
            f"got {type(x).__name__} that does not convert to float64."
        ) from err
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; pass a finite array.")
    return arr


def _check_kernel(K: np.ndarray, name: str, square: bool) -> None:
    """Check that ``K`` is a kernel of a known kind (and square in its example axes)."""
    if K.ndim not in (2, 3, 4):
        raise ValueError(
            f"{name} must have shape (N1, N2) (trace/pseudo/NNGP kernel), (N1, N2, C) "
            f"(diagonal eNTK) or (N1, N2, C, C) (full eNTK); got shape {K.shape}."
        )
    if K.ndim == 4 and K.shape[2] != K.shape[3]:
        raise ValueError(
            f"{name} is a full kernel of shape (N1, N2, C, C) and needs its last two axes "
            f"equal; got shape {K.shape}."
        )
    if square and K.shape[0] != K.shape[1]:
        raise ValueError(
            f"{name} must be a kernel of a set with itself, with shape (N, N, ...); "
            f"got shape {K.shape}."
        )
    if min(K.shape) == 0:
        raise ValueError(f"{name} is empty (shape {K.shape}); pass a kernel with N >= 1.")


def _check_symmetric(A: np.ndarray, name: str) -> None:
    scale = np.linalg.norm(A)
    if scale > 0 and np.linalg.norm(A - A.T) > _SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{name} is not symmetric (relative asymmetry "
            f"{np.linalg.norm(A - A.T) / scale:.2e} > {_SYMMETRY_RTOL:g}); pass the kernel "
            "of a probe set with itself, K(X, X)."
        )


def _matrix_from_kernel(K: np.ndarray) -> np.ndarray:
    """Float64 kernel of any kind -> matrix; see :func:`kernel_matrix`."""
    if K.ndim == 2:
        return K
    n1, n2, c = K.shape[:3]
    if K.ndim == 3:
        K = K[:, :, :, None] * np.eye(c)[None, None, :, :]
    return K.transpose(0, 2, 1, 3).reshape(n1 * c, n2 * c)


def _targets_as_matrix(Y: ArrayLike, name: str, num_classes: Optional[int]) -> np.ndarray:
    """Targets as an (N, C) float64 matrix: one-hot for integer labels (N,), as given for (N, C)."""
    Y = _as_float64(Y, name)
    if Y.ndim == 1:
        if Y.size == 0:
            raise ValueError(f"{name} is empty; pass at least one label.")
        if np.any(Y != np.round(Y)) or np.any(Y < 0):
            raise ValueError(
                f"{name} has shape (N,) and is read as integer class labels, but holds "
                "non-integer or negative values; pass labels in 0..C-1 or an (N, C) target matrix."
            )
        labels = Y.astype(np.int64)
        n_cls = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        if labels.max() >= n_cls:
            raise ValueError(
                f"{name} holds label {int(labels.max())} but num_classes={n_cls}; "
                "labels must lie in 0..num_classes-1."
            )
        onehot = np.zeros((labels.size, n_cls))
        onehot[np.arange(labels.size), labels] = 1.0
        return onehot
    if Y.ndim == 2:
        if num_classes is not None and Y.shape[1] != num_classes:
            raise ValueError(
                f"{name} has {Y.shape[1]} columns but the kernel or num_classes says C={num_classes}."
            )
        return Y
    raise ValueError(
        f"{name} must be integer labels of shape (N,) or a target matrix of shape (N, C); "
        f"got shape {Y.shape}."
    )


def _labels_from_targets(y: np.ndarray) -> np.ndarray:
    return np.argmax(y, axis=1)


def _center_kernel(K: np.ndarray) -> np.ndarray:
    """(H ⊗ I_C) K (H ⊗ I_C), H = I - 11ᵀ/N: subtract means over the two example axes."""
    return (
        K
        - K.mean(axis=0, keepdims=True)
        - K.mean(axis=1, keepdims=True)
        + K.mean(axis=(0, 1), keepdims=True)
    )


def _target_kernel(Y: np.ndarray, ndim: int) -> np.ndarray:
    """Ideal kernel Y(x)Y(x')ᵀ reduced to the kind of a kernel with ``ndim`` axes."""
    if ndim == 2:
        return Y @ Y.T
    if ndim == 3:
        return np.einsum("nc,mc->nmc", Y, Y)
    return np.einsum("nc,md->nmcd", Y, Y)


def _cosine(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> float:
    na, nb = np.linalg.norm(a.ravel()), np.linalg.norm(b.ravel())
    if na == 0:
        raise ValueError(f"{name_a} is zero; the cosine with it is undefined.")
    if nb == 0:
        raise ValueError(f"{name_b} is zero; the cosine with it is undefined.")
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def _check_k(k: Optional[int], max_k: int, name: str = "k", owner: str = "") -> int:
    if k is None:
        return max_k
    return integer(k, name, owner, minimum=1, maximum=max_k)


# --------------------------------------------------------------------- kernel basics
def kernel_matrix(K: ArrayLike) -> np.ndarray:
    """Kernel of any kind as a float64 matrix.

    ``(N1, N2)`` is returned as is; a full kernel ``(N1, N2, C, C)`` becomes the
    ``(N1*C, N2*C)`` matrix ``M[n*C + c, m*C + d] = K[n, m, c, d]`` (example-major: row
    ``n*C + c`` is example n, logit c, the order of ``Y.reshape(-1)`` for targets
    ``Y`` of shape (N, C)); a diagonal kernel ``(N1, N2, C)`` becomes the same matrix
    with ``M[n*C + c, m*C + d] = K[n, m, c]`` if ``c == d`` and 0 otherwise.
    """
    K = _as_float64(K, "K")
    _check_kernel(K, "K", square=False)
    return _matrix_from_kernel(K)


def kernel_trace(K: ArrayLike) -> float:
    """Trace of the kernel matrix: Σ_n K[n, n] (trace kind), Σ_{n,c} K[n, n, c, c] (full),
    Σ_{n,c} K[n, n, c] (diagonal)."""
    K = _as_float64(K, "K")
    _check_kernel(K, "K", square=True)
    if K.ndim == 2:
        return float(np.trace(K))
    if K.ndim == 3:
        return float(np.einsum("nnc->", K))
    return float(np.einsum("nncc->", K))


def kernel_frobenius_norm(K: ArrayLike) -> float:
    """Frobenius norm ‖K‖_F = sqrt(Σ K²) over all entries (equals that of :func:`kernel_matrix`)."""
    K = _as_float64(K, "K")
    _check_kernel(K, "K", square=False)
    return float(np.linalg.norm(K.ravel()))


def nngp_kernel(features: ArrayLike, features2: Optional[ArrayLike] = None) -> np.ndarray:
    """Empirical NNGP (conjugate) kernel of penultimate-layer features.

    K(x, x') = φ(x)·φ(x') / d for features φ of width d (Lee et al. 2018; used for the
    NTK-vs-NNGP comparison of Lee et al. 2020). Dividing by d makes K the mean over
    units, which is what converges to the NNGP kernel E[φ(z)φ(z')] as d → ∞.
    ``features`` (N1, ...) is flattened to (N1, d); with ``features2`` (N2, ...) the
    cross kernel (N1, N2) is returned, else the (N1, N1) kernel.
    """
    f1 = _as_float64(features, "features")
    if f1.ndim < 2 or f1.shape[0] == 0:
        raise ValueError(f"features must have shape (N, d) or (N, ...) with N >= 1; got {f1.shape}.")
    f1 = f1.reshape(f1.shape[0], -1)
    if features2 is None:
        f2 = f1
    else:
        f2 = _as_float64(features2, "features2")
        if f2.ndim < 2:
            raise ValueError(f"features2 must have shape (N2, d) or (N2, ...); got {f2.shape}.")
        f2 = f2.reshape(f2.shape[0], -1)
        if f2.shape[1] != f1.shape[1]:
            raise ValueError(
                f"features has {f1.shape[1]} entries per example and features2 has "
                f"{f2.shape[1]}; pass features of the same layer."
            )
    d = f1.shape[1]
    if d == 0:
        raise ValueError("features has zero width; pass at least one feature per example.")
    return (f1 @ f2.T) / d


# ------------------------------------------------------------------ distance/velocity
def kernel_distance(K1: ArrayLike, K2: ArrayLike) -> float:
    """Kernel distance of Fort et al. (2020): S = 1 − ⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F).

    Any kind (the arrays are flattened); both must have the same shape. S is 0 for
    K2 = c·K1 (c > 0), symmetric, and in [0, 1] for PSD kernels (in [0, 2] in general).
    Computed as ‖K1/‖K1‖ − K2/‖K2‖‖² / 2, the same number without cancellation when S
    is small.
    """
    A = _as_float64(K1, "K1")
    B = _as_float64(K2, "K2")
    if A.shape != B.shape:
        raise ValueError(
            f"K1 and K2 must have the same shape (same kernel kind on the same probe); "
            f"got {A.shape} and {B.shape}."
        )
    a, b = A.ravel(), B.ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        raise ValueError(
            f"{'K1' if na == 0 else 'K2'} is the zero kernel; the kernel distance is undefined."
        )
    s = 0.5 * float(np.sum((a / na - b / nb) ** 2))
    return min(s, 2.0)


def kernel_velocity(K1: ArrayLike, K2: ArrayLike, dt_epochs: float) -> float:
    """Kernel velocity of Fort et al. (2020): v = S(K_t, K_{t+dt}) / dt, dt in epochs."""
    dt = positive(float(dt_epochs), "dt_epochs", "kernel_velocity",
                  hint="the time step between the two snapshots, in epochs")
    return kernel_distance(K1, K2) / dt


def kernel_angle(K1: ArrayLike, K2: ArrayLike) -> float:
    """The angle between two kernels as vectors, θ = arccos(⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F)), in
    radians, [0, π].

    The kernel distance is S = 1 − cos θ ≈ θ²/2: quadratic in a small kernel change, so
    S/Δt grows with Δt, while θ is linear in it. A kernel turning at a constant angular
    rate ω along a great circle has θ = ω Δt over any Δt, so θ/Δt is its speed whatever
    the spacing (along a curved path the chord angle of a long Δt falls short of the path
    length). Computed as 2 arcsin(‖K1/‖K1‖ − K2/‖K2‖‖ / 2) = 2 arcsin(√(S/2)), accurate for
    small angles, where arccos of a cosine near 1 loses its digits.
    """
    return 2.0 * float(np.arcsin(min(1.0, np.sqrt(kernel_distance(K1, K2) / 2.0))))


class KernelDistanceTrajectory(NamedTuple):
    """Per-snapshot distances; entry 0 of ``distance_to_prev`` and ``velocity`` is NaN
    (no previous snapshot)."""

    distance_to_init: np.ndarray
    distance_to_prev: np.ndarray
    velocity: np.ndarray


def kernel_distance_trajectory(
    kernels: Union[ArrayLike, Sequence[ArrayLike]], epochs: ArrayLike
) -> KernelDistanceTrajectory:
    """Distance to the first snapshot, to the previous one, and velocity, per snapshot.

    ``kernels``: a stacked array (T, ...) or a sequence of T kernels of one shape;
    ``epochs`` (T,): strictly increasing snapshot times in epochs (fractions allowed).
    distance_to_init[t] = S(K_0, K_t); distance_to_prev[t] = S(K_{t-1}, K_t);
    velocity[t] = distance_to_prev[t] / (epochs[t] − epochs[t-1]) (Fort et al. 2020).
    """
    seq = list(kernels)
    ep = _as_float64(epochs, "epochs")
    if ep.ndim != 1 or ep.size != len(seq):
        raise ValueError(
            f"epochs must have shape (T,) with T = number of kernels ({len(seq)}); got {ep.shape}."
        )
    if len(seq) == 0:
        raise ValueError("kernels is empty; pass at least one snapshot.")
    t = len(seq)
    to_init = np.empty(t)
    to_prev = np.full(t, np.nan)
    vel = np.full(t, np.nan)
    first = _as_float64(seq[0], "kernels[0]")
    prev = first
    for i in range(t):
        cur = first if i == 0 else _as_float64(seq[i], f"kernels[{i}]")
        to_init[i] = kernel_distance(first, cur)
        if i > 0:
            dt = ep[i] - ep[i - 1]
            if dt <= 0:
                raise ValueError(
                    f"epochs must be strictly increasing; epochs[{i}]={ep[i]} <= epochs[{i - 1}]={ep[i - 1]}."
                )
            to_prev[i] = kernel_distance(prev, cur)
            vel[i] = to_prev[i] / dt
        prev = cur
    return KernelDistanceTrajectory(to_init, to_prev, vel)


# ------------------------------------------------------------------------- alignment
def kernel_target_alignment(
    K: ArrayLike, Y: ArrayLike, centered: bool = False, num_classes: Optional[int] = None
) -> float:
    """Kernel-target alignment A(K, T) = ⟨K, T⟩_F / (‖K‖_F ‖T‖_F) (Cristianini et al. 2002).

    T is the ideal kernel of the targets reduced to the kind of K: Y Yᵀ for an (N, N)
    kernel, vec(Y) vec(Y)ᵀ over the NC×NC matrix for a full kernel (N, N, C, C), and its
    logit-diagonal blocks T[n, m, c] = Y[n, c] Y[m, c] for a diagonal kernel (N, N, C).
    ``Y``: integer labels (N,) (one-hot encoded) or a target matrix (N, C).

    ``centered=True``: centred alignment of Cortes et al. (2012), both K and T replaced
    by H K H with H = I − 11ᵀ/N over examples (H ⊗ I_C for full/diagonal kernels: the
    mean over examples is removed separately for each logit). Invariant to adding a
    constant vector to every example's features.
    """
    K = _as_float64(K, "K")
    _check_kernel(K, "K", square=True)
    c_kernel = K.shape[2] if K.ndim >= 3 else None
    Yt = _targets_as_matrix(Y, "Y", c_kernel if c_kernel is not None else num_classes)
    if Yt.shape[0] != K.shape[0]:
        raise ValueError(f"Y has {Yt.shape[0]} rows but K is over N={K.shape[0]} examples.")
    if centered:
        K = _center_kernel(K)
        Yt = Yt - Yt.mean(axis=0, keepdims=True)
    T = _target_kernel(Yt, K.ndim)
    what = "centred " if centered else ""
    return _cosine(K, T, f"the {what}kernel K", f"the {what}target kernel (all targets equal?)")


# ----------------------------------------------------------------------- eigenpairs
class Eigenpairs(NamedTuple):
    """Top eigenpairs, largest first: eigvals (k,), eigvecs (M, k) with orthonormal columns."""

    eigvals: np.ndarray
    eigvecs: np.ndarray


def _canonical_signs(U: np.ndarray) -> np.ndarray:
    idx = np.argmax(np.abs(U), axis=0)
    signs = np.sign(U[idx, np.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return U * signs


def top_eigenpairs(K: ArrayLike, k: Optional[int] = None) -> Eigenpairs:
    """Top-k eigenpairs of a symmetric kernel, float64, largest eigenvalue first.

    Kernels of any kind are read as the M×M matrix of :func:`kernel_matrix` (M = N, or
    N·C with row ``n*C + c`` for full/diagonal kernels). Uses
    ``scipy.linalg.eigh(..., subset_by_index=...)`` on (K + Kᵀ)/2; ``k=None`` returns all
    M pairs. Sign convention: in each eigenvector the entry of largest magnitude is
    positive (use :func:`align_signs` to follow a previous snapshot instead).
    """
    Kf = _as_float64(K, "K")
    _check_kernel(Kf, "K", square=True)
    A = _matrix_from_kernel(Kf)
    _check_symmetric(A, "K")
    A = 0.5 * (A + A.T)
    m = A.shape[0]
    k = _check_k(k, m, owner="top_eigenpairs")
    w, V = scipy.linalg.eigh(A, subset_by_index=[m - k, m - 1], check_finite=False)
    w = np.ascontiguousarray(w[::-1])
    V = _canonical_signs(np.ascontiguousarray(V[:, ::-1]))
    return Eigenpairs(w, V)


def align_signs(U: ArrayLike, U_prev: ArrayLike, method: str = "dot") -> np.ndarray:
    """Flip the signs of the columns of ``U`` to agree with a previous snapshot ``U_prev``.

    ``method="dot"``: column j is flipped when u_jᵀ u_prev_j < 0 (same number of
    columns; right when the eigenvalue order is stable). ``method="max_overlap"``:
    column j is matched to the column i of ``U_prev`` with the largest |u_jᵀ u_prev_i|
    and flipped when that overlap is negative (survives eigenvalue crossings; columns
    are not reordered). Returns a new (M, k) array.
    """
    U = _as_float64(U, "U")
    P = _as_float64(U_prev, "U_prev")
    if U.ndim != 2 or P.ndim != 2 or U.shape[0] != P.shape[0]:
        raise ValueError(
            f"U and U_prev must be (M, k) eigenvector matrices over the same M rows; "
            f"got {U.shape} and {P.shape}."
        )
    one_of(method, "method", ("dot", "max_overlap"), "align_signs")
    if method == "dot":
        if U.shape != P.shape:
            raise ValueError(
                f"method='dot' needs U and U_prev of the same shape; got {U.shape} and {P.shape} "
                "(use method='max_overlap')."
            )
        ref = np.einsum("mk,mk->k", U, P)
    else:  # "max_overlap"
        O = P.T @ U
        ref = O[np.argmax(np.abs(O), axis=0), np.arange(U.shape[1])]
    signs = np.where(ref < 0, -1.0, 1.0)
    return U * signs


def effective_rank(eigvals: ArrayLike) -> float:
    """Effective rank of Roy & Vetterli (2007): exp(H(p)), p_i = λ_i / Σ_j λ_j, H = −Σ p log p.

    Only positive eigenvalues enter (zero and rounding-negative ones are dropped). Given
    the top-k eigenvalues only, it is the effective rank of that truncated spectrum.
    """
    lam = _as_float64(eigvals, "eigvals")
    if lam.ndim != 1:
        raise ValueError(f"eigvals must be a 1-d array of eigenvalues; got shape {lam.shape}.")
    lam = lam[lam > 0]
    if lam.size == 0:
        raise ValueError("eigvals has no positive eigenvalue; the effective rank is undefined.")
    p = lam / lam.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def subspace_overlap(U1: ArrayLike, U2: ArrayLike, k: Optional[int] = None) -> float:
    """Overlap of the top-k eigenspaces: ‖U1_kᵀ U2_k‖_F² / k, in [0, 1] for orthonormal columns.

    1 when the two spans agree (whatever the rotation or signs within them), 0 when they
    are orthogonal; it equals the mean squared cosine of the principal angles.
    ``k=None`` uses all columns (both must then have the same number).
    """
    A = _as_float64(U1, "U1")
    B = _as_float64(U2, "U2")
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(
            f"U1 and U2 must be (M, k) eigenvector matrices over the same M rows; "
            f"got {A.shape} and {B.shape}."
        )
    if k is None and A.shape[1] != B.shape[1]:
        raise ValueError(
            f"U1 has {A.shape[1]} columns and U2 has {B.shape[1]}; pass k <= {min(A.shape[1], B.shape[1])}."
        )
    k = _check_k(k, min(A.shape[1], B.shape[1]), owner="subspace_overlap")
    O = A[:, :k].T @ B[:, :k]
    return float(np.sum(O * O) / k)


# --------------------------------------------------------------------------- energies
def _vector_columns(phi: np.ndarray, m: int, name: str) -> np.ndarray:
    """``phi`` as an (M, c) matrix matching U's M rows (vec(phi) for a full kernel)."""
    if phi.ndim in (1, 2) and phi.shape[0] == m:
        return phi.reshape(m, -1)
    if phi.ndim == 2 and phi.size == m:
        return phi.reshape(m, 1)
    raise ValueError(
        f"{name} has shape {phi.shape}, which matches neither the M={m} rows of U "
        f"(shape (M,) or (M, C)) nor the full-kernel vec order ((N, C) with N*C = M)."
    )


def eigen_energy(U: ArrayLike, phi: ArrayLike, ks: Optional[Sequence[int]] = None) -> np.ndarray:
    """Energy of φ in the top-k eigenvectors (Kopitkov & Indelman 2020), as a curve over k.

    E_k(φ) = ‖U_kᵀ φ‖² / ‖φ‖², k = 1..K, with U (M, K) orthonormal eigenvectors, largest
    eigenvalue first. φ of shape (M,) or (M, C) (an (N, N) kernel with C outputs: the
    energies of the columns are summed, i.e. ‖U_kᵀ φ‖_F² / ‖φ‖_F²), or (N, C) with
    N·C = M (full/diagonal kernel: φ is read as vec(φ)). Non-decreasing in k; E_M = 1
    when U holds all M eigenvectors. ``ks``: 1-based k values to return (default: all).
    """
    Uf = _as_float64(U, "U")
    if Uf.ndim != 2:
        raise ValueError(f"U must be an (M, K) eigenvector matrix; got shape {Uf.shape}.")
    P = _vector_columns(_as_float64(phi, "phi"), Uf.shape[0], "phi")
    total = float(np.sum(P * P))
    if total == 0:
        raise ValueError("phi is zero; its energy fraction is undefined.")
    coeff = Uf.T @ P
    curve = np.cumsum(np.sum(coeff * coeff, axis=1)) / total
    if ks is None:
        return curve
    idx = np.asarray([_check_k(-1 if k is None else k, Uf.shape[1], "each entry of ks", "eigen_energy") for k in ks],
                     dtype=np.int64)
    return curve[idx - 1]


def _infer_classes(U: np.ndarray, n: int, num_classes: Optional[int]) -> Optional[int]:
    m = U.shape[0]
    if m != n and m % n == 0:
        return m // n
    return num_classes


def target_energy(
    U: ArrayLike,
    Y: ArrayLike,
    ks: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
) -> np.ndarray:
    """Energy curve of the targets: :func:`eigen_energy` of the one-hot matrix of labels ``Y``
    (N,) (or of ``Y`` (N, C) as given)."""
    Uf = _as_float64(U, "U")
    Yr = _as_float64(Y, "Y")
    if Yr.ndim == 0 or Yr.shape[0] == 0:
        raise ValueError(f"Y must be labels (N,) or targets (N, C); got shape {Yr.shape}.")
    C = _infer_classes(Uf, Yr.shape[0], num_classes) if Uf.ndim == 2 else num_classes
    return eigen_energy(Uf, _targets_as_matrix(Yr, "Y", C), ks)


def output_energy(U: ArrayLike, outputs: ArrayLike, ks: Optional[Sequence[int]] = None) -> np.ndarray:
    """Energy curve of the network outputs f(X) (N, C) on the probe: :func:`eigen_energy`."""
    return eigen_energy(U, outputs, ks)


def residual_energy(
    U: ArrayLike, outputs: ArrayLike, Y: ArrayLike, ks: Optional[Sequence[int]] = None
) -> np.ndarray:
    """Energy curve of the residual f(X) − Y, with ``Y`` labels (N,) (one-hot with
    C = outputs.shape[1]) or targets (N, C)."""
    out = _as_float64(outputs, "outputs")
    if out.ndim != 2:
        raise ValueError(f"outputs must have shape (N, C); got {out.shape}.")
    Yt = _targets_as_matrix(Y, "Y", out.shape[1])
    if Yt.shape != out.shape:
        raise ValueError(f"Y gives targets of shape {Yt.shape} but outputs has shape {out.shape}.")
    return eigen_energy(U, out - Yt, ks)


class EnergyBaselines(NamedTuple):
    """Reference levels of the target energy E_k(Y) (see :func:`energy_baselines`)."""

    constant: float
    random: np.ndarray


def energy_baselines(
    Y: ArrayLike, num_rows: Optional[int] = None, k: Optional[int] = None, num_classes: Optional[int] = None
) -> EnergyBaselines:
    """What the energies of Kopitkov & Indelman (2020) are to be read against.

    * ``constant``: the share of the targets' energy in the constant direction over
      examples (one per output column), N‖ȳ‖² / ‖Y‖_F² with ȳ the column mean of Y (N, C).
      For uncentred one-hot labels it is Σ_c p_c² with p_c the class fractions, 1/C for
      balanced classes. An NTK's top eigenvector is often nearly constant, so a target
      energy near this value in the top eigenvector(s) (one for an (N, N) kernel, C for a
      full kernel) says nothing about alignment with the labels.
    * ``random``: the expected energy of any fixed vector in a uniformly random k-dimensional
      subspace of R^M, k/M for k = 1..K (M = ``num_rows``, the rows of the eigenvectors: N
      for an (N, N) kernel, N·C for a full or diagonal one; default N; K = ``k``, default M).

    ``Y``: integer labels (N,) (one-hot encoded, ``num_classes`` columns if given) or
    targets (N, C).
    """
    Yt = _targets_as_matrix(Y, "Y", num_classes)
    total = float(np.sum(Yt * Yt))
    if total == 0:
        raise ValueError("Y is zero; its energy fractions are undefined.")
    n = Yt.shape[0]
    m = n if num_rows is None else integer(num_rows, "num_rows", "energy_baselines", minimum=1)
    kk = m if k is None else integer(k, "k", "energy_baselines", minimum=1, maximum=m)
    constant = float(n * np.sum(Yt.mean(axis=0) ** 2) / total)
    return EnergyBaselines(constant, np.arange(1, kk + 1) / m)


# -------------------------------------------------------------------------- Nyström
def nystrom_extension(
    K_cross: ArrayLike,
    U: ArrayLike,
    eigvals: ArrayLike,
    min_relative_eigval: float = 1e-10,
) -> np.ndarray:
    """Nyström extension of kernel eigenvectors to new points (Williams & Seeger 2001).

    φ_j(x*) = K(x*, X) u_j / λ_j for the eigenpairs (λ_j, u_j) of K(X, X). At a probe
    point this returns u_j itself (K u_j / λ_j = u_j); Williams & Seeger's scale √N/λ_j
    differs by the constant √N. ``K_cross``: K(X*, X) of shape (N*, N), (N*, N, C) or
    (N*, N, C, C), read as in :func:`kernel_matrix`; ``U`` (M, k), ``eigvals`` (k,).
    Returns (M*, k) with M* = N* (or N*·C, row ``n*C + c``).

    Dividing by λ_j amplifies the rounding error of K(x*, X) u_j by λ_max/λ_j: an
    eigenvalue below ``min_relative_eigval``·λ_max (or ≤ 0) is refused. Kernels
    computed in float32 carry ~1e-7 relative error, so eigenfunctions with λ_j/λ_max
    below ~1e-6 are dominated by that error even when accepted.
    """
    Kc = _as_float64(K_cross, "K_cross")
    _check_kernel(Kc, "K_cross", square=False)
    A = _matrix_from_kernel(Kc)
    Uf = _as_float64(U, "U")
    lam = _as_float64(eigvals, "eigvals")
    if Uf.ndim != 2 or lam.ndim != 1 or Uf.shape[1] != lam.size:
        raise ValueError(
            f"U must be (M, k) and eigvals (k,) with the same k; got {Uf.shape} and {lam.shape}."
        )
    if Uf.shape[0] != A.shape[1]:
        raise ValueError(
            f"K_cross has {A.shape[1]} columns as a matrix but U has {Uf.shape[0]} rows; "
            "pass K(X*, X) against the probe X on which U was computed."
        )
    min_relative_eigval = number(float(min_relative_eigval), "min_relative_eigval", "nystrom_extension", minimum=0)
    lam_max = float(np.max(np.abs(lam))) if lam.size else 0.0
    bad = np.flatnonzero((lam <= 0) | (lam < min_relative_eigval * lam_max))
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"eigvals[{j}] = {lam[j]:.3e} is not above min_relative_eigval * max = "
            f"{min_relative_eigval * lam_max:.3e}; the extension divides by it. Pass fewer "
            "eigenpairs (smaller k) or, knowingly, a smaller min_relative_eigval."
        )
    return (A @ Uf) / lam


# ---------------------------------------------------------------- kernel regression
class _RegressionProblem(NamedTuple):
    K_train: np.ndarray
    K_test: np.ndarray
    residual: np.ndarray  # (N, C) targets minus prior mean and offset
    offset_test: np.ndarray  # (N*, C) added to the kernel prediction
    mean_diag: float


def _prepare_regression(
    K_train: ArrayLike,
    Y_train: ArrayLike,
    K_test_train: ArrayLike,
    target_mean: bool,
    f0_train: Optional[ArrayLike],
    f0_test: Optional[ArrayLike],
    num_classes: Optional[int],
) -> _RegressionProblem:
    Ktr = _as_float64(K_train, "K_train")
    _check_kernel(Ktr, "K_train", square=True)
    Kte = _as_float64(K_test_train, "K_test_train")
    _check_kernel(Kte, "K_test_train", square=False)
    if Kte.ndim != Ktr.ndim or Kte.shape[1:] != Ktr.shape[1:]:
        raise ValueError(
            f"K_test_train must be K(X_test, X_train) of the same kind as K_train, shape "
            f"(N_test,) + {Ktr.shape[1:]}; got {Kte.shape}."
        )
    n, n_test = Ktr.shape[0], Kte.shape[0]
    c_kernel = Ktr.shape[2] if Ktr.ndim >= 3 else None
    Y = _targets_as_matrix(Y_train, "Y_train", c_kernel if c_kernel is not None else num_classes)
    if Y.shape[0] != n:
        raise ValueError(f"Y_train has {Y.shape[0]} rows but K_train is over N={n} examples.")
    c = Y.shape[1]
    R = Y.copy()
    offset = np.zeros((n_test, c))
    if f0_train is not None or f0_test is not None:
        if f0_train is None or f0_test is None:
            raise ValueError("pass both f0_train and f0_test (prior outputs on train and test) or neither.")
        f0a = _as_float64(f0_train, "f0_train")
        f0b = _as_float64(f0_test, "f0_test")
        if f0a.shape != (n, c) or f0b.shape != (n_test, c):
            raise ValueError(
                f"f0_train and f0_test must have shapes {(n, c)} and {(n_test, c)}; "
                f"got {f0a.shape} and {f0b.shape}."
            )
        R -= f0a
        offset += f0b
    if target_mean:
        mu = R.mean(axis=0, keepdims=True)
        R -= mu
        offset += mu
    A = _matrix_from_kernel(Ktr)
    _check_symmetric(A, "K_train")
    mean_diag = float(np.trace(A)) / A.shape[0]
    return _RegressionProblem(Ktr, Kte, R, offset, mean_diag)


def _cholesky_solve(A: np.ndarray, B: np.ndarray, eps: float) -> np.ndarray:
    try:
        factor = scipy.linalg.cho_factor(A, lower=True, check_finite=False)
    except np.linalg.LinAlgError as err:
        raise ValueError(
            f"Cholesky factorisation failed at eps={eps:g}: K_train + eps·(tr K/n)·I is not "
            "positive definite. Pass eps > 0 (e.g. 1e-6 to 1e-2) to regularise a singular "
            "or indefinite kernel."
        ) from err
    return scipy.linalg.cho_solve(factor, B, check_finite=False)


def _solve_regression(p: _RegressionProblem, eps: float, owner: str) -> np.ndarray:
    eps = number(float(eps), "eps", owner, minimum=0)
    if eps > 0 and p.mean_diag <= 0:
        raise ValueError(
            f"K_train has trace {p.mean_diag:g}·n <= 0, so eps·(tr K/n) cannot regularise it; "
            "pass a positive semi-definite kernel."
        )
    reg = eps * p.mean_diag
    Ktr, Kte, R = p.K_train, p.K_test, p.residual
    n, n_test, c = Ktr.shape[0], Kte.shape[0], R.shape[1]
    if Ktr.ndim == 2:
        alpha = _cholesky_solve(Ktr + reg * np.eye(n), R, eps)
        pred = Kte @ alpha
    elif Ktr.ndim == 3:
        # Block-diagonal NC×NC system: one N×N solve per logit, same regulariser.
        pred = np.empty((n_test, c))
        for j in range(c):
            alpha = _cholesky_solve(Ktr[:, :, j] + reg * np.eye(n), R[:, j], eps)
            pred[:, j] = Kte[:, :, j] @ alpha
    else:
        A = _matrix_from_kernel(Ktr)
        alpha = _cholesky_solve(A + reg * np.eye(n * c), R.reshape(-1), eps)
        pred = (_matrix_from_kernel(Kte) @ alpha).reshape(n_test, c)
    return pred + p.offset_test


def kernel_regression(
    K_train: ArrayLike,
    Y_train: ArrayLike,
    K_test_train: ArrayLike,
    eps: float = 1e-4,
    target_mean: bool = False,
    f0_train: Optional[ArrayLike] = None,
    f0_test: Optional[ArrayLike] = None,
    num_classes: Optional[int] = None,
) -> np.ndarray:
    """Kernel (ridge) regression with an eNTK or NNGP kernel (Lee et al. 2020).

    ŷ(X*) = f0(X*) + μ + K(X*, X) K_reg⁻¹ (Y − f0(X) − μ), K_reg = K + ε·(tr K / n)·I,
    solved by float64 Cholesky. n is the matrix size (N, or N·C for full/diagonal
    kernels, which use vec(Y) over the NC×NC matrix of :func:`kernel_matrix`; a diagonal
    kernel is solved as C independent N×N systems). ε = 0 interpolates the training
    targets when K is positive definite; a failed Cholesky raises and asks for ε > 0.
    Predictions are invariant to K → cK, c > 0, for every ε.

    ``Y_train``: labels (N,) (one-hot) or targets (N, C).

    Centring in Lee et al. (2020)'s sense is the default: without ``f0_train``/``f0_test``
    the prediction K(X*, X) K_reg⁻¹ Y is that of the *centred* network f − f₀, whose
    output at the snapshot is 0 (with ε = 0: its linearisation trained by MSE gradient
    flow to t → ∞, Lee et al. 2019, 2020). Pass ``f0_train``/``f0_test`` (the network's
    outputs at the snapshot) for the uncentred network, f0(X*) + K* K_reg⁻¹ (Y − f0(X)).
    Either is still only a proxy for the linearised training of Fort et al. (2020).

    ``target_mean``: μ = column mean of Y − f0(X), subtracted and added back (a constant
    prior mean; this is *not* Lee et al.'s centring), else μ = 0.
    Returns predictions (N*, C).
    """
    p = _prepare_regression(K_train, Y_train, K_test_train, target_mean, f0_train, f0_test, num_classes)
    return _solve_regression(p, eps, "kernel_regression")


class KernelRegressionScores(NamedTuple):
    """accuracy: fraction of argmax(prediction) == label; mse: mean over N*·C entries of
    (prediction − one-hot target)²."""

    accuracy: float
    mse: float


class KernelRegressionSweep(NamedTuple):
    """Scores per ε; NaN where K_train + ε·(tr K/n)·I was not positive definite."""

    eps: np.ndarray
    accuracy: np.ndarray
    mse: np.ndarray


def _scores(pred: np.ndarray, y_test: np.ndarray) -> KernelRegressionScores:
    acc = float(np.mean(np.argmax(pred, axis=1) == _labels_from_targets(y_test)))
    mse = float(np.mean((pred - y_test) ** 2))
    return KernelRegressionScores(acc, mse)


def _test_targets(y_test: ArrayLike, n_test: int, c: int) -> np.ndarray:
    Yt = _targets_as_matrix(y_test, "y_test", c)
    if Yt.shape != (n_test, c):
        raise ValueError(f"y_test gives targets of shape {Yt.shape}; expected {(n_test, c)}.")
    return Yt


def kernel_regression_scores(
    K_train: ArrayLike,
    Y_train: ArrayLike,
    K_test_train: ArrayLike,
    y_test: ArrayLike,
    eps: float = 1e-4,
    target_mean: bool = False,
    f0_train: Optional[ArrayLike] = None,
    f0_test: Optional[ArrayLike] = None,
    num_classes: Optional[int] = None,
) -> KernelRegressionScores:
    """Accuracy and MSE of :func:`kernel_regression` on held-out targets ``y_test``
    (labels (N*,) or targets (N*, C); accuracy uses argmax of each row)."""
    p = _prepare_regression(K_train, Y_train, K_test_train, target_mean, f0_train, f0_test, num_classes)
    Yt = _test_targets(y_test, p.K_test.shape[0], p.residual.shape[1])
    return _scores(_solve_regression(p, eps, "kernel_regression_scores"), Yt)


def kernel_regression_sweep(
    K_train: ArrayLike,
    Y_train: ArrayLike,
    K_test_train: ArrayLike,
    y_test: ArrayLike,
    eps_grid: Sequence[float],
    target_mean: bool = False,
    f0_train: Optional[ArrayLike] = None,
    f0_test: Optional[ArrayLike] = None,
    num_classes: Optional[int] = None,
) -> KernelRegressionSweep:
    """:func:`kernel_regression_scores` for each ε of ``eps_grid`` (Lee et al. 2020 sweep
    the diagonal regulariser). An ε whose regularised kernel is not positive definite
    gets NaN scores instead of stopping the sweep."""
    grid = _as_float64(eps_grid, "eps_grid")
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"eps_grid must be a non-empty 1-d sequence of eps >= 0; got shape {grid.shape}.")
    if np.any(grid < 0):
        raise ValueError(f"eps_grid must hold eps >= 0; got {grid.tolist()}.")
    p = _prepare_regression(K_train, Y_train, K_test_train, target_mean, f0_train, f0_test, num_classes)
    Yt = _test_targets(y_test, p.K_test.shape[0], p.residual.shape[1])
    acc = np.full(grid.size, np.nan)
    mse = np.full(grid.size, np.nan)
    for i, eps in enumerate(grid):
        try:
            pred = _solve_regression(p, float(eps), "kernel_regression_sweep")
        except ValueError as err:
            if not isinstance(err.__cause__, np.linalg.LinAlgError):
                raise
            continue
        acc[i], mse[i] = _scores(pred, Yt)
    return KernelRegressionSweep(grid.copy(), acc, mse)
