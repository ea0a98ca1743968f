"""Finite versus infinite width: how far a network's eNTK is from its analytic limit.

Lee et al. (2020), "Finite versus infinite neural networks: an empirical study", compare
trained finite networks with the analytic NNGP and NTK of their architecture. The gap at
initialisation is measured here on a probe, with the eNTK of :func:`lightning_ntk.empirical_ntk`
(``kind="trace"``, the mean over logits, float64) against :func:`analytic_kernels`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .._args import one_of
from ..ntk import empirical_ntk
from ..spectral import kernel_distance
from ._convert import VarianceArg
from ._kernels import PARAMETERIZATIONS, AnalyticKernels, analytic_kernels

_OWNER = "finite_infinite_gap"


class FiniteInfiniteGap(NamedTuple):
    """The gap between an eNTK K and the analytic NTK Θ on the same examples.

    ``relative_error`` = ‖K − Θ‖_F / ‖Θ‖_F: a random-initialisation fluctuation of order
    1/√width (plus a 1/width bias beyond one hidden layer). ``kernel_distance`` = Fort et
    al.'s S(K, Θ) = 1 − ⟨K, Θ⟩_F / (‖K‖_F ‖Θ‖_F): blind to scale and quadratic in a small
    deviation, so of order 1/width. ``scale`` = ⟨K, Θ⟩_F / ‖Θ‖²_F, 1 in the limit.
    ``empirical`` and ``analytic`` are the two kernels (N, N), float64.
    """

    relative_error: float
    kernel_distance: float
    scale: float
    parameterization: str
    empirical: Tensor
    analytic: Tensor


def _ntk_parameterized_entk(model: nn.Module, x: Tensor, kernels: AnalyticKernels) -> Tensor:
    """The eNTK of ``model`` rewritten in NTK parameterisation (W = σ_w/√fan_in · ω,
    b = σ_b β): Σ_layers (σ_w²/fan_in) Θ_W + σ_b² Θ_b, each term the eNTK of one parameter."""
    names = dict(model.named_parameters())
    total = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    for layer in kernels.layers:
        prefix = "" if layer.name == "<root>" else layer.name + "."
        parts = [(prefix + "weight", layer.weight_var / layer.fan_in)]
        if layer.bias_var is not None:
            parts.append((prefix + "bias", layer.bias_var))
        for name, scale in parts:
            if name not in names:  # pragma: no cover - the converter only lists layers it read
                raise ValueError(f"{_OWNER}: the model has no parameter {name!r}")
            total += scale * empirical_ntk(model, x, kind="trace", params=[name], dtype=torch.float64)
    return total


def finite_infinite_gap(
    model: nn.Module,
    x: Tensor,
    *,
    parameterization: str = "standard",
    weight_var: VarianceArg = None,
    bias_var: VarianceArg = None,
    analytic: Optional[Union[AnalyticKernels, Tensor]] = None,
    empirical: Optional[Tensor] = None,
) -> FiniteInfiniteGap:
    """The distance between ``model``'s eNTK on ``x`` and the analytic NTK of its architecture.

    The eNTK is ``empirical_ntk(model, x, kind="trace", dtype=torch.float64)`` (the mean over
    logits, computed in the mode the caller left the model in: use ``model.eval()``), unless
    ``empirical`` gives it. In ``parameterization="ntk"`` the eNTK is that of the same
    network written in NTK parameterisation: Σ (σ_w²/fan_in) Θ_W + σ_b² Θ_b over layers, one
    eNTK per parameter tensor. ``analytic``: the analytic kernels (or NTK) if already
    computed, else :func:`analytic_kernels` with ``weight_var``/``bias_var`` (read from the
    module at initialisation by default; give them for a trained model).

    Meaningful at initialisation (Lee et al. 2020 compare the limit with the finite network
    there and after training); on a trained model it measures how far training moved the
    kernel from the initial distribution's limit.
    """
    one_of(parameterization, "parameterization", PARAMETERIZATIONS, _OWNER)
    if isinstance(analytic, AnalyticKernels):
        if analytic.parameterization != parameterization:
            raise ValueError(f"{_OWNER}: analytic kernels are in {analytic.parameterization!r} parameterisation, "
                             f"parameterization={parameterization!r}; pass kernels computed with the same one")
        kernels: Optional[AnalyticKernels] = analytic
        theta = analytic.ntk
    elif analytic is not None:
        kernels = None
        theta = torch.as_tensor(analytic, dtype=torch.float64)
    else:
        kernels = analytic_kernels(model, x, parameterization=parameterization, weight_var=weight_var,
                                   bias_var=bias_var)
        theta = kernels.ntk
    if empirical is not None:
        k = torch.as_tensor(empirical, dtype=torch.float64)
    elif parameterization == "ntk":
        if kernels is None:
            kernels = analytic_kernels(model, x, parameterization="ntk", weight_var=weight_var, bias_var=bias_var)
        k = _ntk_parameterized_entk(model, x, kernels)
    else:
        k = empirical_ntk(model, x, kind="trace", dtype=torch.float64)
    k = k.detach().cpu().to(torch.float64)
    theta = theta.detach().cpu().to(torch.float64)
    if k.shape != theta.shape:
        raise ValueError(f"{_OWNER}: the eNTK has shape {tuple(k.shape)} and the analytic NTK {tuple(theta.shape)}; "
                         "compute both on the same examples (kind='trace')")
    a, b = k.numpy().ravel(), theta.numpy().ravel()
    nb = float(np.linalg.norm(b))
    na = float(np.linalg.norm(a))
    if nb == 0 or na == 0:
        raise ValueError(f"{_OWNER}: the {'analytic' if nb == 0 else 'empirical'} kernel is zero")
    return FiniteInfiniteGap(float(np.linalg.norm(a - b)) / nb, kernel_distance(a, b), float(a @ b) / nb ** 2,
                             parameterization, k, theta)
