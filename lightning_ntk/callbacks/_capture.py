"""Capturing the logits of each training batch from the training forward pass itself.

A forward hook on the LightningModule keeps the outputs of ``pl_module(...)`` made in train
mode while a training batch runs (between the monitor's batch-start and batch-end hooks:
``training_step``, inside the optimiser's closure) (a tensor, the first element of a tuple, a ``logits_key``
entry of a dict or attribute of an output object). At batch end the first with one row
per target is the batch's logits. Each kept output is copied in the hook: the values of
the forward pass, whatever happens to the output afterwards (an in-place change by the
module, a CUDA graph replaying into the same buffer), and no more memory than the logits
(a view, e.g. the last token's logits, would keep its whole base alive).
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn

from ..task import predictions_in

#: Outputs kept per batch while looking for the logits (the first of each row count).
MAX_CANDIDATES = 8


class LogitsCapture:
    """The outputs of ``pl_module(...)`` during one training batch (see the module docstring)."""

    def __init__(self, logits_key: str) -> None:
        self.logits_key = logits_key
        self.candidates: List[torch.Tensor] = []
        self.first_seen: Optional[str] = None  # what the first unusable output was, for the error message
        self.active = False  # while a training batch runs
        self._handle: Any = None

    def attach(self, module: nn.Module) -> None:
        if self._handle is None:
            self._handle = module.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.clear()

    def clear(self) -> None:
        self.candidates = []
        self.first_seen = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        # A call whose output is a scalar (e.g. a loss, when a strategy routes training_step
        # through pl_module(...)) is skipped below.
        if not self.active or not module.training:
            return
        logits = predictions_in(output, self.logits_key)
        if logits is None or logits.ndim < 1:
            if self.first_seen is None:
                self.first_seen = type(output).__name__ if logits is None else f"tensor of shape {tuple(logits.shape)}"
            return
        if len(self.candidates) >= MAX_CANDIDATES or any(c.shape[0] == logits.shape[0] for c in self.candidates):
            return
        with torch.no_grad():
            self.candidates.append(logits.clone())

    def take(self, rows: int) -> Optional[torch.Tensor]:
        """The first captured output with ``rows`` rows."""
        return next((c for c in self.candidates if c.shape[0] == rows), None)

    def describe_missing(self) -> str:
        kind = self.first_seen or (f"tensor of shape {tuple(self.candidates[0].shape)}" if self.candidates else None)
        if kind:
            return f"no output of pl_module(...) held per-example logits (the first was a {kind})"
        return "the LightningModule was not called (pl_module(...)) during training_step"
