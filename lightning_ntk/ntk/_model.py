"""The model as a function of its parameters: parameter selection, dtype, input checks.

Every engine evaluates ``model`` through :func:`torch.func.functional_call` with detached
copies of the parameters (the selected ones as fresh leaves that require grad), so the
model's own parameters, their ``.grad`` and their hooks are never touched, tied parameters
stay tied (``tie_weights=True``), and ``dtype`` can differ from the model's without
converting the model.
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._modules import BATCH_NORMS, DROPOUTS

ParamsArg = Optional[Iterable[Union[str, nn.Parameter]]]


def select_parameters(model: nn.Module, params: ParamsArg) -> List[Tuple[str, nn.Parameter]]:
    """The parameters the kernel is taken with respect to, once per parameter object.

    ``params=None``: every parameter with ``requires_grad``. Otherwise an iterable of
    parameter objects and/or names (any alias of a tied parameter); each object counts once.
    Returned in the model's order, each under its first name in ``model.named_parameters()``.
    """
    first_name: Dict[int, str] = {}
    ordered: List[Tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():  # remove_duplicate=True: first name per object
        first_name[id(p)] = name
        ordered.append((name, p))
    if params is None:
        chosen = [(n, p) for n, p in ordered if p.requires_grad]
        if not chosen:
            raise ValueError(
                "empirical_ntk: the model has no parameter with requires_grad=True; pass params= "
                "(parameters or names) to choose the parameters of the kernel"
            )
        return chosen
    if isinstance(params, (str, Tensor)):
        params = [params]  # type: ignore[list-item]
    alias: Dict[str, nn.Parameter] = dict(model.named_parameters(remove_duplicate=False))
    wanted = set()
    for item in params:
        if isinstance(item, str):
            if item not in alias:
                some = ", ".join(list(alias)[:8])
                raise ValueError(
                    f"empirical_ntk: params names {item!r}, which is not a parameter of the model "
                    f"(names look like: {some}{', ...' if len(alias) > 8 else ''})"
                )
            wanted.add(id(alias[item]))
        elif isinstance(item, Tensor):
            if id(item) not in first_name:
                raise ValueError(
                    f"empirical_ntk: params holds a tensor of shape {tuple(item.shape)} that is not a "
                    "parameter of the model (pass model parameters or their names)"
                )
            wanted.add(id(item))
        else:
            raise TypeError(
                f"empirical_ntk: params must be an iterable of parameters or parameter names, got an item of type "
                f"{type(item).__name__}"
            )
    chosen = [(n, p) for n, p in ordered if id(p) in wanted]
    if not chosen:
        raise ValueError("empirical_ntk: params selects no parameter; pass at least one parameter or name")
    return chosen


def layer_name(param_name: str) -> str:
    """The module path owning a parameter (``"encoder.fc1.weight" -> "encoder.fc1"``).

    A parameter registered on the root module is its own layer (``"scale" -> "scale"``).
    """
    head, _, _tail = param_name.rpartition(".")
    return head if head else param_name


def check_autograd() -> None:
    """The eNTK needs autograd, which ``torch.inference_mode`` cannot give back."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "empirical_ntk needs autograd but was called under torch.inference_mode (e.g. from a Lightning "
            "validation hook); call it from a training hook or pass inference_mode=False to the Trainer"
        )


def check_modes(model: nn.Module) -> bool:
    """Refuse batch-statistics BatchNorm; warn about active dropout (returns True then).

    With batch statistics the output of one example depends on the others (there is no
    per-example Jacobian) and each forward pass would update the running statistics.
    """
    for name, m in model.named_modules():
        if isinstance(m, BATCH_NORMS):
            if m.training or m.running_mean is None:
                why = "is in training mode" if m.training else "has track_running_stats=False"
                raise ValueError(
                    f"empirical_ntk: BatchNorm module {name or type(m).__name__!r} {why}, so it normalises with "
                    "batch statistics: examples are coupled and the eNTK is not defined per example (and running "
                    "statistics would change). Call model.eval() before computing the kernel (NTKMonitor does this "
                    "for you and restores the mode afterwards)."
                )
    for name, m in model.named_modules():
        if isinstance(m, DROPOUTS) and m.training and m.p > 0:
            warnings.warn(
                f"empirical_ntk: dropout module {name!r} is in training mode, so the kernel is random; call "
                "model.eval() first for the deterministic eNTK",
                RuntimeWarning,
                stacklevel=4,
            )
            return True
    return False


def model_device(model: nn.Module, selected: Sequence[Tuple[str, nn.Parameter]]) -> torch.device:
    return selected[0][1].device


def resolve_dtype(dtype: Optional[torch.dtype], selected: Sequence[Tuple[str, nn.Parameter]]) -> torch.dtype:
    """``dtype``, or the parameters' dtype when it is float32/float64, or float32 (a kernel
    accumulated in float16/bfloat16 would lose most of its digits)."""
    if dtype is None:
        dtype = selected[0][1].dtype
        if not dtype.is_floating_point:
            raise TypeError(f"empirical_ntk: parameter {selected[0][0]!r} has non-floating dtype {dtype}")
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"empirical_ntk: dtype must be a floating torch.dtype (e.g. torch.float64), got {dtype!r}")
    return dtype


def prepare_input(x: Tensor, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Move to the model's device, cast floating inputs to ``dtype``, leave integer ids alone."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"empirical_ntk: {name} must be a tensor of examples (batch first), got {type(x).__name__}; "
            "for models with several inputs, wrap the model in a module that takes one tensor"
        )
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"empirical_ntk: {name} must hold at least one example along its first axis, got shape {tuple(x.shape)}")
    if x.is_inference():
        x = x.clone()  # an inference tensor cannot enter autograd; a clone outside inference mode can
    x = x.detach().to(device)
    if x.is_floating_point() and x.dtype != dtype:
        x = x.to(dtype)
    return x


class FunctionalModel:
    """``model`` as ``f(params, x) -> (B, C)`` with the selected parameters as arguments.

    ``leaves`` holds one fresh leaf (requires grad) per selected parameter object; the other
    parameters and the floating buffers are detached (and cast when ``dtype`` differs).
    """

    def __init__(self, model: nn.Module, selected: Sequence[Tuple[str, nn.Parameter]], dtype: torch.dtype):
        self.model = model
        self.dtype = dtype
        self.names = [n for n, _ in selected]
        self.params = [p for _, p in selected]
        selected_ids = {id(p) for p in self.params}
        # Embedding(max_norm=...) renormalises its table in place during forward: work on a copy
        mutated = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.max_norm is not None}

        def cast(t: Tensor) -> Tensor:
            copy = id(t) in mutated
            t = t.detach()
            if t.is_floating_point() and t.dtype != dtype:
                return t.to(dtype)
            return t.clone() if copy else t

        self.leaves: Dict[str, Tensor] = {n: cast(p).requires_grad_(True) for n, p in selected}
        self.detached: Dict[str, Tensor] = {n: t.detach() for n, t in self.leaves.items()}
        self.fixed: Dict[str, Tensor] = {}
        for n, p in model.named_parameters():
            if id(p) not in selected_ids:
                self.fixed[n] = cast(p)
        for n, b in model.named_buffers():
            if b.is_floating_point() and b.dtype != dtype:
                self.fixed[n] = cast(b)
        self.numel = {n: t.numel() for n, t in self.leaves.items()}

    def __call__(self, x: Tensor, override: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """Batched call (B, ...) -> (B, C) with the grad-requiring leaves, or, when
        ``override`` is given, with those tensors and detached values for the rest."""
        values = dict(self.fixed)
        if override is None:
            values.update(self.leaves)
        else:
            values.update(self.detached)
            values.update(override)
        out = functional_call(self.model, values, (x,), tie_weights=True, strict=False)
        return as_logits(out, x.shape[0])

    def single(self, x: Tensor, override: Dict[str, Tensor]) -> Tensor:
        """One example (no batch axis) -> (C,), for torch.func transforms."""
        return self(x.unsqueeze(0), override)[0]


def as_logits(out: object, batch: int) -> Tensor:
    """Check the model output and view it as (B, C); an (N,) output is C = 1."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"empirical_ntk: the model must return one tensor of logits (N, C) or (N,), got {type(out).__name__}; "
            "wrap the model in a module that returns the logits"
        )
    if out.dim() == 1 and out.shape[0] == batch:
        return out.unsqueeze(1)
    if out.dim() == 2 and out.shape[0] == batch:
        return out
    raise ValueError(
        f"empirical_ntk: the model must return logits of shape (N, C) or (N,) for N = {batch} examples, got "
        f"{tuple(out.shape)}; wrap the model so that it returns one row of logits per example"
    )
