"""Lanczos process with full reorthogonalisation, on flat vectors (private).

Plain linear algebra: a symmetric operator is given as ``matvec(v) -> Av`` on 1-D tensors.
Used by :mod:`lightning_ntk.curvature` for Hessian eigenpairs and for stochastic Lanczos
quadrature.

Each step applies the operator once to the newest basis vector ``v_j`` and orthogonalises
``w = A v_j`` against *every* basis vector, twice (classical Gram-Schmidt twice, "twice is
enough", Giraud et al. 2005). Keeping all the coefficients gives the exact relation

    A V_m = V_{m+1} Hbar_m        (up to rounding, eps * ||A|| per column)

with ``Hbar_m`` the (m+1) x m Hessenberg matrix of the coefficients (tridiagonal in exact
arithmetic). Ritz pairs come from the symmetric part ``T_m`` of its top m x m block, and the
residual of a Ritz pair (theta, y = V_m s) is computed from that relation, without another
operator application:

    ||A y - theta y|| = ||Hbar_m s - theta [s; 0]||,

which includes the (tiny) non-symmetric part of the computed coefficients, so it is the true
residual of the computed products, not the textbook bound beta_m |s_m| alone.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

Tensor = torch.Tensor


class LanczosProcess:
    """Incremental Lanczos with full reorthogonalisation (see module docstring).

    ``v0`` fixes dtype and device of the basis; the small projected matrices are float64
    NumPy arrays (cheap per-step bookkeeping). ``generator`` (CPU) draws a fresh random
    direction if the Krylov space becomes invariant before the caller is done ("happy
    breakdown"); the size of the discarded remainder is kept in ``lost`` and added to
    residual bounds (triangle inequality).
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        v0: Tensor,
        max_steps: int,
        generator: Optional[torch.Generator] = None,
        reserve: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        if v0.dim() != 1:
            raise ValueError(f"start vector must be 1-D, got shape {tuple(v0.shape)}")
        n = v0.numel()
        nrm = float(torch.linalg.vector_norm(v0))
        if not math.isfinite(nrm) or nrm == 0.0:
            raise ValueError("start vector must be finite and nonzero")
        self.matvec = matvec
        self.n = n
        self.max_steps = min(int(max_steps), n)
        self.generator = generator
        self.dtype = v0.dtype
        self.device = v0.device
        self._eps = torch.finfo(v0.dtype).eps
        # ``reserve(rows, nbytes)`` is called before the basis grows to ``rows`` vectors
        # (``nbytes`` in all): a memory guard may raise instead of letting the allocation
        # run into the OOM killer.
        self._reserve = reserve
        # Basis storage grows in chunks, so memory follows the steps actually taken.
        self._cap = min(self.max_steps + 1, 16)
        if reserve is not None:
            reserve(self._cap, self._cap * n * v0.element_size())
        self._V = torch.empty(self._cap, n, dtype=self.dtype, device=self.device)
        self._V[0] = v0 / nrm
        self.m = 0  # number of operator applications (= Lanczos steps) done
        self.hbar = np.zeros((self.max_steps + 1, self.max_steps))
        self.lost = np.zeros(self.max_steps)  # |remainder| dropped at restarts
        self.exhausted = False  # True when the basis spans the whole space
        self.breakdowns: List[int] = []  # steps after which the Krylov space was invariant
        self._scale = 0.0  # running max |coefficient|, for the breakdown test

    # -- basis management -------------------------------------------------------------
    def _ensure_capacity(self, rows: int) -> None:
        if rows <= self._cap:
            return
        cap = min(max(rows, 2 * self._cap), self.max_steps + 1)
        if self._reserve is not None:  # old and new buffers coexist while copying
            self._reserve(cap, (cap + self._cap) * self.n * self._V.element_size())
        V = torch.empty(cap, self.n, dtype=self.dtype, device=self.device)
        V[: self._cap] = self._V[: self._cap]
        self._V, self._cap = V, cap

    @property
    def basis(self) -> Tensor:
        """The m orthonormal Lanczos vectors as rows, shape (m, n)."""
        return self._V[: self.m]

    def _orthogonalise(self, w: Tensor, rows: int) -> Tuple[Tensor, np.ndarray]:
        V = self._V[:rows]
        h = V @ w
        w = w - h @ V
        h2 = V @ w
        w = w - h2 @ V
        return w, (h.double() + h2.double()).cpu().numpy()

    def _random_orthogonal(self, rows: int) -> Optional[Tensor]:
        for _ in range(3):
            r = torch.randn(self.n, generator=self.generator, dtype=torch.float64)
            r = r.to(dtype=self.dtype, device=self.device)
            r, _ = self._orthogonalise(r, rows)
            nrm = float(torch.linalg.vector_norm(r))
            if nrm > 1e-3:
                return r / nrm
        return None

    # -- one step ---------------------------------------------------------------------
    def step(self) -> bool:
        """One operator application. Returns False when no further step is possible."""
        if self.m >= self.max_steps or self.exhausted:
            return False
        j = self.m
        w = self.matvec(self._V[j])
        if w.shape != (self.n,):
            raise RuntimeError(f"operator returned shape {tuple(w.shape)}, expected ({self.n},)")
        w, coeffs = self._orthogonalise(w, j + 1)
        beta = float(torch.linalg.vector_norm(w))
        if not (math.isfinite(beta) and np.isfinite(coeffs).all()):
            raise FloatingPointError(
                "a Hessian-vector product was not finite (nan/inf): check the loss and the data"
            )
        self.hbar[: j + 1, j] = coeffs
        self._scale = max(self._scale, float(np.abs(coeffs).max()), beta)
        self.m = j + 1
        if j + 1 >= self.n:
            self.exhausted = True
            self.lost[j] = beta
            return True
        if self.m >= self.max_steps:
            # No new basis vector is needed, but beta enters the residuals.
            self.hbar[j + 1, j] = beta
            return True
        self._ensure_capacity(j + 2)
        if beta <= 10.0 * self._eps * max(self._scale, 1e-300) * math.sqrt(j + 1):
            # Invariant subspace found: continue with a fresh random direction.
            self.lost[j] = beta
            self.breakdowns.append(j)
            r = self._random_orthogonal(j + 1)
            if r is None:
                self.exhausted = True
                return True
            self._V[j + 1] = r
        else:
            self.hbar[j + 1, j] = beta
            self._V[j + 1] = w / beta
        return True

    # -- Ritz pairs -------------------------------------------------------------------
    def projected(self) -> np.ndarray:
        """Symmetric part of the m x m projected matrix V_m^T A V_m (float64)."""
        H = self.hbar[: self.m, : self.m]
        return 0.5 * (H + H.T)

    def ritz(self) -> Tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending) and coefficient vectors (columns) of the current basis.

        Solved with torch's LAPACK rather than NumPy's: right after a backward pass, NumPy's
        own BLAS threads contend with torch's still-spinning ones, and a 20 x 20 ``eigh``
        took ~1.6 ms instead of ~30 us (a quarter of a Lanczos run on a small model).
        """
        theta, S = torch.linalg.eigh(torch.from_numpy(self.projected()))
        return theta.numpy(), S.numpy()

    def wanted_ritz(self, k: int, which: str) -> Tuple[np.ndarray, np.ndarray]:
        """The k wanted Ritz pairs (values in wanted order, vectors as columns).

        Small bases: dense symmetric eigensolver on the projected matrix. Larger ones (the
        per-step cost would grow as m^3): only the k wanted pairs of its tridiagonal part,
        which differs from the full projected matrix by reorthogonalisation coefficients of
        order eps * ||A||. Residuals are then computed exactly for whatever pairs are used.
        """
        m = self.m
        k = min(k, m)
        if m <= 64:
            theta, S = self.ritz()
            idx = select(theta, k, which)
            return theta[idx], S[:, idx]
        T = self.projected()
        d, e = np.diag(T).copy(), np.diag(T, 1).copy()
        ranges = {"LA": [(m - k, m - 1)], "SA": [(0, k - 1)], "LM": [(0, k - 1), (m - k, m - 1)]}[which]
        thetas, Ss = [], []
        for lo, hi in ranges:
            th, S = eigh_tridiagonal(d, e, select="i", select_range=(lo, hi))
            thetas.append(th)
            Ss.append(S)
        theta, S = np.concatenate(thetas), np.concatenate(Ss, axis=1)
        if which == "LM":  # the two ranges may overlap when 2k > m
            _, uniq = np.unique(np.round(theta, 14), return_index=True)
            theta, S = theta[uniq], S[:, uniq]
        idx = select(theta, k, which)
        return theta[idx], S[:, idx]

    def residual_norms(self, theta: np.ndarray, S: np.ndarray) -> np.ndarray:
        """||A V s - theta V s|| for the given Ritz pairs, from the Lanczos relation."""
        m = self.m
        R = self.hbar[: m + 1, :m] @ S
        R[:m] -= S * theta
        return np.sqrt((R * R).sum(0)) + self.lost[:m] @ np.abs(S)

    def ritz_vectors(self, S: np.ndarray) -> Tensor:
        """Ritz vectors V_m s as rows, shape (k, n), in the basis dtype."""
        St = torch.from_numpy(np.ascontiguousarray(S.T)).to(dtype=self.dtype, device=self.device)
        return St @ self.basis


def select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the k wanted Ritz values: LA largest first, SA smallest first, LM by |theta|."""
    if which == "LA":
        order = np.argsort(-theta, kind="stable")
    elif which == "SA":
        order = np.argsort(theta, kind="stable")
    elif which == "LM":
        order = np.argsort(-np.abs(theta), kind="stable")
    else:  # validated by the caller
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}")
    return order[:k]


def lanczos_eigs(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    k: int,
    which: str,
    tol: float,
    atol: Optional[float],
    max_steps: int,
    generator: Optional[torch.Generator] = None,
    want_vectors: bool = False,
    guard: int = 0,
    reserve: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """k wanted eigenpairs; stops when every wanted pair has ||A y - theta y|| <= tol|theta| + atol.

    ``atol=None`` uses a rounding floor of 50 * eps(dtype) * (largest |coefficient| of the
    projected matrix, an estimate of ||A|| from below). ``guard`` extra
    Ritz pairs (next in the wanted order) must pass the same test before stopping.
    Returns a dict of torch tensors: eigenvalues, residuals, converged (k,), n_steps and,
    with ``want_vectors``, eigenvectors (k, n).
    """
    proc = LanczosProcess(matvec, v0, max_steps, generator, reserve)
    eps = torch.finfo(v0.dtype).eps
    theta_sel = S_sel = res = None
    converged = np.zeros(k, dtype=bool)
    while proc.step():
        if proc.m < k:
            continue
        kg = min(k + guard, proc.m)
        theta_w, S_w = proc.wanted_ritz(kg, which)
        scale = max(float(np.abs(theta_w).max()), proc._scale)
        floor = atol if atol is not None else 50.0 * eps * scale
        res_all = proc.residual_norms(theta_w, S_w)
        ok = res_all <= tol * np.abs(theta_w) + floor
        theta_sel, S_sel, res, converged = theta_w[:k], S_w[:, :k], res_all[:k], ok[:k]
        if ok[:k].all() and (ok.all() or proc.m >= proc.max_steps or proc.exhausted):
            break
    if theta_sel is None:  # fewer than k steps were possible (n < k is checked by caller)
        theta_sel, S_sel = proc.wanted_ritz(k, which)
        res = proc.residual_norms(theta_sel, S_sel)
    out = {
        "eigenvalues": torch.from_numpy(theta_sel.copy()),
        "residuals": torch.from_numpy(np.asarray(res, dtype=np.float64).copy()),
        "converged": torch.from_numpy(np.asarray(converged, dtype=bool).copy()),
        "n_steps": proc.m,
    }
    if want_vectors:
        out["eigenvectors"] = proc.ritz_vectors(S_sel)
    return out


def lanczos_quadrature(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    n_steps: int,
    generator: Optional[torch.Generator] = None,
    reserve: Optional[Callable[[int, int], None]] = None,
) -> Tuple[Tensor, Tensor, int]:
    """Gauss quadrature nodes and weights for v0^T f(A) v0 / ||v0||^2 (Golub & Meurant).

    Nodes: eigenvalues of the m x m Lanczos matrix T_m; weights: squared first components
    of its eigenvectors (they sum to one). Stops early at an invariant subspace (then the
    quadrature is exact). Returns (nodes, weights, number of operator applications).
    """
    proc = LanczosProcess(matvec, v0, n_steps, generator, reserve)
    while proc.m < proc.max_steps:
        if not proc.step():
            break
        if proc.breakdowns or proc.exhausted:
            # Invariant subspace reached: the quadrature on span(V) is exact; a random
            # restart would no longer be a Krylov space of v0.
            break
    theta, S = proc.ritz()
    return torch.from_numpy(theta.copy()), torch.from_numpy(S[0, :] ** 2), proc.m
