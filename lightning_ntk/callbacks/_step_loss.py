"""The loss the user trains: a LightningModule's own ``training_step`` loss as a module.

Curvature measured on another loss than the one optimised is another landscape: for
``F.mse_loss`` on one output, ½‖f − y‖² has half its Hessian, and the sharpness drawn
against 2/η is off by 2× (Cohen et al. 2021 compare the Hessian of the training loss). So
by default the monitors differentiate ``pl_module.training_step(batch, 0)`` itself (the
set's examples in the layout of the user's batches: a dict with its keys, a tuple),
whatever it computes (``F.mse_loss``, label smoothing, auxiliary terms), with the module's
logging silenced for the call (no value of the measurement reaches the user's metrics).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn


class StepLossError(ValueError):
    """The module's training_step cannot be measured as a loss: pass ``loss_fn=``."""


def check_step_loss(pl_module: Any, owner: str) -> None:
    """Refuse, before any snapshot, what cannot give the training loss of a batch."""
    if not callable(getattr(pl_module, "training_step", None)):
        raise StepLossError(f"{owner}: the model has no training_step to take the training loss from; pass "
                            "loss_fn=(outputs, targets) -> loss")
    if getattr(pl_module, "automatic_optimization", True) is False:
        raise StepLossError(f"{owner}: the module uses manual optimisation (its training_step steps the optimisers "
                            "itself), so its loss cannot be re-evaluated; pass loss_fn=(outputs, targets) -> loss, "
                            "the loss whose curvature to measure")


class TrainingStepLoss(nn.Module):
    """``forward(batch)`` = the loss ``pl_module.training_step(batch, 0)`` returns (a scalar
    tensor, or the ``"loss"`` of a dict), ``batch`` in the user's layout
    (:meth:`lightning_ntk.probe.ProbeSet.user_batch`). Its parameters are the module's
    (prefix ``module.``)."""

    def __init__(self, pl_module: nn.Module, owner: str) -> None:
        super().__init__()
        self.module = pl_module
        self._owner = owner

    def forward(self, batch: Any) -> torch.Tensor:
        try:
            out = self.module.training_step(batch, 0)
        except Exception as exc:
            layout = f"dict batches with keys {sorted(batch)}" if isinstance(batch, Mapping) else \
                f"{type(batch).__name__} batches of {len(batch)} items"
            raise StepLossError(f"{self._owner}: the module's training_step failed on the set's {layout} "
                                f"({type(exc).__name__}: {exc}); pass loss_fn=(outputs, targets) -> loss") from exc
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise StepLossError(f"{self._owner}: training_step returned {type(out).__name__}, not a loss (a scalar "
                                "tensor or {'loss': ...}); pass loss_fn=(outputs, targets) -> loss")
        return loss.reshape(())


def step_loss_of(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """The ``loss_fn`` that goes with :class:`TrainingStepLoss`: its output is the loss."""
    return outputs


@contextlib.contextmanager
def silenced_logging(pl_module: Any) -> Iterator[None]:
    """``pl_module.log`` and ``log_dict`` do nothing inside (instance attributes, removed after)."""
    saved = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}

    def ignore(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.log = pl_module.log_dict = ignore
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                pl_module.__dict__[name] = saved[name]
            else:
                pl_module.__dict__.pop(name, None)
