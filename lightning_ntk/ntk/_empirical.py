"""``empirical_ntk``: the exact empirical NTK on a probe set, fast and bounded in memory.

Definitions (Jacot et al. 2018; kinds as in neural-tangents): with J(x) the Jacobian of
the C logits with respect to the selected parameters,

- ``full``      Theta[n, m, a, b] = J_a(x1_n) . J_b(x2_m)                  (N1, N2, C, C)
- ``trace``     (1/C) sum_c Theta[n, m, c, c]                               (N1, N2)
- ``diagonal``  Theta[n, m, c, c]                                           (N1, N2, C)
- ``pseudo``    (1/C) (sum_a J_a(x1_n)) . (sum_b J_b(x2_m))  (Mohamadi et al. 2023)  (N1, N2)

Methods: ``structured`` (per-layer rules from hooks, Novak et al. 2022 structured
derivatives, with ``torch.func`` for uncovered parameters), ``jacobian`` (torch.func
per-example Jacobians, contracted), ``ntvp`` (NTK-vector products). ``auto`` picks the
cheapest by a cost model in multiply-adds for the shapes at hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._args import one_of
from .._hygiene import _cuda_devices
from ._cost import choose_modes, example_pairs, kind_width, slot_cost
from ._jacobian import JacobianSource, chunk_parameters
from ._memory import NTKMemoryError, format_bytes, resolve_max_memory
from ._model import (
    FunctionalModel,
    ParamsArg,
    check_autograd,
    check_modes,
    layer_name,
    prepare_input,
    resolve_dtype,
    select_parameters,
)
from ._ntvp import ntvp_kernel, ntvp_plan
from ._plan import Plan, make_plan
from ._structured import StructuredSource
from ._tiling import minimum_bytes, plan_tiling, run_source

KINDS = ("full", "trace", "diagonal", "pseudo")
METHODS = ("auto", "structured", "jacobian", "ntvp")

# rough throughput of each method relative to plain matrix products (vmap'd transforms and
# forward-mode AD run below BLAS speed), and a fixed cost per call in multiply-adds (the
# transforms' Python overhead, which decides for tiny models); only used by method="auto"
_EFFICIENCY = {"structured": 1.0, "jacobian": 1.5, "ntvp": 2.0}
_OVERHEAD = {"structured": 0.0, "jacobian": 5e7, "ntvp": 5e7}
#: parameter name -> contraction order, overriding the cost model (tests and
#: ``benchmarks/ntk.py --choices`` time each order); empty in normal use
_FORCE_MODES: Dict[str, str] = {}


@dataclass(frozen=True)
class NTKMemoryEstimate:
    """What :func:`empirical_ntk` would need, from :func:`estimate_ntk_memory`.

    ``output_bytes``: the returned kernel(s); ``working_bytes``: extra memory of the tiling
    it would use under ``max_memory``; ``minimum_bytes``: output plus the smallest tiling
    (one example per block); ``fits``: ``minimum_bytes <= max_memory``.
    """

    output_bytes: int
    working_bytes: int
    minimum_bytes: int
    max_memory: int
    method: str
    fits: bool
    shape: Tuple[int, ...]


class _Setup:
    """Arguments checked, the plan made, the method chosen, the tiling sized."""

    def __init__(
        self,
        model: nn.Module,
        x1: Tensor,
        x2: Optional[Tensor],
        kind: str,
        params: ParamsArg,
        method: str,
        per_layer: bool,
        dtype: Optional[torch.dtype],
        max_memory: Union[None, int, str],
    ):
        one_of(kind, "kind", KINDS, "empirical_ntk")
        one_of(method, "method", METHODS, "empirical_ntk")
        if not isinstance(model, nn.Module):
            raise TypeError(f"empirical_ntk: model must be a torch.nn.Module, got {type(model).__name__}")
        check_autograd()
        random = check_modes(model)
        self.model, self.kind, self.per_layer = model, kind, bool(per_layer)
        selected = select_parameters(model, params)
        self.device = selected[0][1].device
        self.dtype = resolve_dtype(dtype, selected)
        self.max_memory = resolve_max_memory(max_memory, self.device)
        self.symmetric = x2 is None or x2 is x1
        self.x1 = prepare_input(x1, "x1", self.device, self.dtype)
        self.x2 = None if self.symmetric else prepare_input(x2, "x2", self.device, self.dtype)
        if self.x2 is not None and self.x2.shape[1:] != self.x1.shape[1:]:
            raise ValueError(
                f"empirical_ntk: x1 and x2 must hold examples of the same shape, got {tuple(self.x1.shape[1:])} "
                f"and {tuple(self.x2.shape[1:])}"
            )
        self.fm = FunctionalModel(model, selected, self.dtype)
        self.plan: Plan = make_plan(self.fm, self.x1, check_independence=not random)
        self.C = self.plan.C
        self.K = 1 if kind == "pseudo" else self.C
        self.n1 = self.x1.shape[0]
        self.n2 = self.n1 if self.symmetric else self.x2.shape[0]  # type: ignore[union-attr]
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.layers = self.plan.layers
        self.shape = self._shape()
        n_out = len(self.layers) if self.per_layer else 1
        self.output_bytes = _numel(self.shape) * self.itemsize * n_out
        choose_modes(self.plan, kind, self.K, self.n1, self.n2, self.symmetric, _FORCE_MODES or None)
        self.auto = method == "auto"
        self.method = self._choose(method)
        self.steps, self.working_bytes, self.minimum_bytes = self._size_steps()

    def _rerun(self, method: str) -> Union[Tensor, Dict[str, Tensor]]:
        """Start over with another method (auto's pick turned out unsupported by the model)."""
        self.method, self.auto = method, False
        self.steps, self.working_bytes, self.minimum_bytes = self._size_steps()
        return self.run()

    # ------------------------------------------------------------------------------------
    def _shape(self) -> Tuple[int, ...]:
        if self.kind == "full":
            return (self.n1, self.n2, self.C, self.C)
        if self.kind == "diagonal":
            return (self.n1, self.n2, self.C)
        return (self.n1, self.n2)

    def costs(self) -> Dict[str, float]:
        """Multiply-adds of each method (scaled by its rough efficiency), for the shapes at hand.

        Per-layer terms from ``_cost.py`` (Novak et al. 2022): structured = forward pass +
        K backward passes to the hooked outputs + each slot's cheapest contraction order;
        jacobian = forward + K backward passes with per-example weight gradients + the Gram
        of all per-example Jacobians; ntvp = about N1 N2 K / 2 forward-and-backward passes.
        """
        plan, K, kind = self.plan, self.K, self.kind
        n1, n2, sym = self.n1, self.n2, self.symmetric
        examples = n1 + (0 if sym else n2)
        pairs = example_pairs(n1, n2, sym)
        kc = kind_width(kind, K)
        numel = plan.numel
        p_all = sum(numel.values())
        p_fb = sum(numel[n] for n in plan.fallback)
        # multiply-adds of one forward pass: the dense layers, at least one per parameter
        fp = max(plan.macs_per_example, float(p_all))
        jac_all = examples * fp * (1 + 2 * K) + pairs * kc * p_all
        costs = {"jacobian": jac_all, "ntvp": 2 * fp * K * n2 * (1 + (n1 / 2 if sym else n1))}
        structured = sum(slot_cost(s, kind, K, n1, n2, sym) for s in plan.structured)
        if plan.structured:
            structured += examples * (fp + K * plan.bwd_macs_per_example)
        if plan.fallback:  # the torch.func path for the parameters no rule covers
            structured += examples * fp * (1 + 2 * K) + pairs * kc * p_fb + _OVERHEAD["jacobian"] / _EFFICIENCY["jacobian"]
        costs["structured"] = structured
        return {m: c * _EFFICIENCY[m] + _OVERHEAD[m] for m, c in costs.items()}

    def _choose(self, method: str) -> str:
        if method != "auto":
            return method
        costs = self.costs()
        return min(("structured", "jacobian", "ntvp"), key=lambda m: costs[m])

    def _size_steps(self):
        budget = self.max_memory - self.output_bytes
        if budget <= 0:
            raise NTKMemoryError(self._message(self.output_bytes, "for the output alone"))
        n_acc = len(self.layers) if self.per_layer else 1
        steps: List[tuple] = []
        working = 0
        minimum = 0
        if self.method == "ntvp":
            groups = self._layer_groups(list(self.fm.leaves)) if self.per_layer else [list(self.fm.leaves)]
            act = self.plan.saved_bytes_per_example + self.plan.output_bytes_per_example
            for names in groups:
                numel = sum(self.plan.numel[n] for n in names)
                sized = ntvp_plan(self.n1, self.n2, self.K, numel, self.itemsize, act, budget)
                small = 3 * numel * self.itemsize + 2 * act
                minimum = max(minimum, small)
                if sized is None:
                    raise NTKMemoryError(self._message(self.output_bytes + small, "at least"))
                vecs, rows = sized
                working = max(working, 3 * vecs * numel * self.itemsize + vecs * (rows + 1) * act)
                steps.append(("ntvp", names, vecs, rows))
            return steps, working, self.output_bytes + minimum

        sources: List = []
        if self.method == "structured" and self.plan.structured:
            sources.append(StructuredSource(self.fm, self.plan, self.kind, self.K))
        torch_func_names = list(self.fm.leaves) if self.method == "jacobian" else list(self.plan.fallback)
        if self.method == "jacobian":
            torch_func_names = [n for n in torch_func_names if n not in self.plan.inert]
        if torch_func_names:
            per_example = self.itemsize * (self.n1 + (0 if self.symmetric else self.n2))
            max_numel = max(1, budget // (2 * per_example * self.K))
            for chunk in chunk_parameters(torch_func_names, self.plan.numel, max_numel):
                sources.append(
                    JacobianSource(
                        self.fm, chunk, self.kind, self.K, self.plan.saved_bytes_per_example, self.plan.macs_per_example
                    )
                )
        for src in sources:
            n_src = len({layer for _, layer in src.slots}) if self.per_layer else 1
            tiling = plan_tiling(src, self.kind, self.K, self.n1, self.n2, self.symmetric, budget, min(n_src, n_acc))
            small = minimum_bytes(src, self.kind, self.K)
            minimum = max(minimum, small)
            if tiling is None:
                raise NTKMemoryError(self._message(self.output_bytes + small, "at least"))
            working = max(working, tiling.working_bytes)
            steps.append(("features", src, tiling))
        return steps, working, self.output_bytes + minimum

    def _layer_groups(self, names: Sequence[str]) -> List[List[str]]:
        groups: Dict[str, List[str]] = {}
        for n in names:
            groups.setdefault(layer_name(n), []).append(n)
        return list(groups.values())

    def _message(self, need: int, what: str) -> str:
        layers = f" x {len(self.layers)} layers (per_layer=True)" if self.per_layer else ""
        tips = []
        if self.kind in ("full", "diagonal"):
            factor = self.C * self.C if self.kind == "full" else self.C
            tips.append(f"kind='trace' (an (N1, N2) kernel, {factor}x smaller than {self.kind!r} here)")
        if self.per_layer:
            tips.append("per_layer=False")
        tips.append("a smaller probe (fewer examples)")
        tips.append("raise max_memory (bytes or a string such as '8GB')")
        return (
            f"empirical_ntk: the {self.kind!r} kernel of shape {self.shape}{layers} in {self.dtype} needs "
            f"{format_bytes(need)} {what}, more than max_memory={format_bytes(self.max_memory)}. "
            f"Use {', '.join(tips[:-1])}, or {tips[-1]}."
        )

    # ------------------------------------------------------------------------------------
    def run(self) -> Union[Tensor, Dict[str, Tensor]]:
        keys = self.layers if self.per_layer else [""]
        outs = {k: torch.zeros(self.shape, dtype=self.dtype, device=self.device) for k in keys}
        for step in self.steps:
            if step[0] == "ntvp":
                _, names, vecs, rows = step
                key = layer_name(names[0]) if self.per_layer else ""
                try:
                    ntvp_kernel(self.fm, names, self.x1, self.x2, self.kind, self.C, outs[key], vecs, rows)
                except NotImplementedError as err:
                    if not self.auto:
                        raise RuntimeError(
                            "empirical_ntk: method='ntvp' needs forward-mode AD (torch.func.jvp) through every "
                            f"operation of the model, and one does not support it ({str(err).splitlines()[0]}); "
                            "use method='structured' or method='jacobian'"
                        ) from err
                    return self._rerun("structured")
            else:
                _, src, tiling = step
                run_source(src, self.x1, self.x2, self.kind, self.K, outs, tiling)
        if self.kind in ("trace", "pseudo"):
            for t in outs.values():
                t.div_(self.C)
        return outs if self.per_layer else outs[""]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    kind: str = "full",
    params: ParamsArg = None,
    method: str = "auto",
    per_layer: bool = False,
    dtype: Optional[torch.dtype] = None,
    max_memory: Union[None, int, str] = None,
) -> Union[Tensor, Dict[str, Tensor]]:
    """The empirical neural tangent kernel Theta(x1, x2) = J(x1) J(x2)^T, exactly.

    Args:
        model: maps a batch (N, ...) to logits (N, C), or (N,) read as C = 1. Called in the
            mode the caller left it in (use ``model.eval()``: BatchNorm with batch
            statistics is refused); its parameters, ``.grad``, mode and the global RNG
            state are left untouched.
        x1, x2: examples, batch first. ``x2=None`` means x2 = x1 and only the blocks on and
            above the diagonal are computed (the result is exactly symmetric).
        kind: ``"full"`` (N1, N2, C, C), ``"trace"`` (N1, N2) mean over logits,
            ``"diagonal"`` (N1, N2, C), ``"pseudo"`` (N1, N2) = (1/C) grad(sum_c f_c) .
            grad(sum_c f_c) (Mohamadi et al. 2023).
        params: parameters or names to differentiate (default: all with requires_grad);
            a tied parameter counts once, with the sum of all its uses.
        method: ``"structured"``, ``"jacobian"``, ``"ntvp"`` or ``"auto"`` (cost model).
        per_layer: return ``{layer name: kernel}``, one kernel per module owning selected
            parameters; the kernels sum to the total.
        dtype: dtype of the computation and of the result (e.g. ``torch.float64``); the
            model is evaluated with parameters, buffers and floating inputs cast to it
            (the model itself is not converted). Default: the parameters' dtype.
        max_memory: budget in bytes or a string such as ``"2GB"``/``"512MiB"``; default half
            of the available memory (CPU) or 80 % of the free device memory (CUDA).
            Work is tiled over example blocks and parameter chunks to stay within it.

    Raises:
        NTKMemoryError: before computing, when even the output (or the smallest tiling)
            does not fit in ``max_memory``.
    """
    with torch.random.fork_rng(devices=_cuda_devices(model)), torch.enable_grad():
        setup = _Setup(model, x1, x2, kind, params, method, per_layer, dtype, max_memory)
        return setup.run()


def estimate_ntk_memory(
    model: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    kind: str = "full",
    params: ParamsArg = None,
    method: str = "auto",
    per_layer: bool = False,
    dtype: Optional[torch.dtype] = None,
    max_memory: Union[None, int, str] = None,
) -> NTKMemoryEstimate:
    """Memory :func:`empirical_ntk` would need for these arguments, without computing it.

    Runs the planning passes (two forward passes on 2 and 3 copies of the first example).
    Never raises :class:`NTKMemoryError`: check ``fits`` instead.
    """
    with torch.random.fork_rng(devices=_cuda_devices(model)), torch.enable_grad():
        try:
            setup = _Setup(model, x1, x2, kind, params, method, per_layer, dtype, max_memory)
        except NTKMemoryError:
            unlimited = _Setup(model, x1, x2, kind, params, method, per_layer, dtype, 2**62)
            budget = resolve_max_memory(max_memory, unlimited.device)
            return NTKMemoryEstimate(
                output_bytes=unlimited.output_bytes,
                working_bytes=unlimited.minimum_bytes - unlimited.output_bytes,
                minimum_bytes=unlimited.minimum_bytes,
                max_memory=budget,
                method=unlimited.method,
                fits=False,
                shape=unlimited.shape,
            )
    return NTKMemoryEstimate(
        output_bytes=setup.output_bytes,
        working_bytes=setup.working_bytes,
        minimum_bytes=setup.minimum_bytes,
        max_memory=setup.max_memory,
        method=setup.method,
        fits=setup.minimum_bytes <= setup.max_memory,
        shape=setup.shape,
    )
