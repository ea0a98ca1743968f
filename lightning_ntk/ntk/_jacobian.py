"""The generic engine: per-example Jacobians by ``torch.func`` (``vmap`` over examples of
``jacrev``), for one chunk of parameters at a time, then contracted like any other feature.

This is the torch.func tutorial's "Jacobian contraction" (Novak et al. 2022, section 3.2),
made bounded in memory: parameters are processed in chunks and examples in blocks. It
serves both ``method="jacobian"`` and, inside the structured method, the parameters no
per-layer rule covers.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.func import grad, jacrev, vmap

from ._features import Feature, Vec, acc_elements
from ._model import FunctionalModel, layer_name
from ._tiling import WorkModel


class JacobianSource:
    """Per-example Jacobians of the parameters ``names`` (one Vec feature per layer)."""

    def __init__(
        self,
        fm: FunctionalModel,
        names: Sequence[str],
        kind: str,
        K: int,
        saved_bytes_per_example: int,
        forward_macs: float = 0.0,
    ):
        self.fm, self.names, self.kind, self.K = fm, list(names), kind, K
        self.itemsize = torch.empty((), dtype=fm.dtype).element_size()
        by_layer: Dict[str, List[str]] = {}
        for n in self.names:
            by_layer.setdefault(layer_name(n), []).append(n)
        self.groups: List[Tuple[str, List[str]]] = list(by_layer.items())
        self.slots = [(i, layer) for i, (layer, _) in enumerate(self.groups)]
        self.numel = sum(fm.numel[n] for n in self.names)
        self.saved = saved_bytes_per_example
        self.forward_macs = forward_macs
        self._vmap_ok = True

    def work(self) -> WorkModel:
        """vmap(jacrev): a forward pass, per direction a backward pass with weight gradients
        (about two forward passes), then the Gram of the per-example Jacobians."""
        fwd = float(max(self.forward_macs, self.numel))
        if self.kind == "full":
            return WorkModel(fwd, 2 * fwd, self.K * self.K * self.numel, 0.0, len(self.slots))
        return WorkModel(fwd, 2 * fwd, 0.0, float(self.numel), len(self.slots))

    def feature_bytes(self, kd: int) -> int:
        return kd * self.numel * self.itemsize

    def activation_bytes(self, kd: int) -> int:
        # vmap(jacrev): the forward graph once, the kd-batched backward, the Jacobian itself
        return (kd + 1) * self.saved + 2 * kd * self.numel * self.itemsize

    def temp_bytes(self, b1: int, b2: int, kd: int) -> int:
        return acc_elements(self.kind, kd, b1, b2) * self.itemsize

    def compute(self, xb: Tensor, dirs: Optional[Tuple[int, int]] = None) -> Dict[int, Feature]:
        """Per-example Jacobians of the examples ``xb`` for output directions ``dirs``."""
        dirs = (0, self.K) if dirs is None else dirs
        jac = self._jacobian(xb, dirs)
        B = xb.shape[0]
        kd = dirs[1] - dirs[0]
        out: Dict[int, Feature] = {}
        for i, (_, names) in enumerate(self.groups):
            parts = [jac[n].reshape(B, kd, -1) for n in names]
            out[i] = Vec(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
        return out

    def _jacobian(self, xb: Tensor, dirs: Tuple[int, int]) -> Dict[str, Tensor]:
        if self._vmap_ok:
            try:
                return self._jacobian_vmap(xb, dirs)
            except Exception as err:  # noqa: BLE001 - any failure of the transform: use the loop
                self._vmap_ok = False
                warnings.warn(
                    f"empirical_ntk: torch.func.vmap could not batch the model over examples ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}); using a slower per-example autograd loop",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return self._jacobian_loop(xb, dirs)

    def _jacobian_vmap(self, xb: Tensor, dirs: Tuple[int, int]) -> Dict[str, Tensor]:
        fm = self.fm
        leaves = {n: fm.leaves[n].detach() for n in self.names}
        whole = dirs == (0, self.K)

        def f(params: Dict[str, Tensor], x: Tensor) -> Tensor:
            out = fm.single(x, params)
            return out if whole else out[dirs[0] : dirs[1]]

        if self.kind == "pseudo":
            per_ex = vmap(grad(lambda p, x: f(p, x).sum()), in_dims=(None, 0))(leaves, xb)
            return {n: t.unsqueeze(1) for n, t in per_ex.items()}
        return vmap(jacrev(f), in_dims=(None, 0))(leaves, xb)

    def _jacobian_loop(self, xb: Tensor, dirs: Tuple[int, int]) -> Dict[str, Tensor]:
        fm = self.fm
        targets = [fm.leaves[n] for n in self.names]
        B = xb.shape[0]
        kd = dirs[1] - dirs[0]
        out = {n: torch.zeros((B, kd) + tuple(t.shape), dtype=t.dtype, device=t.device) for n, t in zip(self.names, targets)}
        for b in range(B):
            f = fm(xb[b : b + 1])[0]
            rows = [f.sum()] if self.kind == "pseudo" else list(f[dirs[0] : dirs[1]])
            for k, fk in enumerate(rows):
                gs = torch.autograd.grad(fk, targets, retain_graph=k < len(rows) - 1, allow_unused=True)
                for n, g in zip(self.names, gs):
                    if g is not None:
                        out[n][b, k] = g
        return out


def chunk_parameters(names: Sequence[str], numel: Dict[str, int], max_numel: int) -> List[List[str]]:
    """Greedy chunks of consecutive parameters with at most ``max_numel`` entries (a larger
    parameter gets a chunk of its own)."""
    chunks: List[List[str]] = []
    current: List[str] = []
    size = 0
    for n in names:
        if current and size + numel[n] > max_numel:
            chunks.append(current)
            current, size = [], 0
        current.append(n)
        size += numel[n]
    if current:
        chunks.append(current)
    return chunks
