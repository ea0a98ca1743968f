"""Default losses, per example: cross-entropy for class labels, squared error otherwise."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

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
