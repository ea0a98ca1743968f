"""``analytic_kernels``: the infinite-width NNGP and NTK of a PyTorch network, float64."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._args import one_of
from ..ntk._memory import format_bytes, parse_memory
from . import _layers as L
from ._convert import LayerVariances, VarianceArg, compile_module

_OWNER = "analytic_kernels"
PARAMETERIZATIONS = ("standard", "ntk")
#: Live float64 arrays per pair of examples and position pair, at the widest layer
#: (nngp, ntk, the padded copy, the running sum, the nonlinearity's temporaries).
_ARRAYS_PER_PAIR = 12
#: Entries per kernel array in one tile (2 MiB of float64): tiles that stay in the CPU's
#: cache ran 2-2.5x faster than 90 MiB tiles on an 8x8 CNN (the work is memory-bound).
TILE_ENTRIES = 2 ** 18


class AnalyticKernels(NamedTuple):
    """Infinite-width kernels of one network on (x1, x2), float64 (N1, N2) tensors.

    ``nngp``: the prior covariance of each logit, E[f_c(x1) f_c(x2)] (the same for every c;
    the full kernel is nngp ⊗ I_C). ``ntk``: the NTK each logit's eNTK converges to, in
    ``parameterization``; it is what ``empirical_ntk(model, x, kind="trace")`` (the mean over
    logits) estimates. ``layers``: the variances used per layer with weights;
    ``activations``: how each activation's kernel was computed.
    """

    nngp: Tensor
    ntk: Tensor
    parameterization: str
    layers: Tuple[LayerVariances, ...]
    activations: Tuple[Tuple[str, str], ...]


def _as_input(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{_OWNER}: {name} must be a torch.Tensor of examples (N, ...), got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0 or not x.is_floating_point():
        raise ValueError(f"{_OWNER}: {name} must be a floating tensor of shape (N, features) or (N, C, *spatial) "
                         f"with N >= 1, got {x.dtype} of shape {tuple(x.shape)}")
    return x.detach().to(device="cpu", dtype=torch.float64)


def analytic_kernels(
    module: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    parameterization: str = "standard",
    weight_var: VarianceArg = None,
    bias_var: VarianceArg = None,
    max_memory: Union[int, str] = "1GiB",
) -> AnalyticKernels:
    """The infinite-width NNGP and NTK of ``module`` between ``x1`` and ``x2`` (Lee et al.
    2018; Jacot et al. 2018; Novak et al. 2019; Arora et al. 2019), float64.

    Args:
        module: an ``nn.Sequential`` (nested) of supported layers (see
            :data:`lightning_ntk.analytic.SUPPORTED`; skips with :class:`Residual`) mapping
            (N, ...) to logits (N, C); anything else is refused by name. It is run once on
            one example to read the shapes (its parameters are not changed); a module on the
            meta device works with explicit variances (any width, no memory).
        x1, x2: inputs (N1, ...), (N2, ...), batch first, read as (N, C, *spatial); x2=None
            means x1 (the result is then exactly symmetric).
        parameterization: ``"standard"``: the weights are the trained parameters, as in
            PyTorch's layers, so this is the kernel the module's own eNTK converges to (its
            weight terms grow with each layer's fan-in: Θ' = fan_in · avg(Σ) + 1 + σ_w²
            avg(Θ); Sohl-Dickstein et al. 2020). ``"ntk"``: the same network written as
            W = σ_w/√fan_in · ω, b = σ_b β and trained in ω, β (Jacot et al.): Θ' = σ_w² avg(Σ)
            + σ_b² + σ_w² avg(Θ). The NNGP is the same for both.
        weight_var: σ_w² = fan_in · Var(W) per layer with weights. None (default): read from
            the module, which must be at PyTorch's default initialisation (kaiming-uniform
            with a = √5: U(±1/√fan_in), σ_w² = 1/3; checked, refused otherwise); a number
            for every layer; a mapping from layer names (as in ``named_modules()``); or
            ``"pytorch"`` to assume 1/3 without checking.
        bias_var: σ_b² = Var(b). None: read as above (PyTorch's default U(±1/√fan_in), σ_b² =
            1/(3 fan_in), which vanishes as the width grows); a number, a mapping, or
            ``"pytorch"``.
        max_memory: bytes (or a string such as ``"512MiB"``) for the working arrays; the
            pairs of examples are processed in tiles that fit.

    The kernels are those of Gaussian weights with these variances. PyTorch's default
    draws uniform weights: the hidden layers' pre-activations still become Gaussian as the
    width grows, but the first layer's sum runs over the fixed input dimension, so a
    uniform-initialised network's eNTK converges to these kernels up to a small
    non-Gaussian term of the first layer (see docs/analytic.md).
    """
    one_of(parameterization, "parameterization", PARAMETERIZATIONS, _OWNER)
    a = _as_input(x1, "x1")
    b = a if x2 is None else _as_input(x2, "x2")
    if b.shape[1:] != a.shape[1:]:
        raise ValueError(f"{_OWNER}: x1 and x2 must have the same shape per example, got {tuple(a.shape[1:])} and "
                         f"{tuple(b.shape[1:])}")
    budget = parse_memory(max_memory)
    program = compile_module(module, a, weight_var, bias_var)
    full = any(op.contains_pooling() for op in program.ops) and bool(program.input_spatial)
    pair_positions = program.max_positions ** 2 if full else program.max_positions
    pair_bytes = 8 * _ARRAYS_PER_PAIR * pair_positions
    side = min(int(math.isqrt(max(1, budget // pair_bytes))), max(1, int(math.isqrt(TILE_ENTRIES // pair_positions))))
    if side < 1 or pair_bytes > budget:
        raise MemoryError(f"{_OWNER}: one pair of examples needs about {format_bytes(pair_bytes)} of working memory "
                          f"({program.max_positions} positions{', pixel x pixel' if full else ''}), more than "
                          f"max_memory={format_bytes(budget)}; raise max_memory")
    n1, n2 = a.shape[0], b.shape[0]
    nngp = torch.empty(n1, n2, dtype=torch.float64)
    ntk = torch.empty(n1, n2, dtype=torch.float64)
    symmetric = x2 is None
    for i in range(0, n1, side):
        for j in range(i if symmetric else 0, n2, side):
            xa, xb = a[i:i + side], b[j:j + side]
            state = L.input_state(xa, xb, full)
            if symmetric and i == j:
                state.cov2 = state.cov1
            out = L.run(program.ops, state, parameterization, top_level=True)
            if out.spatial and out.nngp.shape[2:] and math.prod(out.spatial) == 1:
                out = L.KernelState(out.nngp.reshape(out.nngp.shape[:2]), out.ntk.reshape(out.ntk.shape[:2]),
                                    out.cov1, out.cov2, (), False)
            nngp[i:i + side, j:j + side] = out.nngp
            ntk[i:i + side, j:j + side] = out.ntk
            if symmetric and j != i:
                nngp[j:j + side, i:i + side] = out.nngp.T
                ntk[j:j + side, i:i + side] = out.ntk.T
    if symmetric:
        nngp = (nngp + nngp.T) / 2
        ntk = (ntk + ntk.T) / 2
    return AnalyticKernels(nngp, ntk, parameterization, program.layers, program.activations)
