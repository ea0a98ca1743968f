"""ProbeMetricsMonitor: loss, accuracy, logits and gradient norm on a fixed probe set."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import _args
from .._hygiene import module_device
from .._losses import TASK_LOSSES, LossFn, task_accuracy
from ..probe import ProbeSet
from ..store import Field
from ..task import TASKS, Task, TaskError, detect_task
from ._base import Monitor


class ProbeMetricsMonitor(Monitor):
    """Probe loss, accuracy, per-example loss, logits and ‖∇L‖ over training.

    On the fixed probe set, in eval mode: ``loss`` = mean of the per-example losses,
    ``accuracy``, ``grad_norm`` = ‖∇_θ loss‖₂ over trainable parameters (computed with
    ``torch.autograd.grad``: ``.grad`` is untouched), and per-example ``loss`` and ``logits``.
    The task (:mod:`lightning_ntk.task`) is detected from the probe at train start.

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` returning per-example losses (N,). Default:
            the task's standard loss, whose mean is what ``F.cross_entropy``,
            ``F.binary_cross_entropy_with_logits`` (binary, multi-label) or ``F.mse_loss``
            (regression) compute on a batch. Accuracy: argmax (multi-class), the logit's
            sign (binary, per label for multi-label); NaN for regression.
        task: overrides the detected task.
        store_logits: keep the (N, C) logits of each snapshot in the file.
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor`.
    """

    quantity = "probe_metrics"

    def __init__(self, path: str, *, loss_fn: Optional[LossFn] = None, store_logits: bool = True,
                 task: Optional[str] = None, **kwargs: Any):
        super().__init__(path, **kwargs)
        owner = type(self).__name__
        self.loss_fn = _args.function(loss_fn, "loss_fn", owner, signature="(outputs, targets) -> per-example losses")
        self.store_logits = bool(store_logits)
        self.task = None if task is None else _args.one_of(task, "task", TASKS, owner)
        self._task = Task("multiclass", 0)  # detected at train start (fields)
        self._num_outputs: Optional[int] = None

    def config_extra(self) -> Dict[str, Any]:
        loss = "task default" if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", "function")
        return dict(super().config_extra(), detected_task=self._task.to_config(), loss=loss)

    def fields(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[Field]:
        assert probe is not None
        n = len(probe)
        fields = [Field("loss"), Field("accuracy"), Field("grad_norm"),
                  Field("example_loss", (n,), "float32", dims=("probe_example",))]
        rows, device = min(n, 32), module_device(pl_module)
        sample = self.measured_model(pl_module)(probe.x[:rows].to(device))
        self._task = detect_task(sample, probe.y[:rows].to(device), self.task, owner=type(self).__name__)
        if self.loss_fn is None and self._task.kind not in TASK_LOSSES:
            raise TaskError(f"{type(self).__name__}: no default loss for {self._task.kind} outputs; pass "
                            "loss_fn=(outputs, targets) -> per-example losses")
        if self.store_logits:
            self._num_outputs = int(sample.reshape(rows, -1).shape[1])
            fields.append(Field("logits", (n, self._num_outputs), "float32", dims=("probe_example", "output")))
        return fields

    def coords(self, probe: Optional[ProbeSet]) -> Dict[str, Any]:
        coords = super().coords(probe)
        if self._num_outputs is not None:
            coords["output"] = torch.arange(self._num_outputs).numpy()
        return coords

    def measure(self, trainer: Any, pl_module: nn.Module, probe: Optional[ProbeSet]) -> Tuple[Dict[str, Any], Dict[str, float]]:
        assert probe is not None
        params = [p for p in pl_module.parameters() if p.requires_grad]
        n = len(probe)
        grads = [torch.zeros_like(p) for p in params]
        losses, outputs = [], []
        model, loss_fn = self.measured_model(pl_module), self.loss_fn or TASK_LOSSES[self._task.kind]
        for x, y in probe.batches(self.batch_size):
            out = model(x)
            example_loss = loss_fn(out, y)
            if example_loss.ndim != 1 or example_loss.shape[0] != x.shape[0]:
                raise ValueError(
                    f"loss_fn must return per-example losses of shape ({x.shape[0]},), got {tuple(example_loss.shape)}"
                )
            if params:
                chunk_grads = torch.autograd.grad(example_loss.sum() / n, params, allow_unused=True)
                for total, g in zip(grads, chunk_grads):
                    if g is not None:
                        total.add_(g)
            losses.append(example_loss.detach())
            outputs.append(out.detach())
        example_loss = torch.cat(losses)
        logits = torch.cat(outputs)
        loss = float(example_loss.double().mean())
        grad_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) if grads else 0.0
        accuracy = task_accuracy(self._task.kind, logits, probe.y)
        row: Dict[str, Any] = {"loss": loss, "accuracy": float("nan") if accuracy is None else accuracy,
                               "grad_norm": grad_norm, "example_loss": example_loss.float().cpu()}
        if self.store_logits:
            row["logits"] = logits.reshape(n, -1).float().cpu()
        scalars = {"loss": loss, "grad_norm": grad_norm}
        if accuracy is not None:
            scalars["accuracy"] = accuracy
        return row, scalars
