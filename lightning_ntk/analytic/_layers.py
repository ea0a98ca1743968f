"""Per-layer recursions of the infinite-width NNGP and NTK kernels, float64 torch.

A network in the Gaussian-process limit is described, for one block of pairs (x1_i, x2_j),
by a :class:`KernelState` (the layout of neural-tangents' ``Kernel``, Novak et al. 2020):

* ``nngp`` Σ(x1_i, x2_j): covariance of one unit (channel) of the current layer;
* ``ntk``  Θ(x1_i, x2_j): the NTK of that unit with respect to every parameter below;
* ``cov1``, ``cov2``: Σ(x, x) of the x1 and x2 examples themselves (the nonlinearities
  need the variances on both sides).

Units are i.i.d. across channels in the limit, so the kernels are per channel. A spatial
layer (channels × positions S) keeps either the full pixel × pixel covariance
(``full=True``: trailing axes ``S + S``, needed when a later average pooling mixes
positions) or only equal positions (``full=False``: trailing axes ``S``; enough for
convolutions, elementwise maps and a final Flatten + Linear, because a convolution's
weights are independent across window offsets, so Σ_out(p, p) only reads Σ_in at equal
positions). A dense layer has S = ().

Recursions (σ_w² = fan_in · Var(W), σ_b² = Var(b); avg is the layer's averaging map:
identity for Linear on a vector, mean over the window offsets for a convolution, mean over
positions of Σ(p, p) for Linear after Flatten; Lee et al. 2018, Novak et al. 2019,
Arora et al. 2019):

* affine, both parameterisations:  Σ' = σ_w² avg(Σ) + σ_b²
* affine, NTK parameterisation (W = σ_w/√fan_in · ω, b = σ_b β, trained in ω, β; Jacot et
  al. 2018):  Θ' = Σ' + σ_w² avg(Θ)
* affine, standard parameterisation (W and b trained directly, PyTorch's ``nn.Linear``;
  Sohl-Dickstein et al. 2020):  Θ' = fan_in · avg(Σ) + [bias] + σ_w² avg(Θ)
* elementwise φ:  Σ' = E[φ(u)φ(v)],  Θ' = E[φ'(u)φ'(v)] · Θ,  (u, v) ~ N(0, [[Σ11, Σ12],
  [Σ12, Σ22]]) (the closed forms below)
* average pooling (any linear map A of positions): Σ' = A Σ Aᵀ, Θ' = A Θ Aᵀ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

_TWO_PI = 2.0 * math.pi


@dataclass
class KernelState:
    """Kernels of one block of pairs: ``nngp``/``ntk`` (b1, b2, *P), ``cov1`` (b1, *P),
    ``cov2`` (b2, *P); P = S + S when ``full`` else S. ``flattened``: a Flatten was met
    (the next Linear reads every position)."""

    nngp: Tensor
    ntk: Tensor
    cov1: Tensor
    cov2: Tensor
    spatial: Tuple[int, ...]
    full: bool
    flattened: bool = False

    @property
    def nd(self) -> int:
        return len(self.spatial)


def input_state(x1: Tensor, x2: Tensor, full: bool) -> KernelState:
    """Σ of the inputs, read as (N, C, *S): the mean over channels of x_c(p) x'_c(q)
    (the per-unit kernel: a layer of fan-in C·k then has Σ' = σ_w² avg(Σ) + σ_b²)."""
    spatial = tuple(x1.shape[2:])
    c = x1.shape[1]
    a = x1.reshape(x1.shape[0], c, -1)
    b = x2.reshape(x2.shape[0], c, -1)
    if full:
        nngp = torch.einsum("ncp,mcq->nmpq", a, b) / c
        cov1 = torch.einsum("ncp,ncq->npq", a, a) / c
        cov2 = torch.einsum("ncp,ncq->npq", b, b) / c
        shape = spatial + spatial
    else:
        nngp = torch.einsum("ncp,mcp->nmp", a, b) / c
        cov1 = (a * a).mean(1)
        cov2 = (b * b).mean(1)
        shape = spatial
    nngp = nngp.reshape(a.shape[0], b.shape[0], *shape)
    return KernelState(nngp, torch.zeros_like(nngp), cov1.reshape(a.shape[0], *shape),
                       cov2.reshape(b.shape[0], *shape), spatial, full)


# ----------------------------------------------------------------------------- variances
def _diagonal(cov: Tensor, spatial: Tuple[int, ...], full: bool) -> Tensor:
    """Σ(x, x)(p, p) of self kernels ``cov`` (b, *P): shape (b, *S)."""
    if not full or not spatial:
        return cov
    n = int(np.prod(spatial))
    return cov.reshape(cov.shape[0], n, n).diagonal(dim1=1, dim2=2).reshape(cov.shape[0], *spatial)


def _broadcast_variances(state: KernelState) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(v1, v2) broadcastable to ``nngp`` and (va, vb) broadcastable to ``cov1``/``cov2``."""
    s, nd = state.spatial, state.nd
    d1 = _diagonal(state.cov1, s, state.full)
    d2 = _diagonal(state.cov2, s, state.full)
    ones = (1,) * nd
    if state.full:
        v1 = d1.reshape(d1.shape[0], 1, *s, *ones)
        v2 = d2.reshape(1, d2.shape[0], *ones, *s)
    else:
        v1 = d1.reshape(d1.shape[0], 1, *s)
        v2 = d2.reshape(1, d2.shape[0], *s)
    return v1, v2, d1, d2


def _self_variances(d: Tensor, spatial: Tuple[int, ...], full: bool) -> Tuple[Tensor, Tensor]:
    if not full:
        return d, d
    ones = (1,) * len(spatial)
    return d.reshape(d.shape[0], *spatial, *ones), d.reshape(d.shape[0], *ones, *spatial)


# ----------------------------------------------------------------------------- nonlinearities
# Each map takes (c, a, b) = (Σ12, Σ11, Σ22), broadcastable, and returns
# (E[φ(u)φ(v)], E[φ'(u)φ'(v)]) (the second None when need_dot is False).
KernelMap = Callable[[Tensor, Tensor, Tensor, bool], Tuple[Tensor, Optional[Tensor]]]


def relu_map(c: Tensor, a: Tensor, b: Tensor, need_dot: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """Arc-cosine kernels of degree 1 and 0 (Cho & Saul 2009), θ = arccos(Σ12/√(Σ11Σ22)):
    E[relu relu] = √(Σ11Σ22) (sin θ + (π − θ) cos θ) / 2π, E[relu' relu'] = (π − θ) / 2π
    (0 where a variance is 0: PyTorch's relu'(0) = 0)."""
    # In place on fresh arrays: these kernels are the bulk of a CNN's cost (memory-bound).
    sa, sb = torch.sqrt(a), torch.sqrt(b)
    inv_a = torch.where(sa > 0, 1.0 / torch.where(sa > 0, sa, torch.ones_like(sa)), torch.zeros_like(sa))
    inv_b = torch.where(sb > 0, 1.0 / torch.where(sb > 0, sb, torch.ones_like(sb)), torch.zeros_like(sb))
    rho = (c * inv_a).mul_(inv_b).clamp_(-1.0, 1.0)
    pi_minus_theta = torch.arccos(rho).neg_().add_(math.pi)
    t = rho.square().neg_().add_(1.0).clamp_min_(0.0).sqrt_().addcmul_(rho, pi_minus_theta)
    t.mul_(sa / _TWO_PI).mul_(sb)
    if not need_dot:
        return t, None
    dot = pi_minus_theta.div_(_TWO_PI).mul_((sa > 0).to(sa.dtype)).mul_((sb > 0).to(sb.dtype))
    return t, dot


def leaky_relu_map(slope: float) -> KernelMap:
    """φ(u) = α u + (1 − α) relu(u): E[φφ] = α Σ12 + (1 − α)² E[relu relu] (since
    E[u relu(v)] = Σ12 / 2), E[φ'φ'] = α + (1 − α)² E[relu' relu']."""
    def kernel(c: Tensor, a: Tensor, b: Tensor, need_dot: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        t, dot = relu_map(c, a, b, need_dot)
        t = slope * c + (1.0 - slope) ** 2 * t
        if dot is not None:
            dot = slope + (1.0 - slope) ** 2 * dot
        return t, dot
    return kernel


def erf_map(c: Tensor, a: Tensor, b: Tensor, need_dot: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """Williams (1997): E[erf erf] = (2/π) arcsin(2Σ12 / √((1 + 2Σ11)(1 + 2Σ22)));
    E[erf' erf'] = (4/π) / √((1 + 2Σ11)(1 + 2Σ22) − 4Σ12²)."""
    prod = (1.0 + 2.0 * a) * (1.0 + 2.0 * b)
    t = (2.0 / math.pi) * torch.asin((2.0 * c / torch.sqrt(prod)).clamp(-1.0, 1.0))
    if not need_dot:
        return t, None
    # (1+2a)(1+2b) − 4c² >= 1 + 2a + 2b > 0 since c² <= ab; the clamp only absorbs rounding.
    return t, (4.0 / math.pi) / torch.sqrt((prod - 4.0 * c * c).clamp_min(1.0))


def gelu_map(c: Tensor, a: Tensor, b: Tensor, need_dot: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """GELU φ(u) = u Φ(u) (exact form; Tsuchida et al. 2021, as in neural-tangents' stax.Gelu):
    with Δ² = (1 + Σ11)(1 + Σ22) − Σ12² and β = arcsin(Σ12 / √((1 + Σ11)(1 + Σ22))),
    E[φφ] = Σ12/4 + [(Σ12² + Σ11Σ22 Δ²) / ((1 + Σ11)(1 + Σ22) Δ) + Σ12 β] / 2π,
    E[φ'φ'] = 1/4 + β/2π + Σ12 / (2π Δ) · (1/Δ² + (1 − Σ11Σ22)/((1 + Σ11)(1 + Σ22)) + 1)."""
    prod = a * b
    prod1 = (1.0 + a) * (1.0 + b)
    delta2 = prod1 - c * c
    delta = torch.sqrt(delta2)
    beta = torch.atan2(c, delta)
    t = c / 4.0 + ((c * c + prod * delta2) / (prod1 * delta) + c * beta) / _TWO_PI
    if not need_dot:
        return t, None
    dot = 0.25 + beta / _TWO_PI + (1.0 / delta2 + (1.0 - prod) / prod1 + 1.0) * c / (delta * _TWO_PI)
    return t, dot


def elementwise(state: KernelState, kernel: KernelMap) -> KernelState:
    """Σ' = E[φ(u)φ(v)], Θ' = E[φ'(u)φ'(v)] Θ on every pair of positions."""
    v1, v2, d1, d2 = _broadcast_variances(state)
    nngp, dot = kernel(state.nngp, v1, v2, True)
    a1, b1 = _self_variances(d1, state.spatial, state.full)
    a2, b2 = _self_variances(d2, state.spatial, state.full)
    cov1, _ = kernel(state.cov1, a1, b1, False)
    cov2 = cov1 if state.cov2 is state.cov1 else kernel(state.cov2, a2, b2, False)[0]
    return replace(state, nngp=nngp, ntk=state.ntk * dot, cov1=cov1, cov2=cov2)


# ----------------------------------------------------------------------------- spatial maps
@dataclass(frozen=True)
class ConvAxis:
    """One spatial axis of a convolution: ``source[t]`` is the input position read at
    padded position t (−1: zero padding; ``pad_left`` positions before the input), then
    windows start every ``stride`` with ``kernel`` taps ``dilation`` apart; ``length``
    output positions; ``zeros``: zero padding (no copy of padded kernels needed)."""

    source: Tensor
    kernel: int
    stride: int
    dilation: int
    length: int
    pad_left: int
    length_in: int
    zeros: bool


def conv_axis(length_in: int, kernel: int, stride: int, dilation: int, pad_left: int, pad_right: int,
              mode: str) -> ConvAxis:
    """The index map of PyTorch's padding modes (zeros, reflect, replicate, circular)."""
    t = np.arange(-pad_left, length_in + pad_right)
    if mode == "zeros":
        src = np.where((t >= 0) & (t < length_in), t, -1)
    elif mode == "reflect":
        src = np.abs(t)
        src = np.where(src >= length_in, 2 * (length_in - 1) - src, src)
    elif mode == "replicate":
        src = np.clip(t, 0, length_in - 1)
    elif mode == "circular":
        src = np.mod(t, length_in)
    else:  # pragma: no cover - the converter refuses other modes
        raise ValueError(f"unknown padding mode {mode!r}")
    padded = length_in + pad_left + pad_right
    out = (padded - dilation * (kernel - 1) - 1) // stride + 1
    return ConvAxis(torch.as_tensor(src, dtype=torch.long), kernel, stride, dilation, int(out), pad_left,
                    length_in, mode == "zeros" or (pad_left == 0 and pad_right == 0))


def _pad_gather(k: Tensor, axis: int, source: Tensor) -> Tensor:
    out = k.index_select(axis, source.clamp_min(0))
    if bool((source < 0).any()):
        shape = [1] * k.ndim
        shape[axis] = source.shape[0]
        out = out * (source >= 0).to(k.dtype).reshape(shape)
    return out


def _window_slice(ax: ConvAxis, tap: int) -> slice:
    start = tap * ax.dilation
    return slice(start, start + ax.stride * (ax.length - 1) + 1, ax.stride)


def _tap_ranges(ax: ConvAxis, tap: int) -> Optional[Tuple[slice, slice]]:
    """Zero padding: the output positions o whose tap reads a real input position
    i = o·stride + tap·dilation − pad_left, as (output slice, input slice); None if none."""
    offset = tap * ax.dilation - ax.pad_left
    lo = max(0, -(offset // ax.stride) if offset < 0 else 0)
    while lo * ax.stride + offset < 0:
        lo += 1
    hi = min(ax.length - 1, (ax.length_in - 1 - offset) // ax.stride)
    if lo > hi:
        return None
    start = lo * ax.stride + offset
    return slice(lo, hi + 1), slice(start, start + ax.stride * (hi - lo) + 1, ax.stride)


def _conv_axis_zeros(k: Tensor, pos: Sequence[int], ax: ConvAxis) -> Tensor:
    """Σ_δ over taps with zero padding, as sums of slices (no padded copy)."""
    ranges = [r for r in (_tap_ranges(ax, tap) for tap in range(ax.kernel)) if r is not None]
    shape = list(k.shape)
    for p in pos:
        shape[p] = ax.length
    full_cover = [r for r in ranges if r[0] == slice(0, ax.length)]
    out: Optional[Tensor] = None
    if full_cover:  # start from a tap that covers every output position: no zero fill
        first = full_cover[0]
        ranges.remove(first)
        index = [slice(None)] * k.ndim
        for p in pos:
            index[p] = first[1]
        out = k[tuple(index)].clone()
    else:
        out = k.new_zeros(shape)
    for o_slice, i_slice in ranges:
        src = [slice(None)] * k.ndim
        dst = [slice(None)] * k.ndim
        for p in pos:
            src[p], dst[p] = i_slice, o_slice
        out[tuple(dst)] += k[tuple(src)]
    return out


def conv_average(k: Tensor, lead: int, nd: int, full: bool, axes: Sequence[ConvAxis]) -> Tensor:
    """avg(K) of a convolution: (1/|window|) Σ_δ K(src(p + δ), src(q + δ)) on pairs of
    positions (the same offset δ on both sides: weights are independent across offsets);
    separable over spatial axes. ``lead`` leading batch axes. Returns a new tensor."""
    for d, ax in enumerate(axes):
        pos = [lead + d, lead + nd + d] if full else [lead + d]
        if ax.zeros:
            out = _conv_axis_zeros(k, pos, ax)
        else:
            padded = k
            for p in pos:
                padded = _pad_gather(padded, p, ax.source)
            out = None
            for tap in range(ax.kernel):
                index = [slice(None)] * padded.ndim
                for p in pos:
                    index[p] = _window_slice(ax, tap)
                part = padded[tuple(index)]
                out = part.clone() if out is None else out.add_(part)
        k = out.div_(ax.kernel)
    return k


def to_diagonal(k: Tensor, lead: int, spatial: Tuple[int, ...]) -> Tensor:
    """Full (…, *S, *S) kernels -> equal positions (…, *S)."""
    n = int(np.prod(spatial))
    head = k.shape[:lead]
    return k.reshape(*head, n, n).diagonal(dim1=-2, dim2=-1).reshape(*head, *spatial)


def position_mean(k: Tensor, lead: int, spatial: Tuple[int, ...], full: bool) -> Tensor:
    """avg of a Linear after Flatten: the mean over positions of K(p, p)."""
    if not spatial:
        return k
    if full:
        k = to_diagonal(k, lead, spatial)
    return k.reshape(*k.shape[:lead], -1).mean(-1)


def apply_position_map(k: Tensor, lead: int, nd: int, maps: Sequence[Tensor], dense: Optional[Tensor],
                       spatial_out: Tuple[int, ...]) -> Tensor:
    """A K Aᵀ on full kernels for a linear map of positions A (average pooling): per axis
    when A = A_0 ⊗ A_1 ⊗ … (``maps``), else with the dense (|S_out|, |S_in|) ``dense``."""
    if dense is None:
        for d, a in enumerate(maps):
            for p in (lead + d, lead + nd + d):
                k = torch.movedim(torch.tensordot(k, a, dims=([p], [1])), -1, p)
        return k
    head = k.shape[:lead]
    n_in = dense.shape[1]
    flat = k.reshape(*head, n_in, n_in)
    flat = torch.matmul(torch.matmul(dense, flat), dense.T)
    return flat.reshape(*head, *spatial_out, *spatial_out)


# ----------------------------------------------------------------------------- operations
class Op:
    """One layer of the compiled network: ``apply`` maps a :class:`KernelState`."""

    pools = False  # a weightless map of positions (needs the full pixel x pixel kernels)

    def apply(self, state: KernelState, parameterization: str) -> KernelState:  # pragma: no cover
        raise NotImplementedError

    def contains_pooling(self) -> bool:
        return self.pools


@dataclass
class Affine(Op):
    """Linear or ConvNd: σ_w² = fan_in · Var(W), σ_b² = Var(b) (None: no bias)."""

    name: str
    fan_in: int
    weight_var: float
    bias_var: Optional[float]
    conv: Optional[Tuple[ConvAxis, ...]] = None  # None: Linear
    spatial_out: Tuple[int, ...] = ()

    def _avg(self, k: Tensor, lead: int, state: KernelState) -> Tensor:
        if self.conv is None:
            return position_mean(k, lead, state.spatial, state.full)
        return conv_average(k, lead, state.nd, state.full, self.conv)

    def apply(self, state: KernelState, parameterization: str) -> KernelState:
        b2 = self.bias_var or 0.0
        w = self.weight_var
        nngp_avg = self._avg(state.nngp, 2, state)
        ntk_avg = self._avg(state.ntk, 2, state)
        # In place where avg made a new array (a Linear on a vector returns its input).
        if ntk_avg is state.ntk:
            ntk_avg = ntk_avg.clone()
        if parameterization == "ntk":
            ntk = ntk_avg.mul_(w).add_(nngp_avg, alpha=w).add_(b2)
        else:
            ntk = ntk_avg.mul_(w).add_(nngp_avg, alpha=float(self.fan_in))
            if self.bias_var is not None:
                ntk.add_(1.0)
        nngp = (nngp_avg * w if nngp_avg is state.nngp else nngp_avg.mul_(w)).add_(b2)
        cov1 = self._avg(state.cov1, 1, state) * w + b2
        cov2 = cov1 if state.cov2 is state.cov1 else self._avg(state.cov2, 1, state) * w + b2
        if self.conv is None:
            return KernelState(nngp, ntk, cov1, cov2, (), False)
        return replace(state, nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, spatial=self.spatial_out)


@dataclass
class Elementwise(Op):
    name: str
    kernel: KernelMap

    def apply(self, state: KernelState, parameterization: str) -> KernelState:
        return elementwise(state, self.kernel)


@dataclass
class Pool(Op):
    """A linear map of positions without weights (average pooling of every kind)."""

    name: str
    maps: Tuple[Tensor, ...]
    dense: Optional[Tensor]
    spatial_out: Tuple[int, ...]
    pools = True

    def apply(self, state: KernelState, parameterization: str) -> KernelState:
        if not state.full:  # pragma: no cover - the driver keeps full kernels while a pooling is ahead
            raise RuntimeError("pooling needs the full pixel x pixel kernel")

        def f(k: Tensor, lead: int) -> Tensor:
            return apply_position_map(k, lead, state.nd, self.maps, self.dense, self.spatial_out)

        cov1 = f(state.cov1, 1)
        cov2 = cov1 if state.cov2 is state.cov1 else f(state.cov2, 1)
        return replace(state, nngp=f(state.nngp, 2), ntk=f(state.ntk, 2), cov1=cov1, cov2=cov2,
                       spatial=self.spatial_out)


@dataclass
class Flatten(Op):
    name: str

    def apply(self, state: KernelState, parameterization: str) -> KernelState:
        return replace(state, flattened=True)


@dataclass
class Residual(Op):
    """branch(x) + shortcut(x): kernels add, since the branch ends in a layer with
    zero-mean weights independent of the shortcut (cross covariances vanish)."""

    name: str
    branch: List[Op]
    shortcut: List[Op]

    def contains_pooling(self) -> bool:
        return any(op.contains_pooling() for op in self.branch + self.shortcut)

    def apply(self, state: KernelState, parameterization: str) -> KernelState:
        a = run(self.branch, state, parameterization)
        b = run(self.shortcut, state, parameterization)
        if a.spatial != b.spatial or a.full != b.full:  # pragma: no cover - shapes were traced
            raise RuntimeError(f"{self.name}: branch and shortcut kernels differ in layout")
        cov1 = a.cov1 + b.cov1
        cov2 = cov1 if state.cov2 is state.cov1 else a.cov2 + b.cov2
        return replace(a, nngp=a.nngp + b.nngp, ntk=a.ntk + b.ntk, cov1=cov1, cov2=cov2,
                       flattened=a.flattened or b.flattened)


def run(ops: Sequence[Op], state: KernelState, parameterization: str, top_level: bool = False) -> KernelState:
    """Apply ``ops`` in order; at the top level, drop to equal-position kernels once no
    pooling lies ahead (a convolution then reads only Σ(p, p))."""
    ahead = [op.contains_pooling() for op in ops]
    for i, op in enumerate(ops):
        if top_level and state.full and state.spatial and not any(ahead[i:]):
            state = to_equal_positions(state)
        state = op.apply(state, parameterization)
    return state


def to_equal_positions(state: KernelState) -> KernelState:
    s = state.spatial
    cov1 = to_diagonal(state.cov1, 1, s)
    cov2 = cov1 if state.cov2 is state.cov1 else to_diagonal(state.cov2, 1, s)
    return replace(state, nngp=to_diagonal(state.nngp, 2, s), ntk=to_diagonal(state.ntk, 2, s),
                   cov1=cov1, cov2=cov2, full=False)


def position_operator(module: nn.Module, spatial_in: Tuple[int, ...]) -> Tuple[Tuple[Tensor, ...], Optional[Tensor],
                                                                               Tuple[int, ...]]:
    """The matrix A of a weightless linear map of positions (a pooling module), read off
    by applying ``module`` to one-hot images, and its Kronecker factors per axis when it
    has them (then pooling costs O(|S|) per axis instead of O(|S|²))."""
    n = int(np.prod(spatial_in))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, *spatial_in)
    with torch.no_grad():
        out = module(basis)
        spatial_out = tuple(out.shape[2:])
        dense = out.reshape(n, -1).T.contiguous()  # (|S_out|, |S_in|)
        probe = torch.randn((2, 1) + spatial_in, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        check = module(probe).reshape(2, -1)
    if not torch.allclose(check, probe.reshape(2, -1) @ dense.T, rtol=1e-10, atol=1e-12):
        raise ValueError(f"{type(module).__name__} is not a linear map of positions")
    factors = _kron_factors(dense, spatial_out, spatial_in)
    return (tuple(factors), None, spatial_out) if factors is not None else ((), dense, spatial_out)


def _kron_factors(a: Tensor, out: Tuple[int, ...], inp: Tuple[int, ...]) -> Optional[List[Tensor]]:
    if len(out) == 1:
        return [a.reshape(out[0], inp[0])]
    o0, i0 = out[0], inp[0]
    o_rest, i_rest = int(np.prod(out[1:])), int(np.prod(inp[1:]))
    m = a.reshape(o0, o_rest, i0, i_rest).permute(0, 2, 1, 3).reshape(o0 * i0, o_rest * i_rest)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    if s.numel() > 1 and float(s[1]) > 1e-12 * float(s[0]):
        return None
    first = (u[:, 0] * torch.sqrt(s[0])).reshape(o0, i0)
    rest = (vh[0] * torch.sqrt(s[0])).reshape(o_rest, i_rest)
    tail = _kron_factors(rest, out[1:], inp[1:])
    if tail is None:
        return None
    factors = [first] + tail
    rebuilt = factors[0]
    for f in factors[1:]:
        rebuilt = torch.kron(rebuilt, f)
    if not torch.allclose(rebuilt, a, rtol=0, atol=1e-12 * max(1.0, float(a.abs().max()))):
        return None
    return factors
