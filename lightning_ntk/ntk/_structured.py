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

from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._cost import slot_splits
from ._features import (
    Feature,
    Vec,
    acc_elements,
    concat_positions,
    materialize,
    patch_temp_elements,
)
from ._model import FunctionalModel
from ._plan import Plan, SlotSpec
from ._rules import ConvRule
from ._tiling import WorkModel


class StructuredSource:
    """Features of the rule-covered slots of a plan (modes chosen by ``_cost.choose_modes``)."""

    def __init__(self, fm: FunctionalModel, plan: Plan, kind: str, K: int):
        self.fm, self.plan, self.kind, self.K = fm, plan, kind, K
        # functorch has no true batching rule for convolution backward (it loops over the
        # batched dimension), so networks with convolutions use K plain passes
        self.batched_backward = not any(isinstance(rule, ConvRule) for rule, _ in plan.modules.values())
        self.slots: List[Tuple[int, str]] = [(i, s.layer) for i, s in enumerate(plan.structured)]
        self.itemsize = torch.empty((), dtype=fm.dtype).element_size()

    def work(self) -> WorkModel:
        """Multiply-adds by what they scale with, for the modes chosen (``_cost.py``)."""
        per_direction = self.plan.bwd_macs_per_example
        per_pair = per_pair_direction = 0.0
        for s in self.plan.structured:
            sp = slot_splits(s, self.kind, self.K)[s.mode]
            per_direction += sp.per_direction
            per_pair += sp.per_pair
            per_pair_direction += sp.per_pair_direction
        return WorkModel(self.plan.macs_per_example, per_direction, per_pair, per_pair_direction, len(self.slots))

    def feature_bytes(self, kd: int) -> int:
        """Bytes of one example's features for ``kd`` output directions."""
        item = self.itemsize
        feat = 0
        for s in self.plan.structured:
            if s.mode in ("patch", "patch_h"):
                feat += (s.S * s.D + kd * s.S * s.O) * item if s.family == "outer" else (s.S * 8 + kd * s.S * s.O * item)
            elif s.mode == "per_example":
                feat += kd * s.D * s.O * item
            else:
                feat += kd * s.O * item
        return feat

    def activation_bytes(self, kd: int) -> int:
        """Per example: the forward graph, the ``kd`` output gradients of each hooked call
        (and the batched backward pass's temporaries), the largest per-example build."""
        build = 0
        for s in self.plan.structured:
            if s.mode == "per_example":
                build = max(build, (s.S * s.D + kd * s.S * s.O) * self.itemsize)
        return self.plan.saved_bytes_per_example + 3 * kd * self.plan.output_bytes_per_example + 2 * build

    def temp_bytes(self, b1: int, b2: int, kd: int) -> int:
        worst = 0
        for s in self.plan.structured:
            if s.mode in ("patch", "patch_h"):
                worst = max(worst, patch_temp_elements(s.S, s.S, kd, s.O, self.kind, s.mode, b1, b2))
        return (worst + acc_elements(self.kind, kd, b1, b2)) * self.itemsize

    # ------------------------------------------------------------------------------------
    def compute(self, xb: Tensor, dirs: Optional[Tuple[int, int]] = None) -> Dict[int, Feature]:
        """Features of the examples ``xb`` for output directions ``dirs`` (default: all K)."""
        plan = self.plan
        dirs = (0, self.K) if dirs is None else dirs
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

        grads = self._output_grads(out, [y for _, _, y in calls], dirs)
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
            features[i] = self._combine(spec, uses, B, dirs[1] - dirs[0])
        return features

    def _combine(self, spec: SlotSpec, uses: List[List[Feature]], B: int, kd: int) -> Feature:
        if spec.combine == "concat":
            f = concat_positions([u[spec.group] for u in uses])
            return materialize(f) if spec.mode == "per_example" else replace(f, order=spec.mode)
        if spec.combine == "sum":
            return concat_positions([u[0] for u in uses])
        # mixed layouts (e.g. an embedding table tied to an output layer): per-example
        # Jacobians in the parameter's layout, summed over uses
        total: Optional[Tensor] = None
        for u in uses:
            parts = [materialize(f).data for f in u]
            v = parts[0] if len(parts) == 1 else _cat_groups(parts, B, kd)
            total = v.clone() if total is None else total.add_(v)
        assert total is not None
        return Vec(total)

    def _output_grads(self, out: Tensor, ys: List[Tensor], dirs: Tuple[int, int]) -> List[Tensor]:
        """d f_k / d y for every captured call y and k in ``dirs``, as (B, kd, *y.shape[1:]).

        One vmapped backward pass over the one-hot output directions (``is_grads_batched``:
        a few large products instead of kd passes of small ones) for networks without
        convolutions; one plain backward pass per direction otherwise, and as the fallback
        when an operation has no batching rule. Each direction's gradients are written into
        one preallocated tensor per call (no stacking copy).
        """
        if self.batched_backward and dirs[1] - dirs[0] > 1 and self.kind != "pseudo":
            try:
                return self._output_grads_batched(out, ys, dirs)
            except (RuntimeError, NotImplementedError):
                self.batched_backward = False
        return self._output_grads_loop(out, ys, dirs)

    def _output_grads_batched(self, out: Tensor, ys: List[Tensor], dirs: Tuple[int, int]) -> List[Tensor]:
        B, C = out.shape
        kd = dirs[1] - dirs[0]
        live = [i for i, y in enumerate(ys) if y.requires_grad]
        grads: List[Optional[Tensor]] = [None] * len(ys)
        if live:
            go = torch.zeros((kd, B, C), dtype=out.dtype, device=out.device)
            ar = torch.arange(kd, device=out.device)
            go[ar, :, ar + dirs[0]] = 1.0
            gs = torch.autograd.grad(out, [ys[i] for i in live], go, retain_graph=True, allow_unused=True, is_grads_batched=True)
            for i, g in zip(live, gs):
                if g is not None:
                    grads[i] = g.transpose(0, 1).contiguous()
        return [
            g if g is not None else torch.zeros((B, kd) + tuple(y.shape[1:]), dtype=y.dtype, device=y.device)
            for g, y in zip(grads, ys)
        ]

    def _output_grads_loop(self, out: Tensor, ys: List[Tensor], dirs: Tuple[int, int]) -> List[Tensor]:
        B, C = out.shape
        kd = dirs[1] - dirs[0]
        live = [i for i, y in enumerate(ys) if y.requires_grad]
        alloc = [torch.empty if i in live else torch.zeros for i in range(len(ys))]
        grads = [a((B, kd) + tuple(y.shape[1:]), dtype=y.dtype, device=y.device) for a, y in zip(alloc, ys)]
        inputs = [ys[i] for i in live]
        go = torch.zeros_like(out)
        for j, k in enumerate(range(dirs[0], dirs[1]) if inputs else []):
            if self.kind == "pseudo":
                go.fill_(1.0)
            else:
                go.zero_()
                go[:, k] = 1.0
            gs = torch.autograd.grad(out, inputs, go, retain_graph=j < kd - 1, allow_unused=True)
            for i, g in zip(live, gs):
                if g is None:  # logit k does not depend on this call
                    grads[i][:, j].zero_()
                else:
                    grads[i][:, j] = g
        return grads


def _cat_groups(parts: List[Tensor], B: int, K: int) -> Tensor:
    """Per-group per-example Jacobians (B, K, O_g * D) -> (B, K, O * D) in weight layout."""
    return torch.cat([p.view(B, K, -1) for p in parts], dim=2)
