"""Shared core of the landscape functions: data passes, the loss and error of a model on a
set, weights loaded at a point of weight space, the model restored afterwards.

Loss and error by task (:mod:`lightning_ntk.task`, detected from the first batch or given
with ``task=``), each a mean over the set's units:

=============  ==================================================  =========================
task           loss                                                error (unit)
=============  ==================================================  =========================
multiclass     cross-entropy of the logits                         argmax != label (example)
binary         binary cross-entropy with logits                    (logit > 0) != label (example)
multilabel     binary cross-entropy, mean over labels              wrong labels / labels (example)
sequence       cross-entropy per kept token                        argmax != token (kept token)
regression     squared error, mean over outputs (``F.mse_loss``)   none: NaN unless ``error_fn``
=============  ==================================================  =========================

Regression is only measured when asked for (``task="regression"``): real targets are never
taken for regression silently. ``loss_fn(outputs, targets)`` (per-example losses (N,) or the
batch mean, weighted by the batch's examples) and ``error_fn(outputs, targets)`` (per-example
errors (N,)) replace the defaults.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .._hygiene import measurement_mode, module_device
from .._losses import TASK_LOSSES, token_losses
from ..curvature._loss_set import _is_single_batch
from ..probe import BatchFormat, ProbeSet, batch_to_xy
from ..task import TASKS, Task, TaskError, aligned_tokens, detect_task, predictions_in

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ErrorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ForwardFn = Callable[[nn.Module, Any], Any]
#: A weight vector: a state_dict (every entry of ``model.state_dict()``) or one flat tensor
#: over ``model.parameters()`` (``torch.nn.utils.parameters_to_vector``'s order).
Weights = Union[Mapping[str, torch.Tensor], torch.Tensor]
#: Data: an iterable of batches that can be iterated again (a DataLoader, a list), one
#: ``(x, y)`` batch, or a :class:`~lightning_ntk.probe.ProbeSet`.
Data = Any
#: Every data pass starts from this torch seed (global RNG forked): a shuffling DataLoader
#: (no generator of its own) yields the same batches at every point.
DATA_SEED = 0


def as_reiterable(data: Data, name: str, owner: str) -> Iterable[Any]:
    """``data`` as something every point can iterate again."""
    if data is None:
        raise TypeError(f"{owner}: {name} is None; pass a DataLoader, a list of (x, y) batches or one (x, y) batch")
    if isinstance(data, ProbeSet):
        return [(data.x, data.y)]
    if _is_single_batch(data):
        return [data]
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be a DataLoader, a list of (x, y) batches or one (x, y) batch; got "
                        f"{type(data).__name__}") from None
    if it is data:
        raise TypeError(f"{owner}: {name} is a one-shot iterator ({type(data).__name__}), and every point of weight "
                        "space needs a pass over it; pass a DataLoader or a list of batches")
    return data


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def forward(model: nn.Module, x: Any, forward_fn: Optional[ForwardFn]) -> torch.Tensor:
    """The model's predictions on ``x``: ``forward_fn(model, x)``, else ``model(*x)`` for a
    tuple/list of inputs and ``model(x)`` otherwise; a dict/HF output's ``logits``."""
    if forward_fn is not None:
        out = forward_fn(model, x)
    else:
        out = model(*x) if isinstance(x, (tuple, list)) else model(x)
    predictions = predictions_in(out)
    if predictions is None:
        raise TypeError(f"the model returned a {type(out).__name__} without a tensor of predictions (a tensor, a "
                        "'logits' key or .logits attribute, a tuple's first element); pass forward_fn=(model, x) -> "
                        "the per-example predictions")
    return predictions


@contextlib.contextmanager
def data_pass() -> Iterator[None]:
    """The global RNG forked and seeded with :data:`DATA_SEED` (same batches, same augmentation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DATA_SEED)
        yield


# ----------------------------------------------------------------------------- weights
def as_state(model: nn.Module, weights: Weights, name: str, owner: str) -> Dict[str, torch.Tensor]:
    """``weights`` as tensors keyed by state_dict names, on the model's devices and dtypes:
    a state_dict must have exactly the model's entries; a flat vector gives the parameters
    only (names of ``named_parameters``, tied ones once)."""
    reference = model.state_dict()
    if isinstance(weights, torch.Tensor):
        params = list(model.named_parameters())
        total = sum(p.numel() for _, p in params)
        if weights.dim() != 1 or weights.numel() != total:
            raise ValueError(f"{owner}: {name} as a vector must be flat with the model's {total} parameter entries "
                             f"(torch.nn.utils.parameters_to_vector(model.parameters())), got shape "
                             f"{tuple(weights.shape)}")
        out, offset = {}, 0
        for key, p in params:
            out[key] = weights[offset:offset + p.numel()].reshape(p.shape).detach().to(p.device, p.dtype)
            offset += p.numel()
        return out
    if not isinstance(weights, Mapping):
        raise TypeError(f"{owner}: {name} must be a state_dict (model.state_dict()) or a flat parameter vector, got "
                        f"{type(weights).__name__}")
    missing = [k for k in reference if k not in weights]
    unexpected = [k for k in weights if k not in reference]
    if missing or unexpected:
        raise ValueError(f"{owner}: {name} is not a state_dict of this architecture: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}; pass model.state_dict() of the same architecture")
    out = {}
    for key, ref in reference.items():
        value = weights[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ref.shape):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{owner}: {name}[{key!r}] has shape {found}, the model's {tuple(ref.shape)}")
        out[key] = value.detach().to(ref.device, ref.dtype)
    return out


def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of every state_dict entry (restored exactly by :func:`restore`)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state, strict=True)


def load(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Write ``state`` (some or all state_dict entries) into the model, in place."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # built from the model's own names: a bug if it happens
        raise RuntimeError(f"unexpected keys {result.unexpected_keys}")


# ----------------------------------------------------------------------------- loss and error
@dataclass
class Totals:
    """Sums over a pass: loss and error and the units each is a mean over."""

    loss: float = 0.0
    loss_units: float = 0.0
    error: float = 0.0
    error_units: float = 0.0

    def means(self) -> Tuple[float, float]:
        loss = self.loss / self.loss_units if self.loss_units else float("nan")
        error = self.error / self.error_units if self.error_units else float("nan")
        return loss, error


class Measure:
    """Loss and error of a model on a data set (see the module docstring); the task is
    detected from the first batch of the first pass and kept for every later pass."""

    def __init__(self, data: Data, *, loss_fn: Optional[LossFn], error_fn: Optional[ErrorFn], task: Optional[str],
                 batch_format: BatchFormat, forward_fn: Optional[ForwardFn], owner: str):
        if task is not None and task not in TASKS:
            raise ValueError(f"{owner}: task must be one of {', '.join(map(repr, TASKS))} or None (detect), got {task!r}")
        if task == "none":
            raise ValueError(f"{owner}: task='none' has no targets, and a loss needs them")
        for value, argname in ((loss_fn, "loss_fn"), (error_fn, "error_fn"), (forward_fn, "forward_fn")):
            if value is not None and not callable(value):
                raise TypeError(f"{owner}: {argname} must be callable or None, got {type(value).__name__}")
        self.data = as_reiterable(data, "data", owner)
        self.loss_fn, self.error_fn, self.requested = loss_fn, error_fn, task
        self.batch_format, self.forward_fn, self.owner = batch_format, forward_fn, owner
        self.task: Optional[Task] = None

    def _detect(self, outputs: torch.Tensor, y: torch.Tensor, x: Any) -> Task:
        found = detect_task(outputs, y, self.requested, owner=self.owner, inputs=x)
        if found.kind == "regression" and self.requested != "regression":
            raise TaskError(f"{self.owner}: outputs of shape {tuple(outputs.shape)} and real targets of shape "
                            f"{tuple(y.shape)} look like regression, which is measured only when asked for: pass "
                            "task='regression' (loss: mean squared error over outputs; error: NaN unless error_fn=), "
                            "or loss_fn=/error_fn= with the task= that fits")
        if found.kind == "none":
            raise TaskError(f"{self.owner}: the batches have no targets; pass batch_format= returning (x, y)")
        return found

    def _xy(self, i: int, batch: Any, device: torch.device) -> Optional[Tuple[Any, torch.Tensor]]:
        """A batch's (x, y) on ``device``; None for an empty batch."""
        try:
            x, y = batch_to_xy(batch, self.batch_format)
        except TypeError as exc:
            raise type(exc)(f"{self.owner}: batch {i}: {exc}") from exc
        if not isinstance(y, torch.Tensor) or y.dim() == 0:
            raise TypeError(f"{self.owner}: batch {i}: targets must be a tensor with a batch dimension")
        if y.shape[0] == 0:
            return None
        return to_device(x, device), y.to(device)

    def detect(self, model: nn.Module) -> Task:
        """The task, from the model's outputs on the first non-empty batch (eval mode, no_grad)."""
        if self.task is None:
            with measurement_mode(model, grad=False) as measured, data_pass():
                for i, batch in enumerate(self.data):
                    xy = self._xy(i, batch, module_device(model))
                    if xy is not None:
                        self.task = self._detect(forward(measured, xy[0], self.forward_fn), xy[1], xy[0])
                        break
        if self.task is None:
            raise ValueError(f"{self.owner}: data holds no examples")
        return self.task

    def run(self, model: nn.Module) -> Tuple[float, float]:
        """(mean loss, mean error) of ``model`` as it is (call inside eval mode and no_grad)."""
        device = module_device(model)
        totals = Totals()
        with data_pass():
            for i, batch in enumerate(self.data):
                xy = self._xy(i, batch, device)
                if xy is None:
                    continue
                x, y = xy
                outputs = forward(model, x, self.forward_fn)
                if self.task is None:
                    self.task = self._detect(outputs, y, x)
                self._add(totals, outputs, y)
        if not totals.loss_units:
            raise ValueError(f"{self.owner}: data holds no examples")
        return totals.means()

    def _add(self, totals: Totals, outputs: torch.Tensor, y: torch.Tensor) -> None:
        task = self.task
        assert task is not None
        n = int(y.shape[0])
        if task.kind == "sequence":
            per_sequence, counts = token_losses(outputs, y, task)
            loss_sum, loss_units = float((per_sequence.double() * counts).sum()), float(counts.sum())
            logits, targets = aligned_tokens(outputs, y, task)
            kept = targets != (task.ignore_index if task.ignore_index is not None else -100)
            error_sum, error_units = float((logits.argmax(dim=2) != targets)[kept].sum()), float(kept.sum())
        else:
            loss_sum = float(TASK_LOSSES[task.kind](outputs, y).double().sum()) if self.loss_fn is None else 0.0
            loss_units = float(n)
            error_units = float(n)
            b = outputs.shape[0]
            if task.kind == "multiclass":
                error_sum = float((outputs.argmax(dim=1) != y.long()).sum())
            elif task.kind in ("binary", "multilabel"):
                wrong = (outputs.reshape(b, -1) > 0) != (y.reshape(b, -1) > 0.5)
                error_sum = float(wrong.double().mean(dim=1).sum())
            else:  # regression: no error rate
                error_sum, error_units = float("nan"), float(n)
        if self.loss_fn is not None:
            loss = self.loss_fn(outputs, y)
            if not isinstance(loss, torch.Tensor) or not (loss.numel() == 1 or tuple(loss.shape) == (n,)):
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"{self.owner}: loss_fn must return per-example losses of shape ({n},) or their mean "
                                 f"(a scalar); got {shape}")
            loss_sum = float(loss.double().sum()) if loss.numel() == n and loss.dim() == 1 else float(loss) * n
            loss_units = float(n)
        if self.error_fn is not None:
            errors = self.error_fn(outputs, y)
            if not isinstance(errors, torch.Tensor) or tuple(errors.shape) != (n,):
                shape = tuple(errors.shape) if isinstance(errors, torch.Tensor) else type(errors).__name__
                raise ValueError(f"{self.owner}: error_fn must return per-example errors of shape ({n},); got {shape}")
            error_sum, error_units = float(errors.double().sum()), float(n)
        totals.loss += loss_sum
        totals.loss_units += loss_units
        totals.error += error_sum
        totals.error_units += error_units


@contextlib.contextmanager
def kept_intact(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: eval mode, no gradients, RNG forked; afterwards every state_dict entry, every
    module's train/eval flag and the global RNGs are as they were."""
    saved = snapshot(model)
    try:
        with measurement_mode(model, grad=False) as measured:
            yield measured
    finally:
        restore(model, saved)

