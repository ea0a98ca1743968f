"""The structured engine: features of every rule-covered parameter from one forward pass and
K backward passes over a block of examples.

Hooks capture each covered call's input; one backward pass per logit (K = C, or one pass
with all-ones for the pseudo kind; vmapped into one pass for networks without
convolutions) gives the output gradients ``d f_k / d y`` of every call at once, for the
whole block (the examples are independent). No per-example
gradient is formed unless the cost model says it is the cheaper contraction (early
convolutions with many output locations).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._features import (
    Feature,
    Vec,
    acc_elements,
    concat_positions,
    embed_costs,
    materialize,
    outer_costs,
    patch_temp_elements,
)
from ._model import FunctionalModel
from ._plan import Plan, SlotSpec
from ._rules import ConvRule


def choose_modes(plan: Plan, kind: str, K: int, n1: int, n2: int, symmetric: bool) -> None:
    """Per factored slot: per-example gradients or the patch contraction, whichever costs less."""
    for spec in plan.structured:
        if spec.family == "outer":
            per_example, patch = outer_costs(spec.S, spec.D, spec.O, K, kind, n1, n2, symmetric)
        elif spec.family == "embed":
            per_example, patch = embed_costs(spec.S, spec.D, spec.O, K, kind, n1, n2, symmetric)
        else:
            spec.mode = "vec"
            continue
        spec.mode = "patch" if patch <= per_example else "per_example"


def slot_cost(spec: SlotSpec, kind: str, K: int, n1: int, n2: int, symmetric: bool) -> float:
    from ._features import kind_width

    if spec.family == "outer":
        return min(outer_costs(spec.S, spec.D, spec.O, K, kind, n1, n2, symmetric))
    if spec.family == "embed":
        return min(embed_costs(spec.S, spec.D, spec.O, K, kind, n1, n2, symmetric))
    pairs = n1 * n2 * (0.5 if symmetric else 1.0)
    return pairs * kind_width(kind, K) * spec.O


class StructuredSource:
    """Features of the rule-covered slots of a plan."""

    def __init__(self, fm: FunctionalModel, plan: Plan, kind: str, K: int):
        self.fm, self.plan, self.kind, self.K = fm, plan, kind, K
        # functorch has no true batching rule for convolution backward (it loops over the
        # batched dimension), so networks with convolutions use K plain passes
        self.batched_backward = not any(isinstance(rule, ConvRule) for rule, _ in plan.modules.values())
        self.slots: List[Tuple[int, str]] = [(i, s.layer) for i, s in enumerate(plan.structured)]
        item = torch.empty((), dtype=fm.dtype).element_size()
        self.itemsize = item
        feat = 0
        build = 0
        for s in plan.structured:
            if s.mode == "patch":
                feat += (s.S * s.D + K * s.S * s.O) * item if s.family == "outer" else (s.S * 8 + K * s.S * s.O * item)
            elif s.mode == "per_example":
                feat += K * s.D * s.O * item
                build = max(build, (s.S * s.D + K * s.S * s.O) * item)
            else:
                feat += K * s.O * item
        self.feature_bytes_per_example = feat
        # forward graph + the K output gradients of each hooked call (and the batched backward
        # pass's temporaries) + the largest build temporary
        self.activation_bytes_per_example = (
            plan.saved_bytes_per_example + 3 * K * plan.output_bytes_per_example + 2 * build
        )

    def temp_bytes(self, b1: int, b2: int) -> int:
        worst = 0
        for s in self.plan.structured:
            if s.mode == "patch":
                worst = max(worst, patch_temp_elements(s.S, s.S, self.K, self.kind, b1, b2))
        return (worst + acc_elements(self.kind, self.K, b1, b2)) * self.itemsize

    # ------------------------------------------------------------------------------------
    def compute(self, xb: Tensor) -> Dict[int, Feature]:
        plan = self.plan
        B = xb.shape[0]
        calls: List[Tuple[nn.Module, Dict[str, Tensor], Tensor]] = []

        def hook(m: nn.Module, args: tuple, kwargs: dict, out: Tensor):
            rule, roles = plan.modules[m]
            x = args[0] if args else kwargs["input"]
            if m in plan.clone_in:
                x = x.detach().clone()
            calls.append((m, rule.capture(m, x, out, roles), out))
            if m in plan.clone_out:
                return out.clone()
            return None

        handles = [m.register_forward_hook(hook, with_kwargs=True, prepend=True) for m in plan.modules]
        try:
            out = self.fm(xb)
        finally:
            for h in handles:
                h.remove()

        grads = self._output_grads(out, [y for _, _, y in calls])
        del out
        per_module: Dict[nn.Module, List[Tuple[Dict[str, Tensor], Tensor]]] = {}
        for (m, rec, _), g in zip(calls, grads):
            per_module.setdefault(m, []).append((rec, g))
        calls.clear()
        del grads

        features: Dict[int, Feature] = {}
        cache: Dict[Tuple[int, str], List[List[Feature]]] = {}
        for i, spec in enumerate(plan.structured):
            uses: List[List[Feature]] = []  # per use and call: one feature per group
            for u in spec.uses:
                key = (id(u.module), u.role)
                if key not in cache:
                    cache[key] = [u.rule.features(u.module, rec, g, u.role) for rec, g in per_module.get(u.module, [])]
                uses.extend(cache[key])
            features[i] = self._combine(spec, uses, B)
        return features

    def _combine(self, spec: SlotSpec, uses: List[List[Feature]], B: int) -> Feature:
        if spec.combine == "concat":
            f = concat_positions([u[spec.group] for u in uses])
            return materialize(f) if spec.mode == "per_example" else f
        if spec.combine == "sum":
            return concat_positions([u[0] for u in uses])
        # mixed layouts (e.g. an embedding table tied to an output layer): per-example
        # Jacobians in the parameter's layout, summed over uses
        total: Optional[Tensor] = None
        for u in uses:
            parts = [materialize(f).data for f in u]
            v = parts[0] if len(parts) == 1 else _cat_groups(parts, B, self.K)
            total = v.clone() if total is None else total.add_(v)
        assert total is not None
        return Vec(total)

    def _output_grads(self, out: Tensor, ys: List[Tensor]) -> List[Tensor]:
        """d f_k / d y for every captured call y, stacked as (B, K, *y.shape[1:]).

        One vmapped backward pass over the K one-hot output directions
        (``is_grads_batched``: a few large products instead of K passes of small ones) for
        networks without convolutions; K plain backward passes otherwise, and as the
        fallback when an operation has no batching rule.
        """
        if self.batched_backward and self.K > 1:
            try:
                return self._output_grads_batched(out, ys)
            except (RuntimeError, NotImplementedError):
                self.batched_backward = False
        return self._output_grads_loop(out, ys)

    def _output_grads_batched(self, out: Tensor, ys: List[Tensor]) -> List[Tensor]:
        B, C = out.shape
        live = [i for i, y in enumerate(ys) if y.requires_grad]
        grads: List[Optional[Tensor]] = [None] * len(ys)
        if live:
            go = torch.zeros((C, B, C), dtype=out.dtype, device=out.device)
            ar = torch.arange(C, device=out.device)
            go[ar, :, ar] = 1.0
            gs = torch.autograd.grad(out, [ys[i] for i in live], go, retain_graph=True, allow_unused=True, is_grads_batched=True)
            for i, g in zip(live, gs):
                if g is not None:
                    grads[i] = g.transpose(0, 1).contiguous()
        return [
            g if g is not None else torch.zeros((B, C) + tuple(y.shape[1:]), dtype=y.dtype, device=y.device)
            for g, y in zip(grads, ys)
        ]

    def _output_grads_loop(self, out: Tensor, ys: List[Tensor]) -> List[Tensor]:
        B, C = out.shape
        K = self.K
        live = [i for i, y in enumerate(ys) if y.requires_grad]
        per_k: List[List[Optional[Tensor]]] = [[] for _ in ys]
        inputs = [ys[i] for i in live]
        for k in range(K if inputs else 0):
            if self.kind == "pseudo":
                go = torch.ones_like(out)
            else:
                go = torch.zeros_like(out)
                go[:, k] = 1.0
            gs = torch.autograd.grad(out, inputs, go, retain_graph=k < K - 1, allow_unused=True)
            for i, g in zip(live, gs):
                per_k[i].append(g)
        grads = []
        for y, gk in zip(ys, per_k):
            if any(g is not None for g in gk):  # None: logit k does not depend on this call
                grads.append(torch.stack([torch.zeros_like(y) if g is None else g for g in gk], dim=1))
            else:  # the call does not influence the output (or runs without grad)
                grads.append(torch.zeros((B, K) + tuple(y.shape[1:]), dtype=y.dtype, device=y.device))
        return grads


def _cat_groups(parts: List[Tensor], B: int, K: int) -> Tensor:
    """Per-group per-example Jacobians (B, K, O_g * D) -> (B, K, O * D) in weight layout."""
    return torch.cat([p.view(B, K, -1) for p in parts], dim=2)
