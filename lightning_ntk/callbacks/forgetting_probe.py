"""ProbeForgettingMonitor: forgetting and cartography from an eval-mode pass over a fixed
probe on a schedule (NOT Toneva et al.'s definition; :class:`~.forgetting.ForgettingMonitor`
follows the paper)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..forgetting import presentation_outcomes
from ..probe import ProbeSet
from ..schedule import EveryNEpochs, Schedule
from ..task import predictions_in
from ._base import Monitor
from ._declared import TableSpec
from ._forgetting_tables import (
    PROBE_DEFINITION,
    ForgettingCaptureError,
    TrackedExamples,
    events_and_examples,
    forgetting_scalars,
)


class ProbeForgettingMonitor(Monitor):
    """Forgetting and cartography from an eval-mode pass over a fixed probe on a schedule
    (default: every epoch); each snapshot is one presentation of every probe example and one
    cartography epoch. NOT Toneva et al.'s definition (their presentations are training
    mini-batches, read before the update): labelled so in the run file. Tables as
    :class:`ForgettingMonitor`'s (group ``forgetting``).

    Args:
        outputs_key: key of the logits in a dict output.
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor` (``probe``, ``schedule``, ...).
    """

    quantity = "forgetting"
    per_fit = ("_examples",)  # a new fit starts with no tracker; a checkpoint's is loaded after setup

    def __init__(self, path: str, *, outputs_key: str = "logits", **kwargs: Any):
        super().__init__(path, **kwargs)
        if not isinstance(outputs_key, str) or not outputs_key:
            raise ValueError(f"{type(self).__name__}: outputs_key must be a non-empty string, got {outputs_key!r}")
        self.outputs_key = outputs_key
        self._examples = TrackedExamples()

    def default_schedule(self) -> Schedule:
        return EveryNEpochs(1)

    def config_extra(self) -> Dict[str, Any]:
        return dict(super().config_extra(), mode="probe", definition=PROBE_DEFINITION)

    def table_specs(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[TableSpec]:
        return events_and_examples(self.group, probe.index, {"mode": "probe", "definition": PROBE_DEFINITION,
                                                               "probe": probe.name})

    def extra_state(self) -> Dict[str, Any]:
        tracker = self._examples.tracker
        return {} if tracker is None else {"tracker": {k: torch.from_numpy(np.asarray(v))
                                                       for k, v in tracker.state_dict().items()}}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._examples.loaded = dict(state["tracker"]) if state.get("tracker") is not None else None

    def measure(self, trainer: Any, pl_module: nn.Module, probe: Optional[ProbeSet]) -> Tuple[Dict[str, Any], Dict[str, float]]:
        tracker = self._examples.ensure(probe.index, type(self).__name__)
        model, chunks = self.measured_model(pl_module), []
        with torch.no_grad():
            for x, _ in probe.batches(self.batch_size):
                output = model(x)
                logits = predictions_in(output, self.outputs_key)
                if logits is None:
                    raise ForgettingCaptureError(
                        f"{type(self).__name__}: the model's output on the probe is a {type(output).__name__} without "
                        f"logits; return a tensor, a tuple whose first element is the logits, or a dict with key "
                        f"{self.outputs_key!r}, or pass forward_fn=(module, x) -> logits")
                chunks.append(logits)
        values = presentation_outcomes(torch.cat(chunks), probe.y.to(chunks[0].device))
        step, epoch, n = int(trainer.global_step), int(trainer.current_epoch), len(probe)
        tracker.update(probe.index, values.correct.cpu().numpy(), values.p_true.float().cpu().numpy(), step=step)
        tracker.end_epoch()  # each snapshot is one cartography epoch
        if self._writer:
            self._tables[f"{self.group}/events"].extend({
                "step": np.full(n, step, np.int64), "epoch": np.full(n, epoch, np.int64), "index": probe.index,
                "correct": values.correct.cpu().numpy(), "loss": values.loss.float().cpu().numpy(),
                "margin": values.margin.float().cpu().numpy(), "p_true": values.p_true.float().cpu().numpy()})
            self._tables[f"{self.group}/examples"].write(tracker.summary(), step=step)
        return {}, forgetting_scalars(tracker)
