"""ProbeMetricsMonitor: loss, accuracy, logits and gradient norm on a fixed probe set."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .._hygiene import module_device
from .._losses import LossFn, per_example_loss
from ..probe import ProbeSet
from ..store import Field
from ._base import Monitor


def probe_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> Optional[float]:
    """Fraction of argmax predictions equal to the class label (or to the argmax of one-hot targets).

    None when targets are not class labels (a regression with float targets of another shape).
    """
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return None
    if not targets.dtype.is_floating_point and targets.ndim == 1:
        labels = targets
    elif targets.shape == outputs.shape:
        labels = targets.argmax(dim=1)
    else:
        return None
    return float((outputs.argmax(dim=1) == labels).double().mean())


class ProbeMetricsMonitor(Monitor):
    """Probe loss, accuracy, per-example loss, logits and ‖∇L‖ over training.

    On the fixed probe set, in eval mode: ``loss`` = mean of the per-example losses
    (cross-entropy for class labels, ½‖f − y‖² for float targets, or ``loss_fn``),
    ``accuracy``, ``grad_norm`` = ‖∇_θ loss‖₂ over trainable parameters (computed with
    ``torch.autograd.grad``: ``.grad`` is untouched), and per-example ``loss`` and ``logits``.

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` returning per-example losses (N,).
        store_logits: keep the (N, C) logits of each snapshot in the file.
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor`.
    """

    quantity = "probe_metrics"

    def __init__(self, path: str, *, loss_fn: Optional[LossFn] = None, store_logits: bool = True, **kwargs: Any):
        super().__init__(path, **kwargs)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("ProbeMetricsMonitor: loss_fn must be callable (outputs, targets) -> per-example losses")
        self.loss_fn = loss_fn or per_example_loss
        self.store_logits = bool(store_logits)
        self._num_outputs: Optional[int] = None

    def fields(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[Field]:
        assert probe is not None
        n = len(probe)
        fields = [Field("loss"), Field("accuracy"), Field("grad_norm"),
                  Field("example_loss", (n,), "float32", dims=("probe_example",))]
        if self.store_logits:
            sample = self.measured_model(pl_module)(probe.x[:1].to(module_device(pl_module)))
            self._num_outputs = int(sample.reshape(1, -1).shape[1])
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
        model = self.measured_model(pl_module)
        for x, y in probe.batches(self.batch_size):
            out = model(x)
            example_loss = self.loss_fn(out, y)
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
        accuracy = probe_accuracy(logits, probe.y)
        row: Dict[str, Any] = {"loss": loss, "accuracy": float("nan") if accuracy is None else accuracy,
                               "grad_norm": grad_norm, "example_loss": example_loss.float().cpu()}
        if self.store_logits:
            row["logits"] = logits.reshape(n, -1).float().cpu()
        scalars = {"loss": loss, "grad_norm": grad_norm}
        if accuracy is not None:
            scalars["accuracy"] = accuracy
        return row, scalars
