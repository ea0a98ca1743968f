"""Default losses, per example: cross-entropy for class labels and tokens, squared error otherwise."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .task import Task

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss of each example, shape (N,).

    Integer targets (N,): cross-entropy of the logits. Float targets of the outputs' shape:
    ½‖f(x) − y‖² (Cohen et al. 2021 use ½·squared error with one-hot targets).
    """
    if not targets.dtype.is_floating_point:
        if outputs.ndim != 2 or targets.ndim != 1:
            raise ValueError(
                f"integer targets need logits of shape (N, C) and targets (N,); got outputs {tuple(outputs.shape)}, "
                f"targets {tuple(targets.shape)}. Pass loss_fn= for other layouts"
            )
        return F.cross_entropy(outputs, targets.long(), reduction="none")
    if targets.shape != outputs.shape:
        raise ValueError(
            f"float targets must have the outputs' shape for the squared-error loss; got outputs "
            f"{tuple(outputs.shape)}, targets {tuple(targets.shape)}. Pass loss_fn= for other layouts"
        )
    return 0.5 * (outputs - targets).pow(2).reshape(outputs.shape[0], -1).sum(dim=1)


def resolve_loss(loss_fn: Optional[LossFn]) -> LossFn:
    """``loss_fn(outputs, targets)`` returning per-example losses (N,) or a mean; None -> default."""
    return per_example_loss if loss_fn is None else loss_fn


def _binary_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    b = outputs.shape[0]
    z, y = outputs.reshape(b, -1), targets.reshape(b, -1).to(outputs.dtype)
    return F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(dim=1)


def _mean_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    b = outputs.shape[0]
    return (outputs.reshape(b, -1) - targets.reshape(b, -1).to(outputs.dtype)).pow(2).mean(dim=1)


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets.long(), reduction="none")


#: The standard per-example loss of each task: ``F.cross_entropy``; ``F.binary_cross_entropy_with_logits``
#: (mean over labels); ``F.mse_loss`` (mean over outputs). Their mean over examples is the
#: batch loss PyTorch's functions compute with their default ``reduction="mean"``.
TASK_LOSSES = {"multiclass": _cross_entropy, "binary": _binary_cross_entropy, "multilabel": _binary_cross_entropy,
               "regression": _mean_squared_error}


def token_losses(outputs: torch.Tensor, targets: torch.Tensor, task: "Task") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence cross-entropy of per-token logits (B, T, V): (mean over the sequence's
    tokens whose target is not ``ignore_index``, number of those tokens). The token-weighted
    mean over sequences, sum(mean * count) / sum(count), is ``F.cross_entropy`` over every
    token with ``ignore_index`` (what a language model trains)."""
    from .task import aligned_tokens, kept_tokens

    logits, y = aligned_tokens(outputs, targets, task)
    ignore = task.ignore_index if task.ignore_index is not None else -100
    per_token = F.cross_entropy(logits.transpose(1, 2), y.long(), ignore_index=ignore, reduction="none")
    counts = kept_tokens(targets, task)
    return per_token.sum(dim=1) / counts.clamp(min=1), counts


def task_accuracy(kind: str, outputs: torch.Tensor, targets: torch.Tensor,
                  task: Optional["Task"] = None) -> Optional[float]:
    """Accuracy for a task: argmax against the label (multi-class); the logit's sign against the
    0/1 label (binary; per label for multi-label); None for regression and other tasks."""
    if kind == "multiclass":
        return float((outputs.argmax(dim=1) == targets.long()).double().mean())
    if kind in ("binary", "multilabel"):
        b = outputs.shape[0]
        return float(((outputs.reshape(b, -1) > 0) == (targets.reshape(b, -1) > 0.5)).double().mean())
    if kind == "sequence" and task is not None:  # next-token (or per-token) accuracy over the kept tokens
        from .task import aligned_tokens

        logits, y = aligned_tokens(outputs, targets, task)
        kept = y != (task.ignore_index if task.ignore_index is not None else -100)
        return float((logits.argmax(dim=2) == y)[kept].double().mean()) if bool(kept.any()) else float("nan")
    return None
