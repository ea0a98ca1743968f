"""ForgettingMonitor: per-example forgetting events (Toneva et al. 2019) and dataset
cartography (Swayamdipta et al. 2020), recorded from the training forward pass.

Default (``mode="train"``, Toneva et al.'s definition): the correctness of each example at
each presentation is read from the training forward pass of its batch, before the
optimiser step; no extra forward pass. Two things are captured per training batch:

* the logits: a forward hook on the LightningModule (registered at train start) keeps the
  outputs of ``pl_module(...)`` made in train mode during ``training_step`` (a tensor, the
  first element of a tuple, or the ``outputs_key`` entry of a dict); at
  ``on_train_batch_end`` the first with one row per target is the batch's logits. If
  ``training_step`` returns a dict with ``outputs_key`` (default ``"logits"``), that takes
  precedence. A batch's step is the global step at the end of the previous batch (or at
  train start): the step before this batch's optimiser update.
* the dataset indices: the training DataLoader's batch sampler (its sampler when
  ``batch_size=None``) is made to record every index batch it yields into a FIFO queue,
  popped at each ``on_train_batch_end``. The sampler runs in the main process even with
  ``num_workers > 0``, and batches arrive in sampler order, so the head of the queue is the
  batch being trained on. The loader is switched to recording when Lightning prepares it
  (``strategy.process_dataloader``, wrapped from ``setup``), i.e. before its first
  iterator exists: Lightning creates the first epoch's iterator before ``on_train_start``
  and a reloaded loader's before ``on_train_epoch_start``. Each new pass over the sampler
  (a new iterator) drops the entries its predecessor left (``limit_train_batches``,
  ``max_steps``, prefetching). Fallbacks: ``index_key=`` (the batch carries the index,
  e.g. from :class:`lightning_ntk.forgetting.WithIndex`), or ``training_step`` returning
  ``{"loss": ..., "logits": ..., "index": ...}``.

``mode="probe"``: an eval-mode pass over a fixed probe on a schedule; each snapshot is one
"presentation" of every probe example. This is NOT Toneva et al.'s definition (their
presentations are training mini-batches, read before the update); it is labelled so in
the run file's config and table attributes.

Tables (group ``forgetting``, or ``forgetting_<name>``):

* ``events`` (append, row axis ``event``): ``step``, ``epoch``, ``index``, ``correct``,
  ``loss``, ``margin``, ``p_true``: one row per presentation. Batches are buffered and
  processed every ``flush_every`` batches (bounded memory), at the first epoch end after
  each ``write_interval`` seconds, at checkpoints and at the end of training.
* ``examples`` (fixed, row axis ``example`` = dataset indices): the
  :meth:`~lightning_ntk.forgetting.ForgettingTracker.summary` columns, rewritten at those
  epoch ends (probe mode: at snapshots).

File writes (event rows, the summary rewrite, flush and fsync) happen at most every
``write_interval`` seconds, and always at the end of training, before a checkpoint and on
an exception: with short epochs, processing, a rewrite, a flush and an fsync per epoch
would cost more than the training step they follow.
"""
from __future__ import annotations

import collections
import itertools
import math
import time
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..forgetting import ForgettingTracker, presentation_outcomes
from ..probe import BatchFormat, ProbeSet, batch_to_xy
from ..schedule import EveryNEpochs, Schedule
from ..store import Field, Table
from ._base import Monitor, TableSpec, shared_governor

TRAIN_DEFINITION = ("Toneva et al. 2019: correctness of each example at each presentation, from the training "
                    "forward pass of its batch (train mode), before the optimiser step")
PROBE_DEFINITION = ("NOT Toneva et al.'s definition: correctness from an eval-mode pass over a fixed probe on a "
                    "schedule; each snapshot counts as one presentation and one cartography epoch")

_HOW_TO_FIX_LOGITS = (
    "Call the module itself in training_step (logits = self(x)); its output may be a tensor, a tuple whose first "
    "element is the logits, or a dict with key {key!r}. Or return the logits from training_step: "
    "return {{'loss': loss, {key!r}: logits}}. Or use ForgettingMonitor(mode='probe') (an eval-mode pass on a "
    "probe; not Toneva et al.'s definition)."
)
_HOW_TO_FIX_INDEX = (
    "Wrap the dataset in lightning_ntk.forgetting.WithIndex(dataset) and pass index_key=-1 (index_key='index' for "
    "dict items), or pass index_key= the key / position where your batch already carries the dataset index; or "
    "return it from training_step: return {'loss': loss, 'index': index}."
)


#: Buffered event rows that force a write whatever ``write_interval`` says (about 8 MiB).
_MAX_BUFFERED_ROWS = 1 << 18

#: Outputs of pl_module(...) kept per batch while looking for the logits (the first of
#: each row count, at most this many row counts).
_MAX_CANDIDATES = 8

#: ``flush_every=None``: process the buffered batches every this many batches at most ...
_AUTO_FLUSH_BATCHES = 256
#: ... and before their logits exceed this many bytes (decided from the first batch).
_AUTO_FLUSH_BYTES = 16 << 20
#: ``flush_every=None`` under several processes.
_DDP_FLUSH_BATCHES = 64

#: Per-batch time is handed to the governor once this many seconds have accumulated.
_CHARGE_EVERY = 1e-3

_perf_counter = time.perf_counter
_is_grad_enabled = torch.is_grad_enabled
#: What torch.no_grad() calls; the public torch.set_grad_enabled (which also sets the mode
#: when called as a function) if a torch release moves it.
_set_grad_enabled: Callable[[bool], Any] = getattr(torch._C, "_set_grad_enabled", None) or torch.set_grad_enabled


def _charged(hook: Any) -> Any:
    """Time a hook of the monitor and charge it to the budget governor (the presentations
    must all be recorded, so this time cannot be skipped; it makes the other monitors'
    snapshots give way instead)."""

    def timed(self: "ForgettingMonitor", *args: Any, **kwargs: Any) -> Any:
        started = _perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            self._charge(_perf_counter() - started)

    timed.__name__, timed.__qualname__, timed.__doc__ = hook.__name__, hook.__qualname__, hook.__doc__
    return timed


class ForgettingCaptureError(RuntimeError):
    """The logits or the dataset indices of a training batch could not be captured."""


# --------------------------------------------------------------------------------------
# Recording the DataLoader's index batches
# --------------------------------------------------------------------------------------
_RECORDERS = "_lightning_ntk_recorders"


class _SamplerRecorder:
    """Makes (batch) samplers push every index batch they yield into one FIFO queue.

    The sampler object's class is swapped for a dynamic subclass whose ``__iter__`` records
    and yields (DataLoader forbids re-assigning ``batch_sampler``); :meth:`restore` swaps
    it back. Several recorders (several monitors) share one recording class per sampler.
    """

    def __init__(self) -> None:
        self.queue: Deque[Tuple[int, Any]] = collections.deque()  # (pass, the index batch as yielded)
        self.passes = 0
        self._patched: List[Tuple[Any, type]] = []

    def start_pass(self) -> None:
        # A new iterator over the sampler: whatever the previous one left is stale.
        self.queue.clear()
        self.passes += 1

    def push(self, item: Any) -> None:
        # Kept as yielded (a BatchSampler yields a new list each time); converted to an
        # array, and checked, when the buffered batches are processed.
        self.queue.append((self.passes, item))

    def is_recording(self, sampler: Any) -> bool:
        return self in (type(sampler).__dict__.get(_RECORDERS) or ())

    @staticmethod
    def index_sampler(loader: Any) -> Any:
        batch_sampler = getattr(loader, "batch_sampler", None)
        return batch_sampler if batch_sampler is not None else getattr(loader, "sampler", None)

    def attach(self, loader: Any) -> Optional[str]:
        """Record ``loader``'s index batches; returns why it cannot, or None."""
        from torch.utils.data import IterableDataset

        if isinstance(getattr(loader, "dataset", None), IterableDataset):
            return "the training data is an IterableDataset, which has no sampler indices"
        sampler = self.index_sampler(loader)
        if sampler is None or not hasattr(type(sampler), "__iter__"):
            return f"the training loader (a {type(loader).__name__}) has no batch_sampler or sampler"
        recorders = type(sampler).__dict__.get(_RECORDERS)
        if recorders is not None:  # already recording for another monitor: join it
            if self not in recorders:
                recorders.append(self)
                self._patched.append((sampler, type(sampler)))
            return None
        base = type(sampler)
        recorders = [self]

        def __iter__(this: Any) -> Any:
            for recorder in list(recorders):
                recorder.start_pass()
            for item in base.__iter__(this):
                for recorder in recorders:
                    recorder.push(item)
                yield item

        recording = type(base.__name__, (base,), {
            "__iter__": __iter__, "__slots__": (), _RECORDERS: recorders,
            "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__})
        try:
            sampler.__class__ = recording
        except TypeError as exc:
            return f"the sampler (a {base.__name__}) cannot be made to record its indices ({exc})"
        self._patched.append((sampler, recording))
        return None

    def restore(self) -> None:
        for sampler, recording in reversed(self._patched):
            recorders = recording.__dict__[_RECORDERS]
            if self in recorders:
                recorders.remove(self)
            if not recorders and type(sampler) is recording:
                sampler.__class__ = recording.__bases__[0]
        self._patched = []
        self.queue.clear()


@dataclass
class _Records:
    """Presentations of several batches, in training order (numpy arrays, one entry each)."""

    batch: np.ndarray  # batch number, to keep each update() call to one batch
    index: np.ndarray
    step: np.ndarray
    epoch: np.ndarray
    correct: np.ndarray
    loss: np.ndarray
    margin: np.ndarray
    p_true: np.ndarray


def _empty_records() -> _Records:
    ints = np.zeros(0, dtype=np.int64)
    floats = np.zeros(0, dtype=np.float32)
    return _Records(batch=ints, index=ints, step=ints, epoch=ints, correct=np.zeros(0, dtype=bool), loss=floats,
                    margin=floats, p_true=floats)


def _position_in_batch(batch: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal batch numbers."""
    n = batch.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], batch[1:] != batch[:-1])))
    return np.arange(n) - np.repeat(starts, np.diff(np.concatenate((starts, [n]))))


def _interleave(parts: Sequence[_Records]) -> _Records:
    """Every rank's records in one training order: batch by batch; within a batch, element j
    of rank 0, element j of rank 1, ..., then element j + 1 (an unshuffled DistributedSampler
    gives rank r the examples r, r + W, r + 2W, ...: this restores the single-process order)."""
    names = [f.name for f in fields(_Records)]
    rank = np.concatenate([np.full(p.index.shape[0], r, dtype=np.int64) for r, p in enumerate(parts)])
    position = np.concatenate([_position_in_batch(p.batch) for p in parts])
    merged = {name: np.concatenate([getattr(p, name) for p in parts]) for name in names}
    order = np.lexsort((rank, position, merged["batch"]))
    return _Records(**{name: values[order] for name, values in merged.items()})


def _logits_in(output: Any, key: str) -> Optional[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        value = output.get(key)
    elif isinstance(output, (tuple, list)):
        value = output[0] if output else None
    else:
        value = getattr(output, key, None)
    return value if isinstance(value, torch.Tensor) else None


def _concat_indices(parts: List[Any], total: int) -> np.ndarray:
    """Index batches (lists of ints from a sampler, or int64 arrays) -> one int64 array."""
    if all(isinstance(p, list) for p in parts):
        flat = np.asarray(list(itertools.chain.from_iterable(parts)))
        if flat.shape == (total,):
            return _as_index_array(flat, "the index batches of the DataLoader's sampler")
    return np.concatenate([_as_index_array(p, "an index batch of the DataLoader's sampler") for p in parts])


def _label_source(dataset: Any) -> Optional[Tuple[torch.Tensor, Tuple[Any, ...]]]:
    """The label tensor of a TensorDataset (the second tensor: 1-D integer class labels),
    possibly inside Subsets, and the Subsets' index sequences from the outermost in; None
    for any other dataset."""
    from torch.utils.data import Subset, TensorDataset

    maps: List[Any] = []
    while isinstance(dataset, Subset):
        maps.append(dataset.indices)
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
        if labels.ndim == 1 and not labels.dtype.is_floating_point and not labels.is_complex():
            return labels, tuple(maps)
    return None


class _LabelSnapshot:
    """A TensorDataset's labels as read at one moment (a copy of its label tensor), against
    which the batches recorded while it was the latest are checked; ``valid`` turns False
    once the labels are seen to differ from it (changed in place: label noise,
    pseudo-labels): those batches may carry either labels, so they are not checked."""

    __slots__ = ("base", "maps", "valid", "_labels")

    def __init__(self, base: torch.Tensor, maps: Tuple[Any, ...]) -> None:
        self.base = base.detach().clone()
        self.maps = maps
        self.valid = True
        self._labels: Optional[np.ndarray] = None

    def same(self, base: torch.Tensor, maps: Tuple[Any, ...]) -> bool:
        """Whether ``base`` (and the Subsets) still hold the labels of the snapshot."""
        return (len(maps) == len(self.maps) and all(a is b for a, b in zip(maps, self.maps))
                and base.shape == self.base.shape and base.dtype == self.base.dtype
                and base.device == self.base.device and bool(torch.equal(base, self.base)))

    @property
    def labels(self) -> np.ndarray:
        """The label of each dataset index (through the Subsets), int64."""
        if self._labels is None:
            labels = self.base.cpu().numpy().astype(np.int64)
            rows: Optional[np.ndarray] = None
            for indices in reversed(self.maps):  # Subset(Subset(d, a), b)[i] = d[a[b[i]]]
                idx = np.asarray(indices, dtype=np.int64)
                rows = idx if rows is None else rows[idx]
            self._labels = labels if rows is None else labels[rows]
        return self._labels


def _as_index_array(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise ForgettingCaptureError(f"{what} must hold integer dataset indices, got dtype {array.dtype}. "
                                     + _HOW_TO_FIX_INDEX)
    return array.astype(np.int64, copy=False).reshape(-1)


# --------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------
class ForgettingMonitor(Monitor):
    """Per-example forgetting events and dataset cartography, streamed to the run file.

    ``mode="train"`` (default) follows Toneva et al. 2019: an example's correctness at each
    presentation comes from the training forward pass of its batch, before the optimiser
    step; forgetting event = correct -> incorrect between consecutive presentations. Works
    with shuffling, ``num_workers > 0``, ``drop_last``, gradient accumulation (each
    micro-batch is a presentation), mid-epoch resume and DDP (records all-gathered at each
    processing point, ranks interleaved), with no change to a
    LightningModule whose batches are ``(x, y, ...)`` and whose ``training_step`` calls the
    module (``self(x)``). Cartography (Swayamdipta et al. 2020): per example over epochs,
    confidence = mean p(gold), variability = population std, correctness = fraction correct.
    See :mod:`lightning_ntk.forgetting` for the definitions.

    Args:
        path: the run file.
        mode: ``"train"`` (the training forward pass, the paper's definition) or
            ``"probe"`` (an eval-mode pass over ``probe`` on ``schedule``; NOT the paper's
            definition).
        index_key: where the batch carries the dataset index (a dict key, or a tuple
            position such as ``-1`` for :class:`~lightning_ntk.forgetting.WithIndex`).
            Default: record the indices from the DataLoader's sampler.
        outputs_key: key of the logits in a dict output (of the module or of
            ``training_step``).
        batch_format: how to find the targets in a batch (see
            :func:`lightning_ntk.probe.batch_to_xy`).
        num_examples: track dataset indices ``0 .. num_examples - 1`` (default: the
            length of the training dataset).
        flush_every: process the buffered batches (outcomes, tracker, event rows) every
            this many batches; bounds the logits kept in memory. Default (None): every
            256 batches, fewer when that many batches of logits would exceed 16 MiB
            (decided from the first batch); under several processes, every 64 batches.
        write_interval: at the first epoch end after this many seconds since the last
            epoch end that did (default 5; 0: at every epoch end), process the buffered
            batches, log the scalars, rewrite the summary and write to the file (event
            rows, flush, fsync); every ``flush_every`` batches, write the event rows if
            this long passed since the last write. Always at the end of training, before a
            checkpoint and on an exception; event rows are also written once 2^18 are
            buffered.
        schedule, probe, forward_fn, batch_size: ``mode="probe"`` only (default schedule:
            every epoch).
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor`.
    """

    quantity = "forgetting"
    needs_probe = False

    def __init__(self, path: str, *, mode: str = "train", index_key: Union[None, str, int] = None,
                 outputs_key: str = "logits", batch_format: BatchFormat = None, num_examples: Optional[int] = None,
                 flush_every: Optional[int] = None, write_interval: float = 5.0, **kwargs: Any):
        name = type(self).__name__
        if mode not in ("train", "probe"):
            raise ValueError(f"{name}: mode must be 'train' (the training forward pass, Toneva et al.) or 'probe' "
                             f"(an eval-mode pass on a probe), got {mode!r}")
        if mode == "train":
            for option in ("schedule", "probe", "forward_fn"):
                if kwargs.get(option) is not None:
                    raise ValueError(f"{name}: {option}= applies to mode='probe' only; mode='train' records every "
                                     "training batch from the training forward pass")
            if kwargs.get("budget") not in (None, False):
                raise ValueError(f"{name}: budget= applies to mode='probe' only; mode='train' must record every "
                                 "training batch (a skipped batch would hide forgetting events)")
            kwargs["budget"] = False  # no snapshots to govern: every batch is recorded
        if index_key is not None and (isinstance(index_key, bool) or not isinstance(index_key, (str, int))):
            raise ValueError(f"{name}: index_key must be None, a dict key (str) or a tuple position (int), "
                             f"got {index_key!r}")
        if mode == "probe" and index_key is not None:
            raise ValueError(f"{name}: index_key= applies to mode='train' only (a probe knows its dataset indices)")
        if not isinstance(outputs_key, str) or not outputs_key:
            raise ValueError(f"{name}: outputs_key must be a non-empty string, got {outputs_key!r}")
        if batch_format is not None and not callable(batch_format) and not (
                isinstance(batch_format, (tuple, list)) and len(batch_format) == 2):
            raise ValueError(f"{name}: batch_format must be None, a pair (x_key, y_key) or a function "
                             f"batch -> (x, y); got {batch_format!r}")
        if num_examples is not None and (isinstance(num_examples, bool) or not isinstance(num_examples, int)
                                         or num_examples < 1):
            raise ValueError(f"{name}: num_examples must be None or a positive integer, got {num_examples!r}")
        if flush_every is not None and (isinstance(flush_every, bool) or not isinstance(flush_every, int)
                                        or flush_every < 1):
            raise ValueError(f"{name}: flush_every must be None (automatic) or a positive integer, "
                             f"got {flush_every!r}")
        if (isinstance(write_interval, bool) or not isinstance(write_interval, (int, float))
                or not math.isfinite(write_interval) or write_interval < 0):
            raise ValueError(f"{name}: write_interval must be a number of seconds >= 0, got {write_interval!r}")
        self.mode = mode
        self.needs_probe = mode == "probe"
        super().__init__(path, **kwargs)
        self.index_key = index_key
        self.outputs_key = outputs_key
        self.batch_format = batch_format
        self.num_examples = num_examples
        self.flush_every = flush_every
        self.write_interval = float(write_interval)
        self._reset_runtime()
        self._tracker: Optional[ForgettingTracker] = None
        self._loaded_tracker: Optional[Dict[str, Any]] = None
        self._open_epoch: Optional[int] = None

    def _reset_runtime(self) -> None:
        self._recorder = _SamplerRecorder()
        self._interception: Optional[Tuple[Any, Any, Any]] = None
        self._hook_handle: Optional[Any] = None
        self._capturing = False  # during training (the forward hook is registered at train start)
        self._candidates: List[torch.Tensor] = []  # outputs captured during this batch's training_step
        self._common_layout = False  # see _record_common_batch
        self._charged_governor: Optional[Any] = None  # the shared governor its per-batch time is charged to
        self._uncharged = 0.0  # per-batch seconds not yet handed to it (see _charge)
        self._captured_kind: Optional[str] = None
        self._flush_every: Optional[int] = self.flush_every  # None: decided at the first batch
        self._ended_epoch: Optional[int] = None  # the last epoch whose end hook ran
        self._batch_step = 0  # the global step of the next batch (the step at the end of the previous one)
        self._pending: List[Tuple[Any, int, int, torch.Tensor, torch.Tensor, Optional[_LabelSnapshot]]] = []
        self._batches_since_flush = 0
        self._summary_stale = False
        self._label_snapshot: Optional[_LabelSnapshot] = None  # see _note_labels
        self._label_dataset: Any = None  # the TensorDataset (or Subset of one) it is read from
        self._label_workers = False  # whether the training loader has worker processes
        self._labels_unchecked = False  # labels changed under workers: no more checks this fit
        self._no_sampler_reason: Optional[str] = None
        self._epoch_pass: Optional[int] = None
        self._last_write = -math.inf
        self._last_epoch_processing = -math.inf  # epoch ends process the buffer every write_interval
        self._scalars_logged_at: Optional[int] = None
        self._deferred_error: Optional[BaseException] = None

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        for key in ("_recorder", "_interception", "_hook_handle", "_candidates", "_pending", "_label_dataset",
                    "_label_snapshot"):
            state.pop(key, None)
        state["_needs_runtime_reset"] = True
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        needs_reset = state.pop("_needs_runtime_reset", False)
        self.__dict__.update(state)
        if needs_reset:
            self._reset_runtime()

    # ---------------------------------------------------------------- configuration
    def default_schedule(self) -> Schedule:
        return EveryNEpochs(1)

    @property
    def uses_sampler(self) -> bool:
        """Whether dataset indices are recorded from the DataLoader's sampler."""
        return self.mode == "train" and self.index_key is None

    def config(self) -> Dict[str, Any]:
        batch_format = (getattr(self.batch_format, "__qualname__", "function") if callable(self.batch_format)
                        else self.batch_format)
        if self.mode == "probe":
            return dict(super().config(), mode="probe", definition=PROBE_DEFINITION,
                        write_interval=self.write_interval)
        return {"class": type(self).__name__, "group": self.group, "mode": "train", "definition": TRAIN_DEFINITION,
                "model_mode": "train (the training forward pass; no extra pass)",
                "index_source": "sampler" if self.index_key is None else f"batch[{self.index_key!r}]",
                "outputs_key": self.outputs_key, "batch_format": batch_format, "num_examples": self.num_examples,
                "flush_every": self.flush_every, "write_interval": self.write_interval}

    def table_specs(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[TableSpec]:
        if self.mode == "probe":
            assert probe is not None
            index = probe.index
        elif self._tracker is not None:
            index = self._tracker.index
        else:  # disabled before the examples were known
            return []
        attrs = {"mode": self.mode, "definition": TRAIN_DEFINITION if self.mode == "train" else PROBE_DEFINITION}
        if probe is not None:
            attrs["probe"] = probe.name
        events = [Field("step", (), "int64"), Field("epoch", (), "int64"), Field("index", (), "int64"),
                  Field("correct", (), "bool"), Field("loss", (), "float32"), Field("margin", (), "float32"),
                  Field("p_true", (), "float32")]
        examples = [Field("index", (), "int64"), Field("presentations", (), "int64"),
                    Field("forgetting_count", (), "int64"), Field("learning_count", (), "int64"),
                    Field("first_learned_step", (), "int64"), Field("first_learned_presentation", (), "int64"),
                    Field("never_learned", (), "bool"), Field("unforgettable", (), "bool"),
                    Field("confidence", (), "float64"), Field("variability", (), "float64"),
                    Field("correctness", (), "float64")]
        return [TableSpec(f"{self.group}/events", events, key="step", row_dim="event", attrs=attrs),
                TableSpec(f"{self.group}/examples", examples, row_dim="example", coords={"example": index},
                          attrs=attrs, n_rows=int(index.shape[0]))]

    @property
    def tracker(self) -> Optional[ForgettingTracker]:
        """The running per-example statistics (from ``on_train_start``)."""
        return self._tracker

    # ---------------------------------------------------------------- state
    def extra_state(self) -> Dict[str, Any]:
        if self._tracker is None:
            return {}
        return {"mode": self.mode, "open_epoch": self._open_epoch,
                "tracker": {k: torch.from_numpy(np.asarray(v)) for k, v in self._tracker.state_dict().items()}}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if state.get("mode", self.mode) != self.mode:
            raise RuntimeError(f"{type(self).__name__}: the checkpoint was written in mode={state['mode']!r}, this "
                               f"monitor has mode={self.mode!r}; resume with the same settings")
        self._loaded_tracker = dict(state["tracker"]) if state.get("tracker") is not None else None
        self._open_epoch = state.get("open_epoch")

    def state_dict(self) -> Dict[str, Any]:
        if self.mode == "train" and not self._disabled:
            self._guarded(self._drain)
        return super().state_dict()

    def _ensure_tracker(self, index: np.ndarray) -> ForgettingTracker:
        if self._tracker is not None and np.array_equal(self._tracker.index, index):
            return self._tracker
        if self._loaded_tracker is not None:
            tracker = ForgettingTracker.from_state_dict(self._loaded_tracker)
            self._loaded_tracker = None
            if not np.array_equal(tracker.index, index):
                raise RuntimeError(
                    f"{type(self).__name__}: the checkpoint tracks {tracker.index.shape[0]} examples, this run "
                    f"{index.shape[0]} (or different dataset indices); resume with the same data and settings")
        else:
            tracker = ForgettingTracker(index=index)
        self._tracker = tracker
        return tracker

    # ---------------------------------------------------------------- errors
    def _fail(self, exc: BaseException, agreed: bool = False) -> None:
        agreed = agreed or getattr(exc, "_lightning_ntk_agreed", False)
        if self._dist.active and not agreed:
            # Several processes: settled at the next collective point (_agree), where every rank
            # learns of it, so that all raise, or all disable, together.
            if self._deferred_error is None:
                self._deferred_error = exc
            return
        if isinstance(exc, ForgettingCaptureError):
            self._pending = []  # records buffered since the last flush may be mis-keyed: never write them
        if self.on_error == "raise":
            exc._lightning_ntk_agreed = True  # type: ignore[attr-defined]
            raise exc
        if not self._disabled:
            warnings.warn(
                f"{type(self).__name__} ({self.group}) is disabled for the rest of this run: "
                f"{type(exc).__name__}: {exc} Pass on_error='raise' to stop training instead.",
                RuntimeWarning, stacklevel=3)
        self._disable()
        self._cleanup()

    def _agree(self, error: Optional[BaseException] = None) -> None:
        """A collective point (every rank calls it): if any rank failed since the last one, every
        rank raises (on_error="raise") or disables this monitor ("warn"). Identity for one process."""
        error = error or self._deferred_error
        self._deferred_error = None
        error = self._dist.agree_on_error(error, f"{type(self).__name__} ({self.group})")
        if error is not None:
            self._fail(error, agreed=True)

    def _guarded(self, fn: Any, *args: Any) -> Any:
        if self._disabled:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - on_error decides
            self._fail(exc)
            return None

    def _cleanup(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self._recorder.restore()
        if self._interception is not None:
            strategy, previous, wrapper = self._interception
            self._interception = None
            wrapper.lightning_ntk_inactive = True  # a pass-through from now on
            if strategy.__dict__.get("process_dataloader") is wrapper:
                # Unwind past wrappers of monitors already torn down (they are pass-throughs).
                while previous is not None and getattr(previous, "lightning_ntk_inactive", False):
                    previous = previous.lightning_ntk_previous
                if previous is None:
                    del strategy.process_dataloader
                else:
                    strategy.process_dataloader = previous
        self._pending = []
        self._candidates = []
        self._capturing = False
        self._label_dataset = self._label_snapshot = None  # nothing keeps the dataset alive after fit

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if str(stage) not in ("fit", "TrainerFn.FITTING") or not self.uses_sampler:
            return
        self._reset_runtime()
        self._intercept_train_dataloaders(trainer)

    def _intercept_train_dataloaders(self, trainer: Any) -> None:
        """Record the training loader's indices from the moment Lightning prepares it.

        Lightning calls ``strategy.process_dataloader`` on every loader before creating its
        first iterator (for the first epoch, before ``on_train_start``; for a reloaded
        loader, before ``on_train_epoch_start``), so no callback hook comes early enough.
        """
        strategy = getattr(trainer, "strategy", None)
        inner = getattr(strategy, "process_dataloader", None)
        if strategy is None or not callable(inner):
            return
        previous = strategy.__dict__.get("process_dataloader")
        monitor = self

        def process_dataloader(dataloader: Any) -> Any:
            dataloader = inner(dataloader)
            if (not process_dataloader.lightning_ntk_inactive and getattr(trainer, "training", False)
                    and not getattr(trainer, "sanity_checking", False)):
                monitor._no_sampler_reason = monitor._recorder.attach(dataloader)
            return dataloader

        process_dataloader.lightning_ntk_inactive = False  # type: ignore[attr-defined]
        process_dataloader.lightning_ntk_previous = previous  # type: ignore[attr-defined]
        strategy.process_dataloader = process_dataloader
        self._interception = (strategy, previous, process_dataloader)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Training mode takes no snapshots (budget=False) but its per-batch time is charged to
        # the Trainer's shared governor, so the other monitors' snapshots give way to it.
        self._charged_governor = shared_governor(trainer) if self.mode == "train" else None
        if self._charged_governor is not None:
            self._charged_governor.start()
        resuming = self._loaded_state is not None
        if not resuming:
            self._loaded_tracker = None
            self._open_epoch = None
        self._tracker = None
        self._pending = []
        self._batches_since_flush = 0
        self._ended_epoch = None
        if self.mode == "train" and not self._disabled:
            self._guarded(self._prepare_training, trainer)
            if self._dist.active:
                self._guarded(self._agree)
        self._last_write = self._last_epoch_processing = self._clock()
        self._scalars_logged_at = None
        super().on_train_start(trainer, pl_module)
        if self.mode == "train" and not self._disabled:
            # Under DDP the processing points are collectives: a fixed count every rank knows
            # (an automatic one would be decided from each rank's first batch).
            self._flush_every = self.flush_every or (_DDP_FLUSH_BATCHES if self._dist.active else None)
            self._batch_step = int(trainer.global_step)
            self._candidates, self._captured_kind = [], None
            self._common_layout = False
            if self._hook_handle is None:
                self._hook_handle = pl_module.register_forward_hook(self._capture)
            self._capturing = True
        if self.mode == "train" and resuming and self._tracker is not None:
            # The file now holds the checkpoint's event rows; make the summary agree with them.
            self._guarded(self._write_summary, int(trainer.global_step))

    def _prepare_training(self, trainer: Any) -> None:
        loaders = getattr(trainer, "train_dataloader", None)
        several = isinstance(loaders, (Mapping, list, tuple))
        if several and not (self.index_key is not None and self.num_examples is not None):
            raise ForgettingCaptureError(
                f"{type(self).__name__} records one training dataloader, and this run has "
                f"{len(loaders)}; pass index_key= (where each batch carries its dataset index), num_examples= and a "
                "batch_format= function returning (x, y)")
        if self.num_examples is not None:
            n = self.num_examples
        else:
            dataset = getattr(loaders, "dataset", None)
            try:
                n = len(dataset)  # type: ignore[arg-type]
            except TypeError:
                raise ForgettingCaptureError(
                    f"{type(self).__name__} cannot tell how many examples to track: the training loader's dataset "
                    f"({type(dataset).__name__}) has no length. Pass num_examples= (one more than the largest "
                    "dataset index). " + _HOW_TO_FIX_INDEX) from None
        self._ensure_tracker(np.arange(n, dtype=np.int64))
        if self.uses_sampler and not several:
            self._check_loader(trainer)

    def _check_loader(self, trainer: Any) -> None:
        loader = getattr(trainer, "train_dataloader", None)
        if loader is None or isinstance(loader, (Mapping, list, tuple)):
            return
        # Labels of a TensorDataset check that recorded indices match the batches (cheap, exact);
        # compared with the latest snapshot at every epoch start and processing point (_note_labels).
        dataset = getattr(loader, "dataset", None)
        if dataset is not self._label_dataset:
            self._label_dataset = (dataset if self.batch_format is None and _label_source(dataset) is not None
                                   else None)
        self._label_workers = int(getattr(loader, "num_workers", 0) or 0) > 0
        self._note_labels()
        sampler = self._recorder.index_sampler(loader)
        if sampler is None or not self._recorder.is_recording(sampler):
            # Not prepared through strategy.process_dataloader: record from now on. Batches of an
            # iterator created earlier come without indices, which the first of them reports.
            self._no_sampler_reason = self._recorder.attach(loader)

    def _note_labels(self) -> None:
        """Compare the TensorDataset's labels with the latest snapshot (one comparison of the
        label tensor with its copy). If they differ, that snapshot's batches are not checked
        (they were trained on either labels, in an order no hook sees: a LightningModule's own
        on_train_epoch_start runs after the callbacks', DataLoader workers hold their own copy
        of the dataset) and the new labels become the snapshot; with workers, checks stop for
        the rest of the fit (a worker started before the change keeps the old labels)."""
        source = _label_source(self._label_dataset) if self._label_dataset is not None else None
        snapshot = self._label_snapshot
        if snapshot is not None and source is not None and snapshot.same(*source):
            return
        if snapshot is not None:
            snapshot.valid = False
            self._labels_unchecked = self._labels_unchecked or self._label_workers
        self._label_snapshot = (_LabelSnapshot(*source) if source is not None and not self._labels_unchecked
                                else None)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_pass = None
        if self.uses_sampler and not self._disabled:
            self._guarded(self._check_loader, trainer)

    def _check_pass(self, recorded_in: int) -> None:
        """Every batch of an epoch must come from one pass over the sampler (one iterator)."""
        if self._epoch_pass is None:
            self._epoch_pass = recorded_in
        elif recorded_in != self._epoch_pass:
            raise ForgettingCaptureError(
                f"{type(self).__name__}: a second pass over the training DataLoader's sampler started during this "
                "epoch (something else iterates the training loader while training runs), so the recorded dataset "
                "indices no longer follow the batches. " + _HOW_TO_FIX_INDEX)

    # Training mode needs no on_train_batch_start of its own: the step of a batch is the
    # global step at the end of the previous one (or at train start), the forward hook
    # captures the logits during training_step, and the targets are read at batch end. The
    # inherited hook switches the file to SWMR mode at the first batch and then leaves
    # Lightning's dispatch (Monitor.on_train_batch_start).

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        # Outputs of pl_module(...) in train mode during training_step; at batch end the first
        # with one row per target is the batch's logits. Others are skipped: e.g. under DDP,
        # Lightning routes training_step itself through pl_module(...), whose output (the loss)
        # arrives after those of the calls made inside training_step. Runs at every forward
        # call of the module: the common case (a tensor, the first call of the batch) is short.
        if (not self._capturing or not module.training
                or getattr(module, "_current_fx_name", "training_step") != "training_step"):
            return
        logits = output if type(output) is torch.Tensor else _logits_in(output, self.outputs_key)
        if logits is None or logits.ndim < 1:
            if self._captured_kind is None:
                self._captured_kind = (type(output).__name__ if logits is None
                                       else f"tensor of shape {tuple(logits.shape)}")
            return
        candidates = self._candidates
        if candidates:  # the first output of each row count is kept
            if len(candidates) >= _MAX_CANDIDATES:
                return
            rows = logits.shape[0]
            for candidate in candidates:
                if candidate.shape[0] == rows:
                    return
        # A copy taken now: the values of the forward pass, whatever happens to the output
        # afterwards (an in-place change by the module, a CUDA graph replaying into the same
        # buffer), and no more memory than the logits (an output that is a view, e.g. the
        # last token's logits, would keep its whole base alive). In the forward hook the
        # output is still in cache: the same copy at batch end cost ~11 µs on the demo. One
        # clone with autograd off, rather than detach() then clone(): one operator call
        # fewer, ~2 µs per batch in the demo training.
        grad_was = _is_grad_enabled()
        _set_grad_enabled(False)
        try:
            candidates.append(logits.clone())
        finally:
            _set_grad_enabled(grad_was)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.mode != "train":
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        started = _perf_counter()
        try:
            queue = self._recorder.queue
            popped = queue.popleft() if queue else False
            step = self._batch_step
            self._batch_step = int(trainer.global_step)
            if self._disabled:
                return
            if not (self._common_layout and self._record_common_batch(outputs, batch, popped, step, trainer)):
                self._guarded(self._record_batch, outputs, batch, popped, step, int(trainer.current_epoch))
            self._candidates = []
            self._captured_kind = None
            self._batches_since_flush += 1
            if (self._flush_every is not None and self._batches_since_flush >= self._flush_every
                    and not self._disabled):
                self._batches_since_flush = 0
                self._guarded(self._drain)
                events = self._tables.get(f"{self.group}/events")
                buffered = events.n_rows - events.n_committed if isinstance(events, Table) else 0
                if self._write_due() or buffered >= _MAX_BUFFERED_ROWS:
                    self._guarded(self._write)
        finally:
            self._uncharged += _perf_counter() - started
            if self._uncharged >= _CHARGE_EVERY:
                self._charge(0.0)

    def _charge(self, seconds: float) -> None:
        """Charge per-batch time to the shared governor, in portions of at least
        ``_CHARGE_EVERY`` seconds (a call into the governor per batch costs a few µs)."""
        self._uncharged += seconds
        if self._uncharged >= _CHARGE_EVERY:
            governor = self._charged_governor
            if governor is not None:
                governor.charge(self._uncharged)
            self._uncharged = 0.0

    def _record_common_batch(self, outputs: Any, batch: Any, popped: Any, step: int, trainer: Any) -> bool:
        """The common case (called when ``_common_layout``), once a batch of this epoch went
        through :meth:`_record_batch` and found it: a ``(x, y, ...)`` batch with a 1-D target tensor, indices from the sampler
        (same pass), one captured output with a row per target, nothing in ``outputs``.
        Appends what ``_record_batch`` would and returns True; False: take the full path
        (which checks everything and says what is wrong). The monitor's whole per-batch
        cost on small steps is Python, so this path is short."""
        candidates = self._candidates
        if (popped is False or popped[0] != self._epoch_pass or len(candidates) != 1
                or type(batch) not in (tuple, list) or len(batch) < 2):
            return False
        if isinstance(outputs, dict):
            if self.outputs_key in outputs or outputs.get("index") is not None:
                return False
        elif outputs is not None and not isinstance(outputs, torch.Tensor):
            return False
        targets, index, logits = batch[1], popped[1], candidates[0]
        if (type(targets) is not torch.Tensor or targets.ndim != 1 or type(index) is not list
                or len(index) != targets.shape[0] or logits.shape[0] != targets.shape[0]):
            return False
        self._pending.append((index, step, int(trainer.current_epoch), logits, targets, self._label_snapshot))
        return True

    def _record_batch(self, outputs: Any, batch: Any, popped: Any, step: int, epoch: int) -> None:
        if popped is not False:
            self._check_pass(popped[0])
        _, targets = batch_to_xy(batch, self.batch_format)
        if not isinstance(targets, torch.Tensor):
            targets = torch.as_tensor(targets)
        rows = int(targets.shape[0]) if targets.ndim else 1
        logits = outputs.get(self.outputs_key) if isinstance(outputs, Mapping) else None
        from_candidates = not isinstance(logits, torch.Tensor)
        if from_candidates:
            logits = next((c for c in self._candidates if c.shape[0] == rows), None)
        if logits is None:
            kind = self._captured_kind or (f"tensor of shape {tuple(self._candidates[0].shape)}"
                                           if self._candidates else None)
            seen = (f"no output of pl_module(...) held per-example logits (the first was a {kind})" if kind else
                    "the LightningModule was not called (pl_module(...)) during training_step")
            raise ForgettingCaptureError(f"{type(self).__name__} found no logits for this training batch: {seen}. "
                                         + _HOW_TO_FIX_LOGITS.format(key=self.outputs_key))
        if self.index_key is not None:
            try:
                raw = batch[self.index_key]
            except (KeyError, IndexError, TypeError) as exc:
                raise ForgettingCaptureError(
                    f"{type(self).__name__}: index_key={self.index_key!r} is not in this batch (a "
                    f"{type(batch).__name__}): {exc}. " + _HOW_TO_FIX_INDEX) from None
            index, source = _as_index_array(raw, f"batch[{self.index_key!r}]"), "index_key"
        elif isinstance(outputs, Mapping) and outputs.get("index") is not None:
            index, source = _as_index_array(outputs["index"], "training_step's outputs['index']"), "outputs"
        elif popped is not False and isinstance(popped[1], list):  # a BatchSampler's batch: converted later
            index, source = popped[1], "sampler"
        elif popped is not False:
            index, source = _as_index_array(popped[1], "an index batch of the DataLoader's sampler"), "sampler"
        else:
            if self._no_sampler_reason:
                reason = self._no_sampler_reason
            else:
                reason = ("no index batch was recorded from the training DataLoader's sampler for it (the loader's "
                          "iterator was created before the monitor could record it, or something else iterates the "
                          "training loader during training)")
            raise ForgettingCaptureError(f"{type(self).__name__} cannot tell which dataset indices this training "
                                         f"batch holds: {reason}. " + _HOW_TO_FIX_INDEX)
        n = int(targets.shape[0]) if targets.ndim else 1
        n_index = len(index)
        if n_index != n or int(logits.shape[0]) != n:
            where = {"sampler": "recorded from the DataLoader's sampler", "outputs": "in outputs['index']",
                     "index_key": f"in batch[{self.index_key!r}]"}[source]
            raise ForgettingCaptureError(
                f"{type(self).__name__}: this batch has {n} targets and {int(logits.shape[0])} rows of logits, but "
                f"{n_index} dataset indices {where}. A sampler that does not yield one index per example, a "
                "collate_fn that changes the batch size, or a module output that is not per-example logits breaks "
                "the pairing. " + _HOW_TO_FIX_INDEX)
        # Outcomes are computed at the next flush, over every buffered batch at once (a few
        # tensor operations per flush instead of per batch). Captured outputs were copied by
        # the forward hook; logits returned by training_step are copied here.
        snapshot = self._label_snapshot if source == "sampler" else None
        if self._flush_every is None:  # the same on every rank: batches have the same shape
            per_batch = max(1, logits.numel() * logits.element_size())
            self._flush_every = max(1, min(_AUTO_FLUSH_BATCHES, _AUTO_FLUSH_BYTES // per_batch))
        self._pending.append((index, step, epoch, logits if from_candidates else logits.detach().clone(),
                              targets.reshape(-1), snapshot))
        # The layout _record_common_batch takes from the next batch of this pass on.
        self._common_layout = (self.batch_format is None and self.index_key is None and source == "sampler"
                               and isinstance(popped[1], list) and from_candidates and len(self._candidates) == 1
                               and targets.ndim == 1)

    # ---------------------------------------------------------------- recording
    def _drain(self) -> None:
        """Move the buffered presentations into the tracker and the events table.

        Under several processes this is a collective point: every rank calls it at the same
        moments (every ``flush_every`` batches, epoch ends, checkpoints, the end of training).
        """
        if self._tracker is None:
            self._pending = []
            return
        records: Optional[_Records] = None
        error: Optional[BaseException] = None
        try:
            records = self._local_records()
        except Exception as exc:  # noqa: BLE001 - settled below
            error = exc
        if self._dist.active:
            self._agree(error)
            if self._disabled:
                return
            records = self._gather(records if records is not None else _empty_records())
        elif error is not None:
            raise error
        if records is not None and records.index.shape[0]:
            self._apply(records)
        ended = self._ended_epoch
        if ended is not None and self._open_epoch is not None and self._open_epoch <= ended:
            self._close_epoch()  # its end hook ran before these records were processed

    def _local_records(self) -> Optional[_Records]:
        """This process's buffered batches -> records (outcomes computed for all at once)."""
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        sizes = np.array([len(p[0]) for p in pending], dtype=np.int64)
        index = _concat_indices([p[0] for p in pending], int(sizes.sum()))
        logits = torch.cat([p[3] for p in pending])
        target_parts = [p[4] for p in pending]
        try:  # one move for all of them (a .to per batch costs more than the concatenation)
            targets = torch.cat(target_parts).to(logits.device)
        except RuntimeError:  # targets on several devices
            targets = torch.cat([t.to(logits.device) for t in target_parts])
        outcomes = presentation_outcomes(logits, targets, check_targets=False)
        values = torch.stack([outcomes.correct.float(), outcomes.loss.float(), outcomes.margin.float(),
                              outcomes.p_true.float()]).cpu().numpy()
        if any(p[5] is not None for p in pending):
            self._check_labels(pending, sizes, index, targets)
        records = _Records(batch=np.repeat(np.arange(len(pending)), sizes), index=index,
                           step=np.repeat(np.array([p[1] for p in pending], dtype=np.int64), sizes),
                           epoch=np.repeat(np.array([p[2] for p in pending], dtype=np.int64), sizes),
                           correct=values[0] > 0.5, loss=values[1], margin=values[2],
                           p_true=np.minimum(values[3], 1.0))  # exp(log p) may round a hair above 1
        return records

    def _check_labels(self, pending: List[Any], sizes: np.ndarray, index: np.ndarray, targets: torch.Tensor) -> None:
        """Sampler indices vs the batches' targets: a TensorDataset's labels at the recorded
        indices must equal the targets, batch by batch against the labels of their time
        (batches recorded while the labels changed in place are left unchecked)."""
        self._note_labels()  # changed since the latest snapshot: its batches are not checked
        snapshots = [p[5] if p[5] is not None and p[5].valid else None for p in pending]
        distinct = {id(s): s for s in snapshots if s is not None}
        if not distinct:
            return
        number = {key: k for k, key in enumerate(distinct)}  # per row: its batch's snapshot, or -1
        per_row = np.repeat(np.array([-1 if s is None else number[id(s)] for s in snapshots]), sizes)
        seen = targets.cpu().numpy()
        for key, snapshot in distinct.items():
            rows = per_row == number[key]
            checked, labels = index[rows], snapshot.labels
            inside = (checked >= 0) & (checked < labels.shape[0])
            if not np.all(inside) or not np.array_equal(labels[checked], seen[rows]):
                raise ForgettingCaptureError(
                    f"{type(self).__name__}: the dataset indices recorded from the DataLoader's sampler do not match "
                    "the targets of the batches trained on (the dataset's labels at those indices differ). Something "
                    "else may iterate the training loader during training, a collate_fn may reorder the examples of "
                    "a batch, or the sampler's order is not the batch order. " + _HOW_TO_FIX_INDEX)

    def _gather(self, records: _Records) -> _Records:
        """This process's presentations -> every process's, in one training order (all ranks).

        Identity for one process. Under DDP, every rank's records of the batches since the
        last drain are all-gathered (on the monitor's gloo group, bounded wait) and ordered
        batch by batch, ranks interleaved (:func:`_interleave`); every rank then updates its
        tracker with the same records, so rank 0's checkpoint and file are complete. Each
        record is a presentation the network trained on, including the duplicates a
        ``DistributedSampler`` pads its last batches with.
        """
        if not self._dist.active:
            return records
        return self._drop_padding(_interleave(self._dist.gather_object(records)))

    def _drop_padding(self, records: _Records) -> _Records:
        """Under DDP a ``DistributedSampler`` pads an epoch with repeats of its first indices
        so that every rank gets as many examples; those repeats are not presentations of the
        single-process run. Within an epoch, a dataset index seen again is dropped (a
        sampler without replacement presents each index once per epoch)."""
        tracker = self._tracker
        if tracker is None or records.index.shape[0] == 0:
            return records
        seen = getattr(self, "_seen_in_epoch", None)
        if seen is None or seen[0] != int(records.epoch[0]) or seen[1].shape[0] != tracker.index.shape[0]:
            seen = (int(records.epoch[0]), np.zeros(tracker.index.shape[0], dtype=bool))
        keep = np.ones(records.index.shape[0], dtype=bool)
        slots = tracker.slots(records.index)
        for i in range(records.index.shape[0]):
            epoch = int(records.epoch[i])
            if epoch != seen[0]:
                seen = (epoch, np.zeros(tracker.index.shape[0], dtype=bool))
            if seen[1][slots[i]]:
                keep[i] = False
            else:
                seen[1][slots[i]] = True
        self._seen_in_epoch = seen
        if keep.all():
            return records
        return _Records(**{f.name: getattr(records, f.name)[keep] for f in fields(_Records)})

    def _apply(self, records: _Records) -> None:
        tracker = self._tracker
        assert tracker is not None
        # One update per epoch segment: with per-example steps and duplicates="sequential" the
        # tracker takes each example's presentations in row order, which equals one update per batch.
        cuts = (np.flatnonzero(records.epoch[1:] != records.epoch[:-1]) + 1).tolist()
        for a, b in zip([0] + cuts, cuts + [records.epoch.shape[0]]):
            epoch = int(records.epoch[a])
            if self._open_epoch is not None and epoch != self._open_epoch:
                tracker.end_epoch()  # an epoch end that no hook reported (e.g. resumed past it)
            self._open_epoch = epoch
            tracker.update(records.index[a:b], records.correct[a:b], records.p_true[a:b], step=records.step[a:b])
        events = self._tables.get(f"{self.group}/events") if self._writer else None
        if events is not None:
            events.extend({"step": records.step, "epoch": records.epoch, "index": records.index,
                           "correct": records.correct, "loss": records.loss, "margin": records.margin,
                           "p_true": records.p_true})
        self._summary_stale = True

    def _close_epoch(self) -> None:
        if self._tracker is not None and self._open_epoch is not None:
            self._tracker.end_epoch()
        self._open_epoch = None

    #: The clock of write_interval (a fake one in tests).
    _clock: Callable[[], float] = staticmethod(time.monotonic)

    def _write_due(self) -> bool:
        return self._clock() - self._last_write >= self.write_interval

    def _write(self) -> None:
        """Buffered event rows (and a pending summary rewrite) to the file: flush, fsync."""
        if self._store is not None:
            self._store.flush_async()  # the writer thread writes; an earlier write's error surfaces here
        self._last_write = self._clock()

    def _write_summary(self, step: int, hand_off: bool = True) -> None:
        """The per-example summary (and the buffered event rows) to the file; ``hand_off=False``
        only buffers it, for a caller that flushes the store itself."""
        examples = self._tables.get(f"{self.group}/examples") if self._writer else None
        if examples is not None and self._tracker is not None:
            examples.write(self._tracker.summary(), step=step)
        if hand_off:
            self._write()
        self._summary_stale = False

    def _scalars(self) -> Dict[str, float]:
        tracker = self._tracker
        if tracker is None or len(tracker.index) == 0:
            return {}
        counts = tracker.forgetting_count
        return {"forgotten_fraction": float(np.mean(counts > 0)),
                "unforgettable_fraction": float(np.mean(tracker.unforgettable)),
                "never_learned_fraction": float(np.mean(tracker.never_learned)),
                "mean_forgetting_count": float(np.mean(counts))}

    @_charged
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.mode == "train" and not self._disabled:
            self._epoch_pass = None
            self._ended_epoch = int(trainer.current_epoch)  # closed when its records are processed
            # Processing at every epoch end would cost more than the rest of the monitor on
            # short epochs; it happens when a write is due. Under DDP it stays at every epoch
            # end: a collective point every rank must reach together (clocks differ).
            if self._dist.active or self._clock() - self._last_epoch_processing >= self.write_interval:
                self._last_epoch_processing = self._clock()
                step = int(trainer.global_step)
                self._guarded(self._end_training_epoch, step)
                if not self._disabled and self.log_scalars:
                    self._log_scalars(trainer, step)
        super().on_train_epoch_end(trainer, pl_module)

    def _log_scalars(self, trainer: Any, step: int) -> None:
        if self._scalars_logged_at != step:  # once per step (an epoch end can be the end of training)
            self._scalars_logged_at = step
            self._log(trainer, self._scalars(), step)

    def _end_training_epoch(self, step: int) -> None:
        self._drain()
        self._close_epoch()
        self._batches_since_flush = 0
        self._write_summary(step)  # at most every write_interval: the summary, the event rows

    def _flush_all(self) -> None:
        pass  # on_train_end flushes after the summary, under this monitor's own error handling

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._charged_governor is not None and self._uncharged:
            self._charged_governor.charge(self._uncharged)
        self._uncharged = 0.0
        if self.mode == "train" and not self._disabled:
            self._guarded(self._drain)
            if not self._disabled and self.log_scalars:
                self._log_scalars(trainer, int(trainer.global_step))
        super().on_train_end(trainer, pl_module)  # probe mode: the final snapshot
        if not self._disabled and self._summary_stale:
            self._guarded(self._write_summary, int(trainer.global_step), False)
        if not self._disabled and self._store is not None:
            # Everything in the file before training ends, written here: handing the rows to
            # the writer thread only to wait for it would add a thread switch to the wait.
            self._guarded(self._store.flush)
        if not self._disabled and self._dist.active:
            self._guarded(self._agree)  # a failure of rank 0's last write reaches every rank

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._cleanup()
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.mode == "train" and self._store is not None and not self._disabled:
            try:  # keep the presentations recorded before the failure (no collectives now)
                if not self._dist.active:
                    self._drain()
                self._store.flush()
            except Exception:  # noqa: BLE001 - the training's own exception matters more
                pass
        self._cleanup()
        super().on_exception(trainer, pl_module, exception)

    # ---------------------------------------------------------------- probe mode
    def _snapshot(self, trainer: Any, pl_module: nn.Module, epoch: float, **kwargs: Any) -> None:
        if self.mode == "probe":
            super()._snapshot(trainer, pl_module, epoch, **kwargs)

    def measure(self, trainer: Any, pl_module: nn.Module, probe: Optional[ProbeSet]) -> Tuple[Dict[str, Any], Dict[str, float]]:
        assert probe is not None
        tracker = self._ensure_tracker(probe.index)
        chunks = []
        with torch.no_grad():
            for x, _ in probe.batches(self.batch_size):
                output = self.forward_fn(pl_module, x)
                logits = _logits_in(output, self.outputs_key)
                if logits is None:
                    raise ForgettingCaptureError(
                        f"{type(self).__name__}: the model's output on the probe is a {type(output).__name__} without "
                        f"logits; return a tensor, a tuple whose first element is the logits, or a dict with key "
                        f"{self.outputs_key!r}, or pass forward_fn=(module, x) -> logits")
                chunks.append(logits)
        logits = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        values = presentation_outcomes(logits, probe.y.to(logits.device))
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        n = len(probe)
        records = _Records(batch=np.zeros(n, dtype=np.int64), index=probe.index, step=np.full(n, step, np.int64),
                           epoch=np.full(n, epoch, np.int64), correct=values.correct.cpu().numpy(),
                           loss=values.loss.float().cpu().numpy(), margin=values.margin.float().cpu().numpy(),
                           p_true=values.p_true.float().cpu().numpy())
        self._open_epoch = None
        self._apply(records)
        tracker.end_epoch()  # each snapshot is one cartography epoch
        self._open_epoch = None
        if self._write_due():
            self._write_summary(step)
        return {}, self._scalars()
