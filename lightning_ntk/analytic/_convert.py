"""From an ``nn.Module`` to its infinite-width kernel program (a list of :mod:`._layers` ops).

The converter reads ``nn.Sequential`` containers (nested), :class:`Residual` blocks and a
fixed set of layers; anything else is refused by name, because the forward of an arbitrary
module cannot be read from its children. Shapes come from one forward pass on one example
(forward hooks), so PyTorch itself decides every output size (padding ``'same'``, strides,
ceil modes of pooling).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _layers as L

VarianceArg = Union[None, str, float, Mapping[str, float]]

_OWNER = "analytic_kernels"

#: Activations with a closed-form kernel (besides Erf and GELU(approximate='none')).
_CLOSED_FORM = (nn.ReLU, nn.LeakyReLU)
_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

SUPPORTED = ("Linear, Conv1d/2d/3d (groups=1, any padding mode, stride, dilation), ReLU, LeakyReLU, "
             "GELU(approximate='none'), lightning_ntk.analytic.Erf, AvgPool1d/2d/3d, "
             "AdaptiveAvgPool1d/2d/3d, Flatten, Identity, Dropout (the eval-mode identity), nested nn.Sequential "
             "and lightning_ntk.analytic.Residual")

_HINTS = {
    "MaxPool": "max pooling has no closed-form Gaussian-process kernel; use AvgPool (or AdaptiveAvgPool for "
               "global pooling)",
    "AdaptiveMaxPool": "max pooling has no closed-form Gaussian-process kernel; use AdaptiveAvgPool",
    "BatchNorm": "normalisation layers have no kernel here; build the network without them",
    "LayerNorm": "normalisation layers have no kernel here; build the network without them",
    "GroupNorm": "normalisation layers have no kernel here; build the network without them",
    "Embedding": "embeddings are not supported",
    "Tanh": "no closed-form kernel (and Gauss-Hermite quadrature loses accuracy at large pre-activation variances); "
            "lightning_ntk.analytic.Erf is the tanh-like activation with a closed form",
    "Sigmoid": "no closed-form kernel; lightning_ntk.analytic.Erf is the sigmoid-shaped activation with one",
    "SiLU": "no closed-form kernel; GELU (approximate='none') is the smooth ReLU-like activation with one",
    "GELU": "only GELU(approximate='none') has a closed-form kernel here",
    "MultiheadAttention": "attention is not supported",
}


class Erf(nn.Module):
    """φ(x) = erf(x): the activation with Williams' (1997) closed-form kernel (the
    erf/tanh-like nonlinearity of the NNGP literature)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(x)


class Residual(nn.Module):
    """``branch(x) + shortcut(x)`` (``shortcut=None``: the identity), a residual block the
    kernel converter can read.

    The infinite-width kernels of the sum are the sums of the kernels when the two terms
    are uncorrelated: the converter therefore requires ``branch`` to end in a ``Linear`` or
    ``Conv`` layer (zero-mean weights independent of the shortcut) and refuses a branch
    that ends in an activation or pooling. Both must give outputs of the same shape.
    """

    def __init__(self, branch: nn.Module, shortcut: Optional[nn.Module] = None):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x) + (x if self.shortcut is None else self.shortcut(x))


class LayerVariances(NamedTuple):
    """One layer with weights: its name, type, fan-in, σ_w² = fan_in · Var(W) and σ_b² = Var(b)
    (None without bias); ``source``: where the numbers came from."""

    name: str
    type: str
    fan_in: int
    weight_var: float
    bias_var: Optional[float]
    source: str


class Program(NamedTuple):
    ops: List[L.Op]
    layers: Tuple[LayerVariances, ...]
    input_spatial: Tuple[int, ...]
    max_positions: int  # the largest number of positions of any layer (sizing the tiles)
    activations: Tuple[Tuple[str, str], ...]  # (layer, which closed form)


# ----------------------------------------------------------------------------- variances
def _fan_in(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    return int(module.in_channels // module.groups * math.prod(module.kernel_size))


def _check_default_init(name: str, kind: str, values: Tensor, fan_in: int, what: str) -> Optional[str]:
    """None if ``values`` look drawn from U(−1/√fan_in, 1/√fan_in) (PyTorch's default for
    Linear/Conv weights, kaiming_uniform with a = √5, and biases), else what was found."""
    bound = 1.0 / math.sqrt(fan_in)
    v = values.detach().double().reshape(-1)
    m = v.numel()
    expected = bound * bound / 3.0
    mean_square = float((v * v).mean())
    # Var(w²)/E[w²]² = 4/5 for a uniform; 6 standard errors, and the bound holds exactly.
    tol = 6.0 * math.sqrt(0.8 / m) + 1e-9
    max_abs = float(v.abs().max())
    mean = float(v.mean())
    if (max_abs <= bound * (1 + 1e-6) and abs(mean_square / expected - 1.0) <= tol
            and abs(mean) <= 6.0 * math.sqrt(expected / m) + 1e-12):
        return None
    return (f"layer {name!r} ({kind}) {what} do not look like PyTorch's default initialisation U(±1/√fan_in) = "
            f"U(±{bound:.4g}): found max |{what[0]}| = {max_abs:.4g}, mean {mean:.3g} and fan_in · mean square = "
            f"{mean_square * fan_in:.4g} (default 1/3) over {m} entries")


def _resolve(arg: VarianceArg, name: str, which: str, default: float) -> Tuple[Optional[float], str]:
    """(value, source) for one layer from weight_var=/bias_var=; (None, "") means read it."""
    if arg is None:
        return None, ""
    if isinstance(arg, str):
        if arg != "pytorch":
            raise ValueError(f"{_OWNER}: {which} must be None, 'pytorch', a number or a mapping from layer names to "
                             f"numbers, got {arg!r}")
        return default, "pytorch default (assumed)"
    if isinstance(arg, Mapping):
        if name == "<root>" and "" in arg:  # named_modules() calls the root ""
            name = ""
        if name not in arg:
            raise ValueError(f"{_OWNER}: {which} has no entry for layer {name!r}; give one number per layer with "
                             f"weights (names as in module.named_modules()), or one number for all")
        value = arg[name]
        source = f"{which}[{name!r}]"
    else:
        value, source = arg, which
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (which == "weight_var" and value == 0):
        raise ValueError(f"{_OWNER}: {source} must be a finite number {'> 0' if which == 'weight_var' else '>= 0'}, "
                         f"got {value!r}")
    return float(value), source


def _variances(name: str, module: nn.Module, weight_var: VarianceArg, bias_var: VarianceArg) -> LayerVariances:
    kind = type(module).__name__
    fan_in = _fan_in(module)
    has_bias = module.bias is not None
    w, w_source = _resolve(weight_var, name, "weight_var", 1.0 / 3.0)
    b, b_source = _resolve(bias_var, name, "bias_var", 1.0 / (3.0 * fan_in)) if has_bias else (None, "no bias")
    problems = []

    def pytorch_default(tensor: Tensor, what: str) -> None:
        """Check ``tensor`` is at PyTorch's default initialisation (noting what is not)."""
        if tensor.is_meta:
            problems.append(f"layer {name!r} ({kind}) is on the meta device, so its initial {what} cannot be read")
        else:
            found = _check_default_init(name, kind, tensor, fan_in, what)
            if found:
                problems.append(found)

    if w is None:
        pytorch_default(module.weight, "weights")
        w, w_source = 1.0 / 3.0, "pytorch default (checked)"
    if has_bias and b is None:
        pytorch_default(module.bias, "biases")
        b, b_source = 1.0 / (3.0 * fan_in), "pytorch default (checked)"
    if problems:
        raise ValueError(
            f"{_OWNER}: {'; '.join(problems)}. The analytic kernels are those of the initial distribution: pass the "
            "module at PyTorch's default initialisation, or give the variances: weight_var= (σ_w² = fan_in · "
            "Var(W); e.g. 2.0 for He-normal) and bias_var= (Var(b)), each one number or a mapping from layer names, "
            "or 'pytorch' to assume PyTorch's defaults (σ_w² = 1/3, Var(b) = 1/(3 · fan_in)) without checking")
    return LayerVariances(name, kind, fan_in, float(w), b, f"weight: {w_source}; bias: {b_source}")


# ----------------------------------------------------------------------------- shapes
def _trace_shapes(module: nn.Module, example: Tensor, names: Dict[int, str]) -> Dict[str, Tuple[Tuple[int, ...],
                                                                                                 Tuple[int, ...]]]:
    """(input shape, output shape) of every module of the program, from one forward pass."""
    shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
    handles = []
    for sub in module.modules():
        if id(sub) in names:
            def hook(mod: nn.Module, args: Any, out: Any, _name: str = names[id(sub)]) -> None:
                if _name in shapes:
                    raise ValueError(f"{_OWNER}: module {_name!r} ({type(mod).__name__}) is called more than once in "
                                     "the forward pass (shared weights); the kernel converter needs every layer to "
                                     "have its own independent weights")
                if not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], Tensor)
                        and isinstance(out, Tensor)):
                    raise ValueError(f"{_OWNER}: module {_name!r} ({type(mod).__name__}) does not map one tensor to one "
                                     "tensor")
                shapes[_name] = (tuple(args[0].shape), tuple(out.shape))
            handles.append(sub.register_forward_hook(hook))
    params = list(module.parameters())
    device = params[0].device if params else example.device
    dtype = params[0].dtype if params and params[0].is_floating_point() else example.dtype
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            module(example.to(device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return shapes


# ----------------------------------------------------------------------------- conversion
class _Converter:
    def __init__(self, weight_var: VarianceArg, bias_var: VarianceArg):
        self.weight_var = weight_var
        self.bias_var = bias_var
        self.layers: List[LayerVariances] = []
        self.activations: List[Tuple[str, str]] = []
        self.names: Dict[int, str] = {}
        self.shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
        self.max_positions = 1

    def collect(self, module: nn.Module, name: str) -> None:
        """Name every module of the program (first pass, before the shape trace)."""
        if id(module) in self.names:
            raise ValueError(f"{_OWNER}: module {name!r} ({type(module).__name__}) is the same object as "
                             f"{self.names[id(module)]!r} (shared weights); the kernel converter needs every layer to "
                             "have its own independent weights")
        self.names[id(module)] = name or "<root>"
        if isinstance(module, nn.Sequential):
            for child_name, child in module.named_children():
                self.collect(child, f"{name}.{child_name}" if name else child_name)
        elif isinstance(module, Residual):
            self.collect(module.branch, f"{name}.branch" if name else "branch")
            if module.shortcut is not None:
                self.collect(module.shortcut, f"{name}.shortcut" if name else "shortcut")

    def convert(self, module: nn.Module, name: str) -> List[L.Op]:
        label = name or "<root>"
        if isinstance(module, nn.Sequential):
            ops: List[L.Op] = []
            for child_name, child in module.named_children():
                ops += self.convert(child, f"{name}.{child_name}" if name else child_name)
            return ops
        if label not in self.shapes:
            raise ValueError(f"{_OWNER}: module {label!r} ({type(module).__name__}) was not called in the forward pass; "
                             "the converter reads nn.Sequential in order, so every child must be used once")
        shape_in, shape_out = self.shapes[label]
        spatial_in, spatial_out = tuple(shape_in[2:]), tuple(shape_out[2:])
        self.max_positions = max(self.max_positions, math.prod(spatial_in), math.prod(spatial_out))
        if isinstance(module, Residual):
            return [self._residual(module, name, label, shape_out)]
        if isinstance(module, nn.Linear):
            if len(shape_in) != 2:
                raise ValueError(f"{_OWNER}: layer {label!r} (Linear) gets an input of shape {shape_in}: a Linear on a "
                                 "tensor with more than one feature axis acts on the last axis only and has no kernel "
                                 "here; put nn.Flatten() before it")
            return [L.Affine(label, *self._affine_numbers(module, label))]
        if isinstance(module, _CONVS):
            return [self._conv(module, label, shape_in, shape_out)]
        if isinstance(module, _POOLS):
            maps, dense, out = L.position_operator(module, spatial_in)
            if out != spatial_out:  # pragma: no cover - the operator is read from the module itself
                raise RuntimeError(f"{label}: pooled shape {out} differs from the traced {spatial_out}")
            return [L.Pool(label, maps, dense, out)]
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise ValueError(f"{_OWNER}: layer {label!r} is Flatten(start_dim={module.start_dim}, "
                                 f"end_dim={module.end_dim}); only Flatten(1, -1) (every axis but the batch) is "
                                 "supported")
            return [L.Flatten(label)] if len(shape_in) > 2 else []
        if isinstance(module, _IDENTITY):
            return []
        kernel = self._activation(module, label)
        if kernel is not None:
            return [L.Elementwise(label, kernel)]
        raise self._refusal(module, label)

    def _affine_numbers(self, module: nn.Module, label: str) -> Tuple[int, float, Optional[float]]:
        v = _variances(label, module, self.weight_var, self.bias_var)
        self.layers.append(v)
        return v.fan_in, v.weight_var, v.bias_var

    def _conv(self, module: nn.Module, label: str, shape_in: Tuple[int, ...], shape_out: Tuple[int, ...]) -> L.Op:
        kind = type(module).__name__
        nd = len(module.kernel_size)
        spatial_in = tuple(shape_in[2:])
        if isinstance(module.padding, str):
            if module.padding == "valid":
                pads = [(0, 0)] * nd
            else:  # "same": PyTorch pads total = dilation·(k − 1), the extra one on the right
                pads = []
                for d in range(nd):
                    total = module.dilation[d] * (module.kernel_size[d] - 1)
                    pads.append((total // 2, total - total // 2))
        else:
            pads = [(int(p), int(p)) for p in module.padding]
        axes = tuple(L.conv_axis(spatial_in[d], module.kernel_size[d], module.stride[d], module.dilation[d],
                                 pads[d][0], pads[d][1], module.padding_mode) for d in range(nd))
        out = tuple(ax.length for ax in axes)
        if out != tuple(shape_out[2:]):  # pragma: no cover - a PyTorch convention we do not model
            raise RuntimeError(f"{_OWNER}: layer {label!r} ({kind}): computed output positions {out}, PyTorch gave "
                               f"{tuple(shape_out[2:])}")
        fan_in, w, b = self._affine_numbers(module, label)
        return L.Affine(label, fan_in, w, b, conv=axes, spatial_out=out)

    def _activation(self, module: nn.Module, label: str) -> Optional[L.KernelMap]:
        if isinstance(module, nn.ReLU):
            self.activations.append((label, "closed form (arc-cosine)"))
            return L.relu_map
        if isinstance(module, nn.LeakyReLU):
            self.activations.append((label, "closed form (arc-cosine)"))
            return L.leaky_relu_map(float(module.negative_slope))
        if isinstance(module, Erf):
            self.activations.append((label, "closed form (Williams 1997)"))
            return L.erf_map
        if isinstance(module, nn.GELU) and module.approximate == "none":
            self.activations.append((label, "closed form (GELU)"))
            return L.gelu_map
        return None

    def _residual(self, module: Residual, name: str, label: str, shape_out: Tuple[int, ...]) -> L.Op:
        branch_name = f"{name}.branch" if name else "branch"
        branch = self.convert(module.branch, branch_name)
        last = _last_leaf(module.branch)
        if not isinstance(last, (nn.Linear,) + _CONVS):
            raise ValueError(f"{_OWNER}: Residual {label!r}: its branch ends in {type(last).__name__}, not in a Linear "
                             "or Conv layer. The kernels of a sum are the sums of the kernels only when the terms are "
                             "uncorrelated, which a last layer with zero-mean independent weights guarantees; end the "
                             "branch with a Linear or Conv layer (put the activation after the block)")
        shortcut: List[L.Op] = []
        if module.shortcut is not None:
            shortcut = self.convert(module.shortcut, f"{name}.shortcut" if name else "shortcut")
        return L.Residual(label, branch, shortcut)

    @staticmethod
    def _refusal(module: nn.Module, label: str) -> ValueError:
        kind = type(module).__name__
        hint = next((h for prefix, h in _HINTS.items() if kind.startswith(prefix)), None)
        if hint is None and list(module.children()):
            hint = (f"{kind} is a container whose forward the converter cannot read; express the network as "
                    "nn.Sequential of supported layers (lightning_ntk.analytic.Residual for skip connections) and pass "
                    "that")
        return ValueError(f"{_OWNER}: layer {label!r} ({kind}) has no analytic kernel here"
                          + (f": {hint}" if hint else "") + f". Supported: {SUPPORTED}")


def _last_leaf(module: nn.Module) -> nn.Module:
    while isinstance(module, nn.Sequential) and len(module) > 0:
        children = [m for m in module if not isinstance(m, _IDENTITY)]
        if not children:
            return module
        module = children[-1]
    return module


def compile_module(module: nn.Module, example: Tensor, weight_var: VarianceArg = None,
                   bias_var: VarianceArg = None) -> Program:
    """The kernel program of ``module`` for inputs shaped like ``example`` (one batch)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{_OWNER}: module must be an nn.Module, got {type(module).__name__}")
    conv = _Converter(weight_var, bias_var)
    conv.collect(module, "")
    # Refuse unsupported layers by name before running anything.
    _refuse_unsupported(module, "")
    conv.shapes = _trace_shapes(module, example[:1], conv.names)
    ops = conv.convert(module, "")
    out_shape = conv.shapes[conv.names[id(module)]][1]
    if len(out_shape) < 2 or math.prod(out_shape[2:]) != 1:
        raise ValueError(f"{_OWNER}: the network's output has shape (N, {', '.join(map(str, out_shape[1:]))}); the "
                         "kernels are those of (N, C) logits: end the network with Flatten and Linear, or with global "
                         "average pooling (AdaptiveAvgPool(1)) and Flatten")
    return Program(ops, tuple(conv.layers), tuple(example.shape[2:]), conv.max_positions, tuple(conv.activations))


def _refuse_unsupported(module: nn.Module, name: str) -> None:
    label = name or "<root>"
    if isinstance(module, nn.Sequential):
        for child_name, child in module.named_children():
            _refuse_unsupported(child, f"{name}.{child_name}" if name else child_name)
        return
    if isinstance(module, Residual):
        _refuse_unsupported(module.branch, f"{name}.branch" if name else "branch")
        if module.shortcut is not None:
            _refuse_unsupported(module.shortcut, f"{name}.shortcut" if name else "shortcut")
        return
    supported = (nn.Linear, nn.Flatten, Erf) + _CONVS + _POOLS + _IDENTITY + _CLOSED_FORM
    gelu = isinstance(module, nn.GELU) and module.approximate == "none"
    if not (isinstance(module, supported) or gelu):
        raise _Converter._refusal(module, label)
    if isinstance(module, _CONVS) and module.groups != 1:
        raise ValueError(f"{_OWNER}: layer {label!r} ({type(module).__name__}) has groups={module.groups}; the "
                         "Gaussian-process limit needs every output channel to sum over a growing number of input "
                         "channels, so only groups=1 is supported")
