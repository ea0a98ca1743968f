"""What a model's outputs and targets mean: the task, detected from one batch, never guessed.

=============  ==========================================  ===================================
kind           outputs                                     targets
=============  ==========================================  ===================================
multiclass     (B, C), C >= 2                              (B,) integer class labels in [0, C)
binary         (B,) or (B, 1): one logit                   (B,) integer (or bool) in {0, 1}
multilabel     (B, C), one logit per label                 (B, C) integer (or bool) in {0, 1}
sequence       (B, T, V): per-token logits                 (B, T) integer tokens; ``ignore_index``
regression     (B,) or (B, K): real predictions            real values of the outputs' shape
none           anything                                    no targets
=============  ==========================================  ===================================

Ambiguous layouts are refused with the ``task=`` that settles them: one real output with
real targets that are all 0 or 1 is binary classification as often as it is regression
(and (B, C) real targets in {0, 1} multi-label as often as regression). Outputs that are
not per-example predictions of the targets (a generator's images, a feature map) are
refused too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch

TASKS = ("multiclass", "binary", "multilabel", "sequence", "regression", "none")
#: Targets equal to this are ignored in sequence tasks (PyTorch's and Hugging Face's default).
IGNORE_INDEX = -100


class TaskError(ValueError):
    """The outputs and targets do not fit a task (or fit several): the message says which ``task=`` to pass."""


@dataclass(frozen=True)
class Task:
    """A detected (or given) task: its ``kind`` (one of :data:`TASKS`) and its output width
    (classes, labels, vocabulary size or regression outputs)."""

    kind: str
    num_outputs: int
    ignore_index: Optional[int] = None

    def to_config(self) -> Dict[str, Any]:
        return asdict(self)


def _is_integer(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex()


def _binary_values(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all()) if t.numel() else True


def _describe(outputs: torch.Tensor, targets: Optional[torch.Tensor]) -> str:
    y = "no targets" if targets is None else f"targets of shape {tuple(targets.shape)} ({targets.dtype})"
    return f"outputs of shape {tuple(outputs.shape)} and {y}"


def detect_task(outputs: torch.Tensor, targets: Optional[torch.Tensor], task: Optional[str] = None, *,
                owner: str = "") -> Task:
    """The task of a batch of ``outputs`` and ``targets`` (see the module docstring).

    ``task`` (one of :data:`TASKS`) overrides detection; it is checked against the shapes.
    Raises :class:`TaskError` naming what was found and the ``task=`` that fixes it.
    """
    prefix = f"{owner}: " if owner else ""
    if task is not None and task not in TASKS:
        raise TaskError(f"{prefix}task must be one of {', '.join(map(repr, TASKS))} or None (detect), got {task!r}")
    found = _describe(outputs, targets)
    if targets is None or task == "none":
        if task not in (None, "none"):
            raise TaskError(f"{prefix}task={task!r} needs targets, and the batch has none")
        return Task("none", int(outputs[0].numel()) if outputs.ndim else 1)
    b = outputs.shape[0] if outputs.ndim else 0
    if outputs.ndim == 0 or targets.ndim == 0 or targets.shape[0] != b:
        raise TaskError(f"{prefix}{found}: not one prediction per example (the first axes differ); pass "
                        "outputs_key= or forward_fn= to select the per-example predictions")
    y = targets.detach()
    if outputs.ndim == 3:
        if _is_integer(y) and y.shape == outputs.shape[:2] and task in (None, "sequence"):
            return Task("sequence", int(outputs.shape[2]), IGNORE_INDEX)
        raise TaskError(f"{prefix}{found}: per-token outputs (B, T, V) need integer targets (B, T)")
    if outputs.ndim > 3:
        raise TaskError(f"{prefix}{found}: the outputs are not per-example predictions of the targets (a "
                        "generator's images or a feature map?); pass forward_fn= (or outputs_key=) returning "
                        "per-example logits or predictions")
    width = 1 if outputs.ndim == 1 else int(outputs.shape[1])
    one_per_example = y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)
    same_shape = y.reshape(b, -1).shape[1] == width and (y.ndim == outputs.ndim or one_per_example)
    if _is_integer(y) or y.dtype == torch.bool:
        if width == 1 and one_per_example and _binary_values(y) and task in (None, "binary"):
            return Task("binary", 1)
        if width >= 2 and y.ndim == 1 and task in (None, "multiclass"):
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= width):
                raise TaskError(f"{prefix}{found}: class labels must lie in [0, {width - 1}], got values in "
                                f"[{int(y.min())}, {int(y.max())}]")
            return Task("multiclass", width)
        if width >= 2 and y.shape == outputs.shape and _binary_values(y) and task in (None, "multilabel"):
            return Task("multilabel", width)
        if task == "regression" and same_shape:
            return Task("regression", width)
        raise TaskError(f"{prefix}{found}: no task fits" + (f" task={task!r}" if task else "") + ": multiclass "
                        "needs (B, C) logits and (B,) labels, binary one logit and labels in {0, 1}, multilabel "
                        "(B, C) logits and (B, C) labels in {0, 1}")
    # real-valued targets
    if task == "multiclass" and width >= 2 and y.ndim == 1 and bool((y == torch.round(y)).all()):
        return Task("multiclass", width)
    if not same_shape:
        raise TaskError(f"{prefix}{found}: real targets of another shape than the outputs are not per-example "
                        "predictions of them; pass task= and forward_fn= (or outputs_key=) returning one "
                        "prediction per target")
    binary_like = _binary_values(y)
    if task is None and binary_like:
        which = "binary" if width == 1 else "multilabel"
        raise TaskError(f"{prefix}{found}: real targets that are all 0 or 1 are {which} classification as often "
                        f"as regression; pass task='{which}' or task='regression'")
    if task in (None, "regression"):
        return Task("regression", width)
    if task in ("binary", "multilabel") and binary_like and (width == 1) == (task == "binary"):
        return Task(task, width)
    raise TaskError(f"{prefix}{found}: task={task!r} does not fit these outputs and targets")
