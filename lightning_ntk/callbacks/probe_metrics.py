"""ProbeMetricsMonitor: loss, accuracy, logits and gradient norm on a fixed probe set."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import _args
from .._hygiene import module_device
from .._losses import TASK_LOSSES, LossFn, task_accuracy, token_losses
from ..probe import ProbeSet
from ..sizing import CostModel
from ..store import Field
from ..task import TASKS, Task, TaskError, detect_task, kept_tokens
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
            (regression) compute on a batch; per-token outputs (B, T, V): each sequence's
            mean cross-entropy over its tokens (``ignore_index`` left out, shifted by one
            for a causal LM), ``loss`` the token-weighted mean (what the LM trains).
            Accuracy: argmax (multi-class; per token for sequences), the logit's sign
            (binary, per label for multi-label); NaN for regression.
        task: overrides the detected task.
        store_logits: keep the (N, C) (or (N, T, V)) logits of each snapshot in the file,
            while a row stays under ``max_row_mb`` (else left out, named in the table's
            ``dropped_fields``).
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor`.
    """

    quantity = "probe_metrics"
    smaller_rows = "a smaller probe="

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
        x = probe.x[:rows].to(device)
        sample = self.sample_outputs(pl_module, x)
        self._task = detect_task(sample, probe.y[:rows].to(device), self.task, owner=type(self).__name__, inputs=x)
        if self.loss_fn is None and self._task.kind not in TASK_LOSSES and self._task.kind != "sequence":
            raise TaskError(f"{type(self).__name__}: no default loss for {self._task.kind} outputs; pass "
                            "loss_fn=(outputs, targets) -> per-example losses")
        if self.store_logits:
            self._num_outputs = int(sample.shape[-1]) if sample.ndim == 3 else int(sample.reshape(rows, -1).shape[1])
            if sample.ndim == 3:
                fields.append(Field("logits", (n, sample.shape[1], self._num_outputs), "float32",
                                    dims=("probe_example", "position", "output")))
            else:
                fields.append(Field("logits", (n, self._num_outputs), "float32", dims=("probe_example", "output")))
        return fields

    def table_specs(self, probe, pl_module):
        specs = super().table_specs(probe, pl_module)
        specs[0].optional = ("logits",)
        specs[0].attrs["task"] = self._task.to_config()
        return specs

    def cost_model(self, trainer: Any, pl_module: nn.Module, probe: ProbeSet) -> Optional[CostModel]:
        """A snapshot (stateless) timed on 16 and 32 probe examples: linear in the probe size."""
        return self.snapshot_cost(trainer, pl_module)

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
        losses, weights, outputs = [], [], []
        model, task = self.measured_model(pl_module), self._task
        per_token = self.loss_fn is None and task.kind == "sequence"
        # sequences: weighted by their kept tokens, so the loss is the token mean the LM trains
        total = float(kept_tokens(probe.y, task).sum()) if per_token else float(n)
        for x, y in probe.batches(self.batch_size):
            out = model(x)
            if per_token:
                example_loss, weight = token_losses(out, y, task)
            else:
                example_loss = (self.loss_fn or TASK_LOSSES[task.kind])(out, y)
                weight = torch.ones_like(example_loss)
            if example_loss.ndim != 1 or example_loss.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{type(self).__name__}: loss_fn must return per-example losses of shape ({x.shape[0]},), got "
                    f"{tuple(example_loss.shape)}; pass a loss_fn= that keeps one loss per example (reduction='none')"
                )
            if params:
                chunk_grads = torch.autograd.grad((example_loss * weight).sum() / total, params, allow_unused=True)
                for acc, g in zip(grads, chunk_grads):
                    if g is not None:
                        acc.add_(g)
            losses.append(example_loss.detach())
            weights.append(weight.detach().double())
            outputs.append(out.detach())
        example_loss, weight = torch.cat(losses), torch.cat(weights)
        logits = torch.cat(outputs)
        loss = float((example_loss.double() * weight).sum() / weight.sum())
        grad_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) if grads else 0.0
        accuracy = task_accuracy(task.kind, logits, probe.y, task)
        row: Dict[str, Any] = {"loss": loss, "accuracy": float("nan") if accuracy is None else accuracy,
                               "grad_norm": grad_norm, "example_loss": example_loss.float().cpu()}
        if self.store_logits:
            row["logits"] = (logits if logits.ndim == 3 else logits.reshape(n, -1)).float().cpu()
        scalars = {"loss": loss, "grad_norm": grad_norm}
        if accuracy is not None:
            scalars["accuracy"] = accuracy
        return row, scalars
