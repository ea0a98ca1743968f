"""Hessian spectral density by stochastic Lanczos quadrature (``hessian_density``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .._args import positive, positive_int
from .._lanczos import lanczos_quadrature
from ._common import GeneratorLike, Tensor, _make_generator, _memory_guard
from ._loss_set import LossSet, accepts_model_form


@dataclass
class HessianDensityResult:
    """Output of :func:`hessian_density` (stochastic Lanczos quadrature).

    nodes, weights: (n_runs, m) float64; each run's weights sum to one. The spectral
    density estimate is ``phi(t) = mean_runs sum_j weights[r, j] * delta(t - nodes[r, j])``
    (a probability measure: multiply by ``n_params`` for eigenvalue counts). Use
    :meth:`density` for a Gaussian-smoothed version on a grid.
    """

    nodes: Tensor
    weights: Tensor
    n_hvp: int
    n_params: int
    hvp_method: str = ""

    def density(self, grid: Union[Tensor, Sequence[float]], sigma: Optional[float] = None) -> Tensor:
        """Gaussian-smoothed density on ``grid``; see :func:`smoothed_density`."""
        return smoothed_density(self.nodes, self.weights, grid, sigma)


@accepts_model_form()
def hessian_density(
    loss_set: LossSet,
    *,
    n_steps: int = 80,
    n_runs: int = 1,
    hvp: str = "auto",
    generator: GeneratorLike = None,
) -> HessianDensityResult:
    """Spectral density of H by stochastic Lanczos quadrature (SLQ).

    Ghorbani, Krishnan & Xiao 2019 (as in PyHessian's ``density``): for each of ``n_runs``
    random unit Rademacher vectors v, ``n_steps`` Lanczos steps (full reorthogonalisation)
    give T_m = S diag(theta) S^T; then ``v^T delta(t - H) v ~ sum_j S_{0j}^2 delta(t - theta_j)``
    (Gauss quadrature), and averaging over runs estimates the density
    ``(1/P) sum_i delta(t - lambda_i)``. Nodes are exact extreme eigenvalues once converged.
    Called with a :class:`LossSet` or as ``hessian_density(model, loss_fn, batches, ...)``.
    """
    n_steps = positive_int(n_steps, "n_steps", "hessian_density", hint="Lanczos steps per run")
    n_runs = positive_int(n_runs, "n_runs", "hessian_density")
    ls = loss_set
    P = ls.n_params
    m = min(n_steps, P)
    gen = _make_generator(generator)
    nodes = torch.full((n_runs, m), float("nan"), dtype=torch.float64)
    weights = torch.zeros((n_runs, m), dtype=torch.float64)
    with ls.measuring(), ls.hvp_operator(hvp) as op:
        reserve = _memory_guard("hessian_density (Lanczos basis)", P, ls.device,
                                f"Lower n_steps (now {n_steps}), compute in float32 (dtype=torch.float32), "
                                "or restrict params=.")
        for r in range(n_runs):
            v = 2.0 * torch.randint(0, 2, (P,), generator=gen, dtype=torch.int8).double() - 1.0
            th, w, steps = lanczos_quadrature(op, v.to(ls.dtype).to(ls.device), m, gen, reserve)
            nodes[r, :steps] = th
            weights[r, :steps] = w
    # Runs that stopped early (invariant subspace) pad with zero-weight nodes at their mean.
    for r in range(n_runs):
        bad = torch.isnan(nodes[r])
        if bad.any():
            nodes[r, bad] = float((nodes[r, ~bad] * weights[r, ~bad]).sum())
    return HessianDensityResult(nodes=nodes, weights=weights, n_hvp=op.count, n_params=P, hvp_method=op.method)


def smoothed_density(
    nodes: Tensor,
    weights: Tensor,
    grid: Union[Tensor, Sequence[float]],
    sigma: Optional[float] = None,
) -> Tensor:
    """Gaussian-smoothed SLQ density on ``grid``:

        phi_sigma(t) = mean_runs sum_j w_rj * exp(-(t - theta_rj)^2 / (2 sigma^2)) / (sigma sqrt(2 pi))

    It integrates to one. ``sigma=None`` uses 1% of the node range (PyHessian's plot uses
    sigma^2 = 1e-5 of it).
    """
    nodes = torch.as_tensor(nodes, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if nodes.shape != weights.shape:
        raise ValueError(f"nodes and weights must have the same shape, got {tuple(nodes.shape)} and {tuple(weights.shape)}")
    if nodes.dim() == 1:
        nodes, weights = nodes[None], weights[None]
    grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    if sigma is None:
        span = float(nodes.max() - nodes.min())
        sigma = 0.01 * span if span > 0 else 1.0
    sigma = positive(sigma, "sigma", "smoothed_density", hint="the Gaussian kernel width")
    z = (grid[:, None, None] - nodes[None]) / sigma
    dens = (weights[None] * torch.exp(-0.5 * z * z)).sum(-1).mean(-1)
    return dens / (sigma * math.sqrt(2 * math.pi))
