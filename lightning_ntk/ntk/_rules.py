"""Per-layer rules: the per-example Jacobian of a layer's parameters from what hooks capture.

For a module call ``y = layer(x; W)`` inside the network, the Jacobian of logit k of example
n with respect to W is the layer's own derivative contracted with ``g = d f_k / d y`` (the
output gradient, one backward pass per logit over the whole batch):

- Linear  ``y = x W^T + b``:  dW = sum_s g_s (x) x_s,  db = sum_s g_s  (s: positions)
- Conv    the same on im2col patches x_s (s: output locations), one factor per group
- Embedding ``y_s = W[i_s]``: dW = sum_s onehot(i_s) (x) g_s (padding_idx rows excluded)
- LayerNorm / GroupNorm / BatchNorm (running statistics) / RMSNorm ``y = xhat * w + b``:
  dw = sum_s g_s * xhat_s,  db = sum_s g_s

A rule only applies to the stock module (``forward`` not overridden); anything else is left
to the generic ``torch.func`` path.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._features import Embed, Feature, Outer, Vec

_RMSNorm = getattr(nn, "RMSNorm", None)


class Rule:
    """How to turn one call's capture and output gradient into features, per parameter."""

    roles: Tuple[str, ...] = ("weight", "bias")
    #: layout family of the weight feature: uses of one parameter combine by concatenating
    #: positions only within a family
    family = "vec"

    def applies(self, m: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def capture(self, m: nn.Module, x: Tensor, y: Tensor, roles: Sequence[str]) -> Dict[str, Tensor]:
        raise NotImplementedError  # pragma: no cover

    def features(self, m: nn.Module, rec: Dict[str, Tensor], g: Tensor, role: str) -> List[Feature]:
        """``g``: (B, K, *y.shape[1:]). One feature per weight group (one for most layers)."""
        raise NotImplementedError  # pragma: no cover

    def dims(self, m: nn.Module, x_shape: torch.Size, y_shape: torch.Size, role: str) -> List[Tuple[int, int, int]]:
        """(S, D, O) per group of the role's factored feature; for Vec roles (1, 1, numel)."""
        p = getattr(m, role)
        return [(1, 1, p.numel())]


def _forward_is(m: nn.Module, *bases: type) -> bool:
    return any(isinstance(m, b) and type(m).forward is b.forward for b in bases)


class LinearRule(Rule):
    family = "outer"

    def applies(self, m: nn.Module) -> bool:
        return _forward_is(m, nn.Linear)

    def capture(self, m, x, y, roles):
        return {"x": x.detach()} if "weight" in roles else {}

    def features(self, m, rec, g, role):
        B, K = g.shape[:2]
        g = g.reshape(B, K, -1, m.out_features)
        if role == "bias":
            return [Vec(g.sum(2))]
        return [Outer(g, rec["x"].reshape(B, -1, m.in_features))]

    def dims(self, m, x_shape, y_shape, role):
        if role == "bias":
            return [(1, 1, m.out_features)]
        S = math.prod(x_shape[1:-1])
        return [(S, m.in_features, m.out_features)]


class ConvRule(Rule):
    family = "outer"

    def applies(self, m: nn.Module) -> bool:
        return _forward_is(m, nn.Conv1d, nn.Conv2d, nn.Conv3d) and hasattr(m, "_reversed_padding_repeated_twice")

    def capture(self, m, x, y, roles):
        return {"x": x.detach()} if "weight" in roles else {}

    def features(self, m, rec, g, role):
        B, K, O = g.shape[:3]
        g = g.reshape(B, K, O, -1)  # (B, K, O, S)
        if role == "bias":
            return [Vec(g.sum(3))]
        patches = conv_patches(m, rec["x"])  # (B, groups, D_g, S)
        if patches.shape[-1] != g.shape[-1]:  # pragma: no cover - guarded by the plan
            raise RuntimeError("internal error: convolution patches do not match the output size")
        og = O // m.groups
        out = []
        for gi in range(m.groups):
            gg = g if m.groups == 1 else g[:, :, gi * og : (gi + 1) * og]
            out.append(Outer(gg.transpose(2, 3), patches[:, gi].transpose(1, 2)))
        return out

    def dims(self, m, x_shape, y_shape, role):
        if role == "bias":
            return [(1, 1, m.out_channels)]
        S = math.prod(y_shape[2:])
        D = (m.in_channels // m.groups) * math.prod(m.kernel_size)
        return [(S, D, m.out_channels // m.groups)] * m.groups


def conv_patches(m: nn.Module, x: Tensor) -> Tensor:
    """im2col for Conv1d/2d/3d with the module's padding (any mode), stride and dilation.

    Returns (B, groups, C_in/groups * prod(kernel), prod(output size)), the column order of
    ``weight[o].flatten()``.
    """
    nd = x.dim() - 2
    pad = list(m._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, pad, mode=mode)
    x = x.contiguous()
    B, C = x.shape[:2]
    k, st, dil = m.kernel_size, m.stride, m.dilation
    sizes = x.shape[2:]
    out = [(sizes[i] - dil[i] * (k[i] - 1) - 1) // st[i] + 1 for i in range(nd)]
    strides = x.stride()
    view = x.as_strided(
        (B, C, *k, *out),
        (strides[0], strides[1], *[strides[2 + i] * dil[i] for i in range(nd)], *[strides[2 + i] * st[i] for i in range(nd)]),
    )
    return view.reshape(B, m.groups, (C // m.groups) * math.prod(k), math.prod(out))


class EmbeddingRule(Rule):
    roles = ("weight",)
    family = "embed"

    def applies(self, m: nn.Module) -> bool:
        return _forward_is(m, nn.Embedding) and not m.scale_grad_by_freq

    def capture(self, m, x, y, roles):
        return {"idx": x.detach()}

    def features(self, m, rec, g, role):
        B, K = g.shape[:2]
        idx = rec["idx"].reshape(B, -1)
        g = g.reshape(B, K, idx.shape[1], m.embedding_dim)
        if m.padding_idx is not None:
            g = g.masked_fill((idx == m.padding_idx).view(B, 1, -1, 1), 0.0)
        return [Embed(g, idx, m.num_embeddings)]

    def dims(self, m, x_shape, y_shape, role):
        return [(math.prod(x_shape[1:]), m.num_embeddings, m.embedding_dim)]


class _AffineNormRule(Rule):
    """y = xhat * w + b with w, b broadcast along the trailing ``normalized_shape`` (layer
    norms) or the channel axis 1 (group and batch norms)."""

    channel_axis = False

    def normalized(self, m: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def capture(self, m, x, y, roles):
        return {"xhat": self.normalized(m, x.detach())} if "weight" in roles else {}

    def _flat(self, m: nn.Module, t: Tensor, lead: int) -> Tensor:
        """(lead..., *rest) -> (lead..., positions, features)."""
        P = getattr(m, "weight", None)
        if P is None:
            P = m.bias
        n = P.numel()
        if self.channel_axis:
            return t.reshape(*t.shape[:lead], n, -1).transpose(-1, -2)
        return t.reshape(*t.shape[:lead], -1, n)

    def features(self, m, rec, g, role):
        B, K = g.shape[:2]
        if role == "bias":
            return [Vec(self._flat(m, g, 2).sum(2))]
        xhat = rec["xhat"].unsqueeze(1)
        return [Vec(self._flat(m, g * xhat, 2).sum(2))]


class LayerNormRule(_AffineNormRule):
    def applies(self, m):
        return _forward_is(m, nn.LayerNorm) and m.elementwise_affine

    def normalized(self, m, x):
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)


class RMSNormRule(_AffineNormRule):
    roles = ("weight",)

    def applies(self, m):
        return _RMSNorm is not None and _forward_is(m, _RMSNorm) and m.elementwise_affine

    def normalized(self, m, x):
        return F.rms_norm(x, m.normalized_shape, None, m.eps)


class GroupNormRule(_AffineNormRule):
    channel_axis = True

    def applies(self, m):
        return _forward_is(m, nn.GroupNorm) and m.affine

    def normalized(self, m, x):
        return F.group_norm(x, m.num_groups, None, None, m.eps)


class BatchNormRule(_AffineNormRule):
    """Eval-mode BatchNorm with running statistics: a per-channel affine map."""

    channel_axis = True

    def applies(self, m):
        return (
            _forward_is(m, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
            and m.affine
            and not m.training
            and m.running_mean is not None
        )

    def normalized(self, m, x):
        return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


RULES: Tuple[Rule, ...] = (
    LinearRule(),
    ConvRule(),
    EmbeddingRule(),
    LayerNormRule(),
    RMSNormRule(),
    GroupNormRule(),
    BatchNormRule(),
)


def rule_for(m: nn.Module) -> Optional[Rule]:
    for rule in RULES:
        if rule.applies(m):
            return rule
    return None
