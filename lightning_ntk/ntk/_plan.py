"""Planning: one traced forward pass on tiny batches decides how each parameter is handled.

Two forward passes (batch 2 and batch 3, built from the first probe example) record:

- every call of a module that has a per-layer rule (:mod:`._rules`), with the shapes of its
  input and output: the batch must be the first axis (the only axis that changes between
  the two passes), otherwise the module's parameters go to the generic path;
- the autograd graph: for each selected parameter, the number of graph edges that use it,
  in the whole graph and inside the hooked calls. A parameter is handled by the rules only
  if every use is inside a hooked call (a weight also used functionally, e.g.
  ``F.linear(h, emb.weight)`` or ``nn.MultiheadAttention``'s ``out_proj``, is not);
- in-place modification of a captured output or input (``ReLU(inplace=True)``), which the
  real computation then guards against by cloning;
- the number of logits C, the bytes autograd saves per example and the multiply-adds of
  the dense (Linear, Conv) layers per example, in the forward pass and in one backward pass
  to the hooked outputs (layers whose input needs a gradient), for the cost and memory
  models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

import torch
from torch import Tensor, nn

from .._modules import CONVOLUTIONS
from ._model import FunctionalModel, layer_name
from ._rules import LinearRule, Rule, rule_for


@dataclass
class Use:
    """One parameter in one module role, with the shapes of each call (batch axis dropped)."""

    module: nn.Module
    rule: Rule
    role: str
    calls: List[Tuple[torch.Size, torch.Size]]  # (x.shape[1:], y.shape[1:]) per call


@dataclass
class SlotSpec:
    """How one selected parameter (one group of it) becomes a feature."""

    name: str  # parameter name
    layer: str
    uses: List[Use]
    combine: str  # "concat" (positions of every use/call), "sum" (Vec), "materialize" (mixed)
    family: str  # "outer", "embed" or "vec"
    group: int = 0
    S: int = 1  # positions (all calls of all uses)
    D: int = 1
    O: int = 1
    mode: str = "vec"  # "patch" or "per_example" for outer/embed; "vec" otherwise


@dataclass
class Plan:
    C: int
    out_dtype: torch.dtype
    structured: List[SlotSpec]
    fallback: List[str]  # parameter names handled by torch.func
    inert: List[str]  # parameter names that do not influence the output (zero Jacobian)
    modules: Dict[nn.Module, Tuple[Rule, Tuple[str, ...]]]  # hooked modules and their roles
    clone_out: Set[nn.Module]
    clone_in: Set[nn.Module]
    saved_bytes_per_example: int
    output_bytes_per_example: int  # sum of hooked outputs per example (for K gradients)
    macs_per_example: float  # dense layers' multiply-adds of one forward pass
    bwd_macs_per_example: float  # ... of one backward pass (input gradients of dense layers)
    layers: List[str]  # every layer of the selected parameters, model order
    numel: Dict[str, int]
    reasons: Dict[str, str] = field(default_factory=dict)  # why a parameter went to torch.func


class _Recorder:
    def __init__(self, modules: Dict[nn.Module, Rule]):
        self.modules = modules
        self.calls: List[dict] = []

    def hook(self, m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        x = args[0] if args else kwargs.get("input")
        rec = {"m": m, "x": x, "y": out, "ok": isinstance(x, Tensor) and isinstance(out, Tensor)}
        if rec["ok"]:
            rec.update(
                x_shape=x.shape,
                y_shape=out.shape,
                x_node=x.grad_fn,
                y_node=out.grad_fn,
                x_version=x._version,
                y_version=out._version,
            )
        self.calls.append(rec)


def _dense_macs(m: nn.Module, x: Tensor, y: Tensor) -> float:
    """Multiply-adds of one Linear / Conv / Bilinear call (per batch)."""
    if isinstance(m, nn.Linear):
        return float(y.numel()) * m.in_features
    if isinstance(m, CONVOLUTIONS):
        k = 1
        for s in m.kernel_size:
            k *= s
        return float(y.numel()) * (m.in_channels // m.groups) * k
    return 0.0


def _traced_forward(fm: FunctionalModel, xb: Tensor, modules: Dict[nn.Module, Rule], dense: List[nn.Module]):
    """One forward pass recording the calls of ``modules``, the bytes autograd saves and the
    multiply-adds of the dense layers (``dense``: every Linear and Conv of the model, a
    forward-cost estimate for the cost model; other operations are not counted)."""
    recorder = _Recorder(modules)
    handles = [m.register_forward_hook(recorder.hook, with_kwargs=True, prepend=True) for m in modules]
    macs = [0.0, 0.0]

    def count(m: nn.Module, args: tuple, out: object) -> None:
        if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
            n = _dense_macs(m, args[0], out)
            macs[0] += n
            if args[0].requires_grad:  # a backward pass computes this layer's input gradient
                macs[1] += n

    handles += [m.register_forward_hook(count) for m in dense]
    saved = [0]

    def pack(t: Tensor) -> Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fm(xb)
    finally:
        for h in handles:
            h.remove()
    return out, recorder.calls, saved[0], macs


def _graph_edges(root, leaf_ids: Dict[int, int], stop=None) -> Tuple[Dict[int, int], Set]:
    """Edges into the AccumulateGrad node of each selected leaf, reachable from ``root``."""
    counts: Dict[int, int] = {}
    seen: Set = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if stop is not None and node is stop:
            continue
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                i = leaf_ids.get(id(var))
                if i is not None:
                    counts[i] = counts.get(i, 0) + 1
            elif nxt not in seen:
                stack.append(nxt)
    return counts, seen


def _check_independent(out2: Tensor, out3: Tensor) -> None:
    """Example 0 in a batch of 2 and in a batch of 3 must give the same logits."""
    a, b = out2[0].detach(), out3[0].detach()
    scale = float(torch.maximum(a.abs().max(), b.abs().max()))
    if float((a - b).abs().max()) > 1e-3 * scale + 1e-6:
        raise ValueError(
            "empirical_ntk: the model's output for one example changes with the other examples in the batch "
            "(e.g. a custom normalisation over the batch, attention across the batch axis, or a module in training "
            "mode); the eNTK is defined per example. Put the model in eval mode, or make examples independent."
        )


def make_plan(fm: FunctionalModel, x1: Tensor, check_independence: bool = True) -> Plan:
    model = fm.model
    name_of = {id(p): n for n, p in zip(fm.names, fm.params)}
    leaf_ids = {id(t): i for i, t in enumerate(fm.leaves.values())}
    names = list(fm.leaves)

    # candidate modules: a rule applies and at least one role is a selected parameter
    candidates: Dict[nn.Module, Rule] = {}
    for _, m in model.named_modules():
        if m in candidates:
            continue
        rule = rule_for(m)
        if rule is None:
            continue
        if any(id(m._parameters.get(r)) in name_of for r in rule.roles if m._parameters.get(r) is not None):
            candidates[m] = rule

    dense = [m for m in model.modules() if isinstance(m, (nn.Linear, *CONVOLUTIONS))]
    idx = torch.arange(3, device=x1.device) % x1.shape[0]
    out2, calls2, saved2, macs2 = _traced_forward(fm, x1[idx[:2]], candidates, dense)
    C = out2.shape[1]
    global_counts, reachable = _graph_edges(out2.grad_fn, leaf_ids)

    # in-place modification after the call (checked before anything else touches the graph)
    clone_out: Set[nn.Module] = set()
    clone_in: Set[nn.Module] = set()
    for c in calls2:
        if c["ok"]:
            if c["y"]._version != c["y_version"]:
                clone_out.add(c["m"])
            if c["x"]._version != c["x_version"]:
                clone_in.add(c["m"])

    local_counts: Dict[int, int] = {}
    for c in calls2:
        if c["ok"] and c["y_node"] is not None and c["y_node"] in reachable:
            counts, _ = _graph_edges(c["y_node"], leaf_ids, stop=c["x_node"])
            for i, v in counts.items():
                local_counts[i] = local_counts.get(i, 0) + v

    out3, calls3, saved3, macs3 = _traced_forward(fm, x1[idx], candidates, dense)
    if check_independence:
        _check_independent(out2, out3)
    out_bytes3 = sum(c["y"].numel() * c["y"].element_size() for c in calls3 if c["ok"])
    out_bytes2 = sum(c["y"].numel() * c["y"].element_size() for c in calls2 if c["ok"])
    del out2, out3

    # per module: are all its calls batch-first?
    per_module2: Dict[nn.Module, List[dict]] = {}
    per_module3: Dict[nn.Module, List[dict]] = {}
    for c in calls2:
        per_module2.setdefault(c["m"], []).append(c)
    for c in calls3:
        per_module3.setdefault(c["m"], []).append(c)
    module_ok: Dict[nn.Module, str] = {}
    module_calls: Dict[nn.Module, List[Tuple[torch.Size, torch.Size]]] = {}
    for m in candidates:
        c2, c3 = per_module2.get(m, []), per_module3.get(m, [])
        reason = ""
        if len(c2) != len(c3):
            reason = "called a different number of times for different batch sizes"
        shapes = []
        for a, b in zip(c2, c3):
            if not (a["ok"] and b["ok"]):
                reason = "called with a non-tensor input or output"
                break
            xa, xb_, ya, yb = a["x_shape"], b["x_shape"], a["y_shape"], b["y_shape"]
            if not (
                len(xa) >= 1
                and len(ya) >= 1
                and xa[0] == 2
                and xb_[0] == 3
                and ya[0] == 2
                and yb[0] == 3
                and xa[1:] == xb_[1:]
                and ya[1:] == yb[1:]
            ):
                reason = f"called on a tensor whose first axis is not the batch (shapes {tuple(xa)} -> {tuple(ya)})"
                break
            if isinstance(candidates[m], LinearRule) and len(xa) < 2:
                reason = "Linear called on unbatched input"
                break
            shapes.append((xa[1:], ya[1:]))
        module_ok[m] = reason
        module_calls[m] = shapes

    # per parameter: rules or torch.func
    uses_of: Dict[str, List[Use]] = {}
    roles_of: Dict[nn.Module, List[str]] = {}
    for m, rule in candidates.items():
        for r in rule.roles:
            p = m._parameters.get(r)
            if p is None or id(p) not in name_of:
                continue
            uses_of.setdefault(name_of[id(p)], []).append(Use(m, rule, r, module_calls.get(m, [])))
            roles_of.setdefault(m, []).append(r)

    structured: List[SlotSpec] = []
    fallback: List[str] = []
    inert: List[str] = []
    reasons: Dict[str, str] = {}
    used_modules: Dict[nn.Module, Set[str]] = {}
    for i, n in enumerate(names):
        g = global_counts.get(i, 0)
        uses = uses_of.get(n, [])
        if g == 0:
            reasons[n] = "does not influence the output (zero Jacobian)"
            inert.append(n)
            continue
        bad = [module_ok[u.module] for u in uses if module_ok[u.module]]
        if not uses:
            reasons[n] = "no per-layer rule for the module using it"
            fallback.append(n)
        elif bad:
            reasons[n] = bad[0]
            fallback.append(n)
        elif local_counts.get(i, 0) != g:
            reasons[n] = "used outside the modules that own it (functional use or unsupported module)"
            fallback.append(n)
        else:
            structured.extend(_slots_for(n, uses))
            for u in uses:
                used_modules.setdefault(u.module, set()).add(u.role)

    modules = {m: (candidates[m], tuple(sorted(r))) for m, r in used_modules.items()}
    layers: List[str] = []
    for n in names:
        ln = layer_name(n)
        if ln not in layers:
            layers.append(ln)
    return Plan(
        C=C,
        out_dtype=fm.dtype,
        structured=structured,
        fallback=fallback,
        inert=inert,
        modules=modules,
        clone_out={m for m in clone_out if m in modules},
        clone_in={m for m in clone_in if m in modules},
        saved_bytes_per_example=max(saved3 - saved2, 0),
        output_bytes_per_example=max(out_bytes3 - out_bytes2, 0),
        macs_per_example=max(macs3[0] - macs2[0], 0.0),
        bwd_macs_per_example=max(macs3[1] - macs2[1], 0.0),
        layers=layers,
        numel=dict(fm.numel),
        reasons=reasons,
    )


def _slots_for(name: str, uses: List[Use]) -> List[SlotSpec]:
    layer = layer_name(name)
    fams = []
    dims = []
    for u in uses:
        fam = u.rule.family if u.role == "weight" else "vec"
        fams.append(fam)
        per_call = [u.rule.dims(u.module, torch.Size((1,)) + xs, torch.Size((1,)) + ys, u.role) for xs, ys in u.calls]
        dims.append(per_call)
    family = fams[0]
    numel = uses[0].module._parameters[uses[0].role].numel()
    if all(f == "vec" for f in fams):
        return [SlotSpec(name, layer, uses, "sum", "vec", O=numel)]
    if all(f == family for f in fams):
        # factored uses combine by concatenating positions when every call has the same
        # group structure and the same (D, O) per group
        signature = {tuple((d, o) for _, d, o in call) for per_call in dims for call in per_call}
        if len(signature) == 1:  # (no call at all means no contribution: global count 0)
            groups = len(next(iter(signature)))
            specs = []
            for gi in range(groups):
                S = sum(call[gi][0] for per_call in dims for call in per_call)
                D, O = next(iter(signature))[gi]
                specs.append(SlotSpec(name, layer, uses, "concat", family, group=gi, S=max(S, 1), D=D, O=O, mode=""))
            return specs
    return [SlotSpec(name, layer, uses, "materialize", "vec", O=numel)]
