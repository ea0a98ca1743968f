"""ForgettingMonitor: per-example forgetting events (Toneva et al. 2019) and dataset
cartography (Swayamdipta et al. 2020), recorded from the training forward pass.

The correctness of each example at each presentation is read from the training forward
pass of its batch, before the optimiser step; no extra forward pass. Per training batch the
monitor keeps the logits (:mod:`._capture`: a forward hook copies the module's outputs;
or ``training_step`` returns ``{"loss": ..., "logits": ...}``), the targets (from the batch)
and the dataset indices (:mod:`._indices`: the DataLoader's sampler by default, a batch
key, or ``training_step``'s ``"index"``). A batch's step is the global step at the end of
the previous batch (or at train start): the step before this batch's optimiser update.
Outcomes are computed when the buffered batches are processed (:mod:`._streaming`).

Tables (group ``forgetting``, or ``forgetting_<name>``):

* ``events`` (append, row axis ``event``): ``step``, ``epoch``, ``index``, ``correct``,
  ``loss``, ``margin``, ``p_true``: one row per presentation;
* ``examples`` (fixed, row axis ``example`` = dataset indices): the
  :meth:`~lightning_ntk.forgetting.ForgettingTracker.summary` columns, rewritten at
  processing points at epoch ends and at the end of training.

:class:`ProbeForgettingMonitor` is the eval-mode variant on a fixed probe (NOT the paper's
definition).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from .. import _args
from ..forgetting import ForgettingTracker
from ..probe import BatchFormat, ProbeSet, batch_to_xy
from ..task import TASKS, Task, TaskError, aligned_tokens, token_positions, token_targets, tokens_at
from ._capture import LogitsCapture
from ._declared import TableSpec
from ._forgetting_tables import (
    NO_TARGETS,
    TRAIN_DEFINITION,
    ForgettingCaptureError,
    TrackedExamples,
    events_and_examples,
    examples_to_track,
    forgetting_scalars,
    forgetting_task,
    outcomes,
    task_from_sample,
)
from ._indices import HOW_TO_FIX_INDEX, SAMPLER, IndexSources, as_index_array
from ._labels import LabelCheck
from ._presentations import EpochDeduplicator, Presentation, Records, concat_indices, interleave
from ._streaming import StreamingMonitor
from .forgetting_probe import ProbeForgettingMonitor

__all__ = ["ForgettingCaptureError", "ForgettingMonitor", "ProbeForgettingMonitor"]

_HOW_TO_FIX_LOGITS = (
    "Call the module itself in training_step (logits = self(x)); its output may be a tensor, a tuple whose first "
    "element is the logits, or a dict with key {key!r}. Or return the logits from training_step: "
    "return {{'loss': loss, {key!r}: logits}}. Or use ProbeForgettingMonitor (an eval-mode pass on a probe; not "
    "Toneva et al.'s definition)."
)
#: ``flush_every=None``: batches between processing points, fewer when that many batches
#: of logits would exceed this many bytes (one process; see StreamingMonitor under DDP).
_AUTO_FLUSH_BATCHES, _AUTO_FLUSH_BYTES = 256, 16 << 20


class ForgettingMonitor(StreamingMonitor):
    """Per-example forgetting events and dataset cartography, streamed to the run file.

    Follows Toneva et al. 2019: an example's correctness at each presentation comes from the
    training forward pass of its batch, before the optimiser step; forgetting event =
    correct -> incorrect between consecutive presentations. Works with shuffling,
    ``num_workers > 0``, ``drop_last``, gradient accumulation (each micro-batch is a
    presentation), mid-epoch resume and DDP (records all-gathered at each processing point,
    ranks interleaved), with no change to a LightningModule whose batches are ``(x, y, ...)``
    and whose ``training_step`` calls the module (``self(x)``). Cartography (Swayamdipta et
    al. 2020): per example over epochs, confidence = mean p(gold), variability = population
    std, correctness = fraction correct. See :mod:`lightning_ntk.forgetting`.

    Args:
        path: the run file.
        mode: ``"train"`` (the only mode; the eval-mode pass on a probe is
            :class:`ProbeForgettingMonitor`).
        index_key: where the batch carries the dataset index (a dict key, or a tuple
            position such as ``-1`` for :class:`~lightning_ntk.forgetting.WithIndex`).
            Default: record the indices from the DataLoader's ``BatchSampler``.
        outputs_key: key of the logits in a dict output (of the module or of ``training_step``).
        batch_format: how to find the targets in a batch (see :func:`lightning_ntk.probe.batch_to_xy`).
        num_examples: track dataset indices ``0 .. num_examples - 1`` (default: the length of
            the training dataset).
        flush_every: process the buffered batches every this many batches (default: 256,
            fewer when their logits would exceed 16 MiB; 64 under several processes).
        write_interval: see :class:`~._streaming.StreamingMonitor` (default 5 s).
        task: what the outputs and targets are (:mod:`lightning_ntk.task`); default:
            detected from the first example and checked at the first batch. Forgetting is
            recorded for multi-class and binary classification, per token for sequences
            (see ``token_positions``), and for regression with ``tolerance``; other tasks
            are refused with the reason.
        token_positions: sequence tasks: positions tracked per sequence (a deterministic
            subset of those with a target, the same at every presentation,
            :func:`lightning_ntk.task.token_positions` keyed by the dataset index); each
            (sequence, slot) is one tracked example, ``index = dataset index *
            token_positions + slot``, its correctness the argmax of the token's logits.
        tolerance: regression only: an example is correct when every output is within
            ``tolerance`` of its target (loss = mean squared error, margin = tolerance -
            largest error, p_true = NaN).
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor`.
    """

    quantity = "forgetting"
    runtime = ("_sources", "_indices", "_capture", "_labels", "_pending", "_dedupe")
    state = {"_open_epoch": "value"}

    def __init__(self, path: str, *, mode: str = "train", index_key: Union[None, str, int] = None,
                 outputs_key: str = "logits", batch_format: BatchFormat = None, num_examples: Optional[int] = None,
                 flush_every: Optional[int] = None, write_interval: float = 5.0, task: Optional[str] = None,
                 tolerance: Optional[float] = None, token_positions: int = 8, **kwargs: Any):
        owner = type(self).__name__
        _args.one_of(mode, "mode", ("train",), owner, hint="for an eval-mode pass on a probe (not Toneva et al.'s "
                     "definition) use ProbeForgettingMonitor")
        if index_key is not None and (isinstance(index_key, bool) or not isinstance(index_key, (str, int))):
            raise ValueError(f"{owner}: index_key must be None, a dict key (str) or a tuple position (int), "
                             f"got {index_key!r}")
        if not isinstance(outputs_key, str) or not outputs_key:
            raise ValueError(f"{owner}: outputs_key must be a non-empty string, got {outputs_key!r}")
        if batch_format is not None and not callable(batch_format) and not (
                isinstance(batch_format, (tuple, list)) and len(batch_format) == 2):
            raise ValueError(f"{owner}: batch_format must be None, a pair (x_key, y_key) or a function "
                             f"batch -> (x, y); got {batch_format!r}")
        super().__init__(path, flush_every=flush_every, write_interval=write_interval, **kwargs)
        self.mode, self.index_key, self.outputs_key, self.batch_format = mode, index_key, outputs_key, batch_format
        self.num_examples = _args.positive_int(num_examples, "num_examples", owner, optional=True)
        self.task = None if task is None else _args.one_of(task, "task", TASKS, owner)
        self.tolerance = _args.positive(tolerance, "tolerance", owner, optional=True)
        self.token_positions = _args.positive_int(token_positions, "token_positions", owner)
        self._task: Optional[Task] = None  # decided at train start from one example, checked at the first batch
        self._task_checked = False
        self._examples = TrackedExamples()
        self._open_epoch: Optional[int] = None
        self._ended_epoch: Optional[int] = None  # the last epoch whose end hook ran
        self._batch_step = 0  # the global step of the next batch
        self._summary_stale = False
        self._reset_runtime()  # with index_key and outputs_key known

    def _reset_runtime(self) -> None:
        super()._reset_runtime()
        self._sources = IndexSources(type(self).__name__, getattr(self, "index_key", None))
        self._indices = self._sources.sampler
        self._capture = LogitsCapture(getattr(self, "outputs_key", "logits"))
        self._labels = LabelCheck()
        self._pending: List[Presentation] = []
        self._dedupe = EpochDeduplicator()

    @property
    def tracker(self) -> Optional[ForgettingTracker]:
        """The running per-example statistics (from ``on_train_start``)."""
        return self._examples.tracker

    def config_extra(self) -> Dict[str, Any]:
        return {"definition": TRAIN_DEFINITION, "model_mode": "train (the training forward pass; no extra pass)",
                "detected_task": None if self._task is None else self._task.to_config(),
                "index_source": "sampler" if self.index_key is None else f"batch[{self.index_key!r}]"}

    def table_specs(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[TableSpec]:
        if self.tracker is None:  # disabled before the examples were known
            return []
        kind = self._task.kind if self._task is not None else (self.task or "")  # "": told at the first batch
        task = {"task": kind, "tolerance": self.tolerance or float("nan")}
        if kind == "sequence":
            task.update(token_positions=self.token_positions, shift=self._task.shift,
                        index="dataset index * token_positions + slot (slot: the k-th tracked position of the "
                              "sequence, lightning_ntk.task.token_positions keyed by the dataset index)")
        return events_and_examples(self.group, self.tracker.index, dict(task, mode="train", definition=TRAIN_DEFINITION))

    def extra_state(self) -> Dict[str, Any]:
        if self.tracker is None:
            return {}
        tracker = {k: torch.from_numpy(np.asarray(v)) for k, v in self.tracker.state_dict().items()}
        return dict(super().extra_state(), mode="train", tracker=tracker)

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if state.get("mode", "train") != "train":
            raise RuntimeError(f"{type(self).__name__}: the checkpoint was written by a monitor in mode="
                               f"{state['mode']!r}; resume with the same settings")
        super().load_extra_state(state)
        self._examples.loaded = dict(state["tracker"]) if state.get("tracker") is not None else None

    def _disable(self) -> None:
        super()._disable()
        self._cleanup()

    def _cleanup(self) -> None:
        self._capture.detach()
        if self._indices is not None:
            self._indices.restore()
        self._pending = []  # records buffered since the last processing point may be mis-keyed
        self._labels.clear()

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if str(stage) in ("fit", "TrainerFn.FITTING"):
            self._reset_runtime()  # fresh capture and index recording for this fit
        super().setup(trainer, pl_module, stage)
        if str(stage) in ("fit", "TrainerFn.FITTING") and self._indices is not None:
            self._indices.intercept(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._loaded_state is None:
            self._examples.loaded, self._open_epoch = None, None
        self._examples.tracker, self._pending, self._ended_epoch = None, [], None
        super().on_train_start(trainer, pl_module)  # prepare(), then the tables
        if not self.disabled:
            self._batch_step = int(trainer.global_step)
            self._capture.attach(pl_module)
            if self._loaded_state is not None and self.tracker is not None:
                # The file now holds the checkpoint's event rows; make the summary agree with them.
                self._guard(self._batch_step, self._write_summary, self._batch_step)
                self._guard(self._batch_step, self._write)

    def prepare(self, trainer: Any, pl_module: Any) -> None:
        loaders = getattr(trainer, "train_dataloader", None)
        several = isinstance(loaders, (Mapping, list, tuple))
        n = examples_to_track(loaders, self.num_examples, self.index_key, type(self).__name__)
        self._task_checked = False
        self._task = None if several else task_from_sample(loaders, pl_module, self.batch_format, self.outputs_key,
                                                           self.task, self.tolerance, type(self).__name__)
        sequence = self.task in ("sequence", "causal_lm") or (self._task is not None and self._task.kind == "sequence")
        per_example = self.token_positions if sequence else 1
        self._examples.ensure(np.arange(n * per_example, dtype=np.int64), type(self).__name__)
        if self._indices is not None and not several:
            self._follow_loader(trainer)

    def _follow_loader(self, trainer: Any) -> None:
        loader = getattr(trainer, "train_dataloader", None)
        if loader is None or isinstance(loader, (Mapping, list, tuple)):
            return
        self._labels.follow(loader, usable=self.batch_format is None)
        if not self._indices.is_recording(loader):
            # Not prepared through strategy.process_dataloader: record from now on. Batches of an
            # iterator created earlier come without indices, which the first of them reports.
            self._indices.attach(loader)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._sources.epoch_pass = None
        if self._indices is not None and not self.disabled:
            self._guard(int(trainer.global_step), self._follow_loader, trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._capture.clear()
        self._capture.active = not self.disabled

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._capture.active = False
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._batch_step = int(trainer.global_step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._sources.epoch_pass = None
        self._ended_epoch = int(trainer.current_epoch)  # closed when its records are processed
        super().on_train_epoch_end(trainer, pl_module)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._cleanup()
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._cleanup()

    # ---------------------------------------------------------------- per batch
    def record_batch(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        popped = self._indices.pop() if self._indices is not None else None  # every batch: keeps the queue in step
        _, targets = batch_to_xy(batch, self.batch_format)
        if targets is None:
            raise TaskError(f"{type(self).__name__}: {NO_TARGETS}")
        targets = targets if isinstance(targets, torch.Tensor) else torch.as_tensor(targets)
        rows = int(targets.shape[0]) if targets.ndim else 1
        logits = outputs.get(self.outputs_key) if isinstance(outputs, Mapping) else None
        returned = isinstance(logits, torch.Tensor)
        logits = logits.detach().clone() if returned else self._capture.take(rows)
        if logits is None:
            raise ForgettingCaptureError(
                f"{type(self).__name__} found no logits for this training batch: {self._capture.describe_missing()}. "
                + _HOW_TO_FIX_LOGITS.format(key=self.outputs_key))
        if not self._task_checked:  # the first batch: the task it shows (and the sample's, if any)
            sampled = self._task
            x, _ = batch_to_xy(batch, self.batch_format)
            self._task = forgetting_task(logits, targets, self.task or (sampled and sampled.name),
                                         self.tolerance, type(self).__name__, inputs=x)
            if self._task.kind == "sequence" and (sampled is None or sampled.kind != "sequence") and \
                    self.task not in ("sequence", "causal_lm"):
                raise ForgettingCaptureError(f"{type(self).__name__}: per-token outputs appeared at the first batch, "
                                             "but the task could not be read from the training set before training "
                                             "(it sizes the tracked tokens); pass task='causal_lm' or task='sequence'")
            self._task_checked = True
        index, where = self._sources.indices(batch, outputs, popped)
        if len(index) != rows or int(logits.shape[0]) != rows:
            raise ForgettingCaptureError(
                f"{type(self).__name__}: this batch has {rows} targets and {int(logits.shape[0])} rows of logits, but "
                f"{len(index)} dataset indices {where}. A sampler that does not yield one index per example, a "
                "collate_fn that changes the batch size, or a module output that is not per-example logits breaks "
                "the pairing. " + HOW_TO_FIX_INDEX)
        labels = self._labels.snapshot if where == SAMPLER and self._task.kind != "sequence" else None
        if self._task.kind == "sequence":  # each tracked (sequence, slot) is one example
            logits, targets, index = self._tokens(logits, targets, index)
            rows = int(targets.shape[0])
        self._pending.append(Presentation(index, self._batch_step, int(trainer.current_epoch), logits,
                                          targets.reshape(rows, -1) if self._task.kind == "regression"
                                          else targets.reshape(-1), labels))

    def _tokens(self, logits: torch.Tensor, targets: torch.Tensor, index: np.ndarray):
        """A sequence batch as its tracked tokens: (logits (M, V), targets (M,), keys (M,))."""
        keys = as_index_array(index, "the dataset indices of the batch")
        positions = token_positions(targets, self._task, self.token_positions, keys=keys)
        rows, slots = np.nonzero(positions >= 0)
        aligned, _ = aligned_tokens(logits, targets, self._task)
        return (tokens_at(aligned, positions), torch.as_tensor(token_targets(targets, self._task, positions)),
                keys[rows] * self.token_positions + slots)

    def default_flush_every(self, batch: Any) -> int:
        """256 batches, fewer when that many batches of logits would exceed 16 MiB."""
        logits = self._pending[-1].logits if self._pending else None
        per_batch = 1 if logits is None else max(1, logits.numel() * logits.element_size())
        return max(1, min(_AUTO_FLUSH_BATCHES, _AUTO_FLUSH_BYTES // per_batch))

    # ---------------------------------------------------------------- processing
    def collect(self) -> Optional[Records]:
        """This process's buffered batches -> records (outcomes computed for all at once)."""
        if not self._pending or self.tracker is None:
            self._pending = []
            return None
        pending, self._pending = self._pending, []
        sizes = np.array([len(p.index) for p in pending], dtype=np.int64)
        index = concat_indices([p.index for p in pending], as_index_array)
        logits = torch.cat([p.logits for p in pending])
        targets = torch.cat([p.targets.to(logits.device) for p in pending])
        result = outcomes(self._task, logits, targets, self.tolerance)
        values = torch.stack([result.correct.float(), result.loss.float(), result.margin.float(),
                              result.p_true.float()]).cpu().numpy()
        if any(p.labels is not None for p in pending) and self._labels.mismatch(
                [p.labels for p in pending], sizes, index, targets):
            raise ForgettingCaptureError(
                f"{type(self).__name__}: the dataset indices recorded from the DataLoader's sampler do not match the "
                "targets of the batches trained on (the dataset's labels at those indices differ). Something else may "
                "iterate the training loader during training, a collate_fn may reorder the examples of a batch, or "
                "the sampler's order is not the batch order. " + HOW_TO_FIX_INDEX)
        return Records(batch=np.repeat(np.arange(len(pending)), sizes), index=index,
                       step=np.repeat(np.array([p.step for p in pending], dtype=np.int64), sizes),
                       epoch=np.repeat(np.array([p.epoch for p in pending], dtype=np.int64), sizes),
                       correct=values[0] > 0.5, loss=values[1], margin=values[2],
                       p_true=np.minimum(values[3], 1.0))  # exp(log p) may round a hair above 1

    def gather(self, records: Optional[Records]) -> Optional[Records]:
        """Under DDP every rank's records, ranks interleaved, without the DistributedSampler's
        padding repeats; every rank then updates its tracker with the same records."""
        if not self._dist.active or self.tracker is None:
            return records
        merged = interleave(self._dist.gather_object(records if records is not None else Records.empty()))
        return self._dedupe(merged, self.tracker.slots(merged.index), self.tracker.index.shape[0])

    def apply(self, records: Records) -> None:
        tracker = self.tracker
        if len(records):
            # One update per epoch segment: with per-example steps the tracker takes each
            # example's presentations in row order, which equals one update per batch.
            cuts = (np.flatnonzero(records.epoch[1:] != records.epoch[:-1]) + 1).tolist()
            for a, b in zip([0] + cuts, cuts + [len(records)]):
                epoch = int(records.epoch[a])
                if self._open_epoch is not None and epoch != self._open_epoch:
                    tracker.end_epoch()  # an epoch end that no hook reported (e.g. resumed past it)
                self._open_epoch = epoch
                p_true = None if self._task.kind == "regression" else records.p_true[a:b]  # no p(gold): no confidence
                tracker.update(records.index[a:b], records.correct[a:b], p_true, step=records.step[a:b])
            events = self._tables.get(f"{self.group}/events") if self._writer else None
            if events is not None:
                events.extend(records.columns())
            self._summary_stale = True

    def after_processing(self, step: int, reason: str) -> None:
        if self._ended_epoch is not None and self._open_epoch is not None and self._open_epoch <= self._ended_epoch:
            self.tracker.end_epoch()  # its end hook ran before its records were processed
            self._open_epoch = None
        if reason == "epoch_end":
            if self._open_epoch is not None and self.tracker is not None:
                self.tracker.end_epoch()
            self._open_epoch = None
            self._write_summary(step)
            self._write()  # at most every write_interval: the summary, the event rows
        elif reason == "end" and self._summary_stale:
            self._write_summary(step)

    def _write_summary(self, step: int) -> None:
        examples = self._tables.get(f"{self.group}/examples") if self._writer else None
        if examples is not None and self.tracker is not None:
            examples.write(self.tracker.summary(), step=step)
        self._summary_stale = False

    def scalars(self) -> Dict[str, float]:
        return forgetting_scalars(self.tracker)
