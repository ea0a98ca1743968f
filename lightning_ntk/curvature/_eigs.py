"""Extreme Hessian eigenpairs by Lanczos with a residual stopping rule (``hessian_eigs``)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .._args import integer, number, one_of, positive, positive_int
from .._lanczos import lanczos_eigs
from ._common import GeneratorLike, Tensor, _flatten, _make_generator, _memory_guard, _unflatten
from ._loss_set import LossSet, accepts_model_form

WHICH = ("LA", "SA", "LM")


@dataclass
class HessianEigenResult:
    """Output of :func:`hessian_eigs`.

    eigenvalues: (k,) float64, wanted order (LA: largest first; SA: smallest first;
        LM: largest magnitude first).
    residuals: (k,) float64, absolute residual norms ``||H v - lambda v||`` of the returned
        unit Ritz vectors (true residuals of the computed HVPs, from the Lanczos relation;
        see :mod:`lightning_ntk._lanczos`). ``relative_residuals`` divides by ``|lambda|``.
        For a symmetric H some eigenvalue lies within ``residual`` of each Ritz value, and
        within ``residual**2 / gap`` when the Ritz value is separated by ``gap`` from the
        rest of the spectrum.
    n_hvp: number of full-set Hessian-vector products used.
    converged: True when every wanted pair met ``residual <= tol * |lambda| + atol``.
    converged_pairs: (k,) bool, the same test per pair.
    eigenvectors: (k, P) unit vectors in the flat parameter order of ``param_names``
        (``return_eigenvectors=True``), else None. ``eigenvector_params(i)`` reshapes one.
    """

    eigenvalues: Tensor
    residuals: Tensor
    n_hvp: int
    converged: bool
    converged_pairs: Tensor
    eigenvectors: Optional[Tensor] = None
    which: str = "LA"
    tol: float = 1e-3
    hvp_method: str = ""
    n_examples: int = 0
    param_names: List[str] = field(default_factory=list)
    param_shapes: List[Tuple[int, ...]] = field(default_factory=list)

    @property
    def relative_residuals(self) -> Tensor:
        """``residuals / |eigenvalues|`` (inf where an eigenvalue is exactly zero)."""
        return self.residuals / self.eigenvalues.abs()

    def eigenvector_params(self, i: int) -> List[Tensor]:
        """Eigenvector ``i`` split into tensors shaped like the parameters."""
        if self.eigenvectors is None:
            raise ValueError("no eigenvectors stored: call hessian_eigs(..., return_eigenvectors=True)")
        return _unflatten(self.eigenvectors[i], self.param_shapes)


def _validate_common(owner: str, k: int, which: str, tol: float) -> None:
    positive_int(k, "k", owner, hint="the number of eigenpairs")
    one_of(which, "which", WHICH, owner, hint="'LA' largest, 'SA' smallest, 'LM' largest magnitude")
    positive(tol, "tol", owner, hint="the relative residual tolerance")


def _start_vector(
    n: int,
    init: Any,
    shapes: Sequence[Tuple[int, ...]],
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Random Gaussian start, or a warm start mixed half-and-half with a random vector.

    A warm start ``init`` (previous eigenvectors) is summed into one unit vector u; the
    start is ``(u + r) / ||u + r||`` with r a random unit vector. The u part makes the
    previous top directions converge in few steps; the r part keeps every other direction
    present with the weight of a cold start, so an eigenvalue that has overtaken the
    previous ones is still found.
    """
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    r = r / torch.linalg.vector_norm(r)
    if init is None:
        return r.to(dtype=dtype, device=device)
    if isinstance(init, HessianEigenResult):
        if init.eigenvectors is None:
            raise ValueError("init: the HessianEigenResult has no eigenvectors (use return_eigenvectors=True)")
        init = init.eigenvectors
    vecs: List[Tensor] = []
    if isinstance(init, Tensor):
        t = init.detach()
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[1] != n:
            raise ValueError(f"init must have shape (P,) or (k, P) with P={n} parameters, got {tuple(init.shape)}")
        vecs = list(t)
    elif isinstance(init, (list, tuple)):
        for item in init:
            if isinstance(item, Tensor) and item.dim() >= 1 and item.numel() == n and (item.dim() == 1):
                vecs.append(item.detach())
            elif isinstance(item, (list, tuple)) and all(isinstance(t, Tensor) for t in item):
                if [tuple(t.shape) for t in item] != list(shapes):
                    raise ValueError("init: per-parameter tensors do not match the parameter shapes")
                vecs.append(_flatten([t.detach() for t in item]))
            else:
                raise ValueError(
                    f"init entries must be flat tensors of length P={n} or lists of per-parameter tensors"
                )
    else:
        raise TypeError("init must be None, a HessianEigenResult, a (k, P) tensor or a list of vectors")
    u = torch.zeros(n, dtype=torch.float64)
    for v in vecs:
        v = v.double().cpu().reshape(-1)
        nv = torch.linalg.vector_norm(v)
        if not torch.isfinite(nv) or nv == 0:
            raise ValueError("init vectors must be finite and nonzero")
        u += v / nv
    nu = torch.linalg.vector_norm(u)
    if nu > 0:
        r = r + u / nu
    return (r / torch.linalg.vector_norm(r)).to(dtype=dtype, device=device)


@accepts_model_form()
def hessian_eigs(
    loss_set: LossSet,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-3,
    atol: Optional[float] = None,
    max_hvp: Optional[int] = None,
    return_eigenvectors: bool = False,
    init: Any = None,
    hvp: str = "auto",
    generator: GeneratorLike = None,
    guard: int = 0,
    warn: bool = True,
) -> HessianEigenResult:
    """k extreme eigenpairs of the Hessian of the mean loss over a fixed set.

    Lanczos with full reorthogonalisation on Hessian-vector products (Lanczos 1950; for
    Hessians of networks: Ghorbani et al. 2019, Cohen et al. 2021). After each product the
    Ritz pairs of the Krylov space are formed and the iteration stops as soon as every
    wanted pair (theta_i, y_i) has a residual

        ||H y_i - theta_i y_i|| <= tol * |theta_i| + atol,

    an accuracy bound, unlike power iteration's relative-change test: some eigenvalue of H
    lies within the residual of theta_i (and within residual^2 / gap for an isolated one).
    ``atol=None`` is a rounding floor, 50 * eps(dtype) * ||H|| (estimated by the largest
    Lanczos coefficient).

    What the residual cannot tell is *which* eigenvalue theta_i is close to. By interlacing,
    theta_i <= lambda_i for "LA" (theta_i >= lambda_i for "SA"); with a random start the
    extreme eigenvalues are found in order with probability one, but when lambda_k sits in a
    tight cluster and the start vector happens to be nearly orthogonal to its eigenvector,
    Lanczos can stop on the next eigenvalue of the cluster (an error of about the cluster
    spacing). ``guard=g`` also requires the next g Ritz pairs to converge, which makes this
    much rarer at the cost of a few more products. Single-vector Lanczos finds one copy of
    a repeated eigenvalue.

    Called as ``hessian_eigs(loss_set, k, ...)`` or, building the :class:`LossSet` first,
    ``hessian_eigs(model, loss_fn, batches, k, ..., dtype=, params=, mode=,
    batch_format=)`` (see :class:`LossSet` for those).

    Args:
        loss_set: the mean loss over the fixed set (a :class:`LossSet`).
        k: number of eigenpairs.
        which: "LA" largest algebraic (sharpness), "SA" smallest algebraic (most negative
            curvature), "LM" largest magnitude.
        tol: relative residual tolerance (see above).
        atol: absolute residual floor (None: the rounding floor above).
        max_hvp: most Hessian-vector products (default ``min(P, 100 + 10 k)``).
        return_eigenvectors: keep the (k, P) unit eigenvectors in the result.
        init: warm start from previous eigenvectors (a result, a (k, P) tensor or a list);
            see ``_start_vector``: mixed with a random vector, so it only saves work.
        hvp: "double_backward" (reverse-over-reverse, graph rebuilt per product),
            "double_backward_retain" (gradient graph of every batch kept: fastest, memory
            of the whole set's graph), "forward_over_reverse" (``torch.func.jvp`` of
            ``torch.func.grad``) or "auto" (see ``_choose_auto``).
        generator: None (seed 0), an int seed or a ``torch.Generator`` for the start.
        guard: extra Ritz pairs beyond the k wanted that must also converge (see above).
        warn: emit a RuntimeWarning when ``max_hvp`` is reached before convergence.
    """
    owner = "hessian_eigs"
    _validate_common(owner, k, which, tol)
    atol = number(atol, "atol", owner, minimum=0, optional=True)
    ls = loss_set
    P = ls.n_params
    if k > P:
        raise ValueError(f"k={k} exceeds the number of parameters P={P}")
    if max_hvp is None:
        max_hvp = min(P, 100 + 10 * k)
    max_hvp = integer(max_hvp, "max_hvp", owner, minimum=k, hint="Hessian-vector products allowed, at least k")
    guard = integer(guard, "guard", owner, minimum=0, hint="extra Ritz pairs to converge")
    gen = _make_generator(generator)
    with ls.measuring(), ls.hvp_operator(hvp) as op:
        v0 = _start_vector(P, init, ls.shapes, gen, ls.dtype, ls.device)
        reserve = _memory_guard("hessian_eigs (Lanczos basis)", P, ls.device,
                                f"Lower max_hvp (now {max_hvp}) or k, loosen tol, compute in float32 "
                                "(dtype=torch.float32), or restrict params=.")
        out = lanczos_eigs(
            op, v0, k, which, float(tol), atol, max_hvp, gen, return_eigenvectors, guard=guard,
            reserve=reserve,
        )
    converged = bool(out["converged"].all())
    if warn and not converged:
        warnings.warn(
            f"hessian_eigs: not converged after {op.count} Hessian-vector products "
            f"(max relative residual {float((out['residuals'] / out['eigenvalues'].abs()).max()):.2e} "
            f"> tol={tol}); raise max_hvp or tol",
            RuntimeWarning,
            stacklevel=3,  # the caller of the accepts_model_form wrapper
        )
    return HessianEigenResult(
        eigenvalues=out["eigenvalues"].clone(),
        residuals=out["residuals"].clone(),
        n_hvp=op.count,
        converged=converged,
        converged_pairs=out["converged"].clone(),
        eigenvectors=out.get("eigenvectors"),
        which=which,
        tol=float(tol),
        hvp_method=op.method,
        n_examples=ls.n_examples,
        param_names=list(ls.names),
        param_shapes=list(ls.shapes),
    )
