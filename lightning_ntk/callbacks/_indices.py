"""Which dataset indices a training batch holds: the index sources of per-example monitors.

* :class:`SamplerIndices` (default): the training DataLoader's ``BatchSampler`` is made to
  record the indices its sampler yields, cut into batches exactly as ``BatchSampler`` cuts
  them (its ``sampler`` attribute is replaced by a recording wrapper: public attributes
  only). The sampler runs in the main process even with ``num_workers > 0`` and batches
  arrive in sampler order, so the oldest recorded batch is the one being trained on. The
  loader is switched to recording when Lightning prepares it (``strategy.process_dataloader``),
  before its first iterator exists.
* :class:`BatchKeyIndices`: the batch carries the index (``index_key``, e.g. from
  :class:`lightning_ntk.forgetting.WithIndex`).
* ``training_step`` returning ``{"loss": ..., "index": ...}`` (checked first by the monitor).
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

HOW_TO_FIX_INDEX = (
    "Wrap the dataset in lightning_ntk.forgetting.WithIndex(dataset) and pass index_key=-1 (index_key='index' for "
    "dict items), or pass index_key= the key / position where your batch already carries the dataset index; or "
    "return it from training_step: return {'loss': loss, 'index': index}."
)


class ForgettingCaptureError(RuntimeError):
    """The logits or the dataset indices of a training batch could not be captured."""


def as_index_array(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise ForgettingCaptureError(f"{what} must hold integer dataset indices, got dtype {array.dtype}. "
                                + HOW_TO_FIX_INDEX)
    return array.astype(np.int64, copy=False).reshape(-1)


class BatchKeyIndices:
    """The index is in the batch: ``batch[key]`` (a dict key or a tuple position)."""

    def __init__(self, key: Any) -> None:
        self.key = key

    def indices(self, batch: Any) -> np.ndarray:
        try:
            raw = batch[self.key]
        except (KeyError, IndexError, TypeError) as exc:
            raise ForgettingCaptureError(f"index_key={self.key!r} is not in this batch (a {type(batch).__name__}): "
                                    f"{exc}. " + HOW_TO_FIX_INDEX) from None
        return as_index_array(raw, f"batch[{self.key!r}]")


class _RecordingSampler:
    """Stands in for a BatchSampler's ``sampler``: each pass over it is split (``itertools.tee``,
    no Python work per index) into the stream the BatchSampler cuts into batches and one
    copy per recorder, which takes each batch's ``batch_size`` indices when the batch has
    been trained on, as ``BatchSampler.__iter__`` cut them (a last short batch included;
    with ``drop_last`` it never reaches training, so it is never taken)."""

    def __init__(self, sampler: Any, batch_sampler: Any) -> None:
        self.sampler = sampler
        self.batch_sampler = batch_sampler
        self.recorders: List["SamplerIndices"] = []

    def __iter__(self) -> Any:
        recorders = list(self.recorders)
        served, *copies = itertools.tee(iter(self.sampler), 1 + len(recorders))
        for recorder, copy in zip(recorders, copies):
            recorder.start_pass(copy, self.batch_sampler.batch_size)
        return served

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:  # set_epoch and the sampler's other attributes
        if name in ("sampler", "batch_sampler", "recorders"):
            raise AttributeError(name)
        return getattr(self.sampler, name)


def _followable(loader: Any) -> Tuple[Optional[Any], Optional[str]]:
    """The loader's BatchSampler when its batches can be followed, else why not."""
    from torch.utils.data import BatchSampler, IterableDataset

    if isinstance(getattr(loader, "dataset", None), IterableDataset):
        return None, "the training data is an IterableDataset, which has no sampler indices"
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is None:
        return None, "the training loader has no batch_sampler (batch_size=None)"
    if getattr(loader, "in_order", True) is False:
        return None, ("the training loader has in_order=False: its workers return batches in the order they "
                      "finish, not in sampler order")
    if not isinstance(batch_sampler, BatchSampler) or type(batch_sampler).__iter__ is not BatchSampler.__iter__:
        return None, (f"its batch_sampler is a {type(batch_sampler).__name__}, whose batches the monitor cannot "
                      "follow (only torch's BatchSampler: a loader with batch_size= and any sampler)")
    return batch_sampler, None


class SamplerIndices:
    """Records the training DataLoader's index batches (see the module docstring)."""

    def __init__(self) -> None:
        self._copy: Iterator[Any] = iter(())  # this recorder's copy of the current pass's indices
        self._batch_size = 1
        self.passes = 0
        self.unusable: Optional[str] = None  # why the current loader cannot be followed
        self._wrapped: List[_RecordingSampler] = []
        self._interception: Optional[Tuple[Any, Any, Any]] = None

    def start_pass(self, copy: Iterator[Any], batch_size: int) -> None:
        """A new iterator over the sampler: what the previous pass left is stale."""
        self._copy, self._batch_size = copy, batch_size
        self.passes += 1

    def is_recording(self, loader: Any) -> bool:
        batch_sampler = getattr(loader, "batch_sampler", None)
        sampler = getattr(batch_sampler, "sampler", None)
        return isinstance(sampler, _RecordingSampler) and self in sampler.recorders

    def attach(self, loader: Any) -> None:
        """Record ``loader``'s index batches from its next iterator on (or note why not)."""
        batch_sampler, self.unusable = _followable(loader)
        if batch_sampler is None or self.is_recording(loader):
            return
        sampler = batch_sampler.sampler
        if not isinstance(sampler, _RecordingSampler):  # another monitor may record it already
            sampler = _RecordingSampler(sampler, batch_sampler)
            batch_sampler.sampler = sampler
        sampler.recorders.append(self)
        self._wrapped.append(sampler)

    def pop(self) -> Optional[Tuple[int, List[Any]]]:
        """(pass number, the next index batch of the current pass), or None if none was recorded."""
        batch = list(itertools.islice(self._copy, self._batch_size))
        return (self.passes, batch) if batch else None

    def intercept(self, trainer: Any) -> None:
        """Record each training loader from the moment Lightning prepares it: Lightning calls
        ``strategy.process_dataloader`` on every loader before creating its first iterator
        (before ``on_train_start`` for the first epoch, before ``on_train_epoch_start`` for a
        reloaded loader), so no callback hook comes early enough."""
        strategy = getattr(trainer, "strategy", None)
        inner = getattr(strategy, "process_dataloader", None)
        if strategy is None or not callable(inner):
            return
        previous = strategy.__dict__.get("process_dataloader")
        recorder = self

        def process_dataloader(dataloader: Any) -> Any:
            dataloader = inner(dataloader)
            if (not process_dataloader.lightning_ntk_inactive and getattr(trainer, "training", False)
                    and not getattr(trainer, "sanity_checking", False)):
                recorder.attach(dataloader)
            return dataloader

        process_dataloader.lightning_ntk_inactive = False  # type: ignore[attr-defined]
        process_dataloader.lightning_ntk_previous = previous  # type: ignore[attr-defined]
        strategy.process_dataloader = process_dataloader
        self._interception = (strategy, previous, process_dataloader)

    def restore(self) -> None:
        """Undo every change to loaders and the strategy (at teardown)."""
        for sampler in reversed(self._wrapped):
            if self in sampler.recorders:
                sampler.recorders.remove(self)
            if not sampler.recorders and sampler.batch_sampler.sampler is sampler:
                sampler.batch_sampler.sampler = sampler.sampler
        self._wrapped = []
        self._copy = iter(())
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


SAMPLER = "recorded from the DataLoader's sampler"


class IndexSources:
    """Where a batch's dataset indices come from, in this order: ``index_key`` (the batch),
    ``training_step``'s ``outputs["index"]``, the recorded sampler batches. Every batch of
    an epoch must come from one pass over the sampler."""

    def __init__(self, owner: str, index_key: Any) -> None:
        self.owner = owner
        self.key = None if index_key is None else BatchKeyIndices(index_key)
        self.sampler = SamplerIndices() if index_key is None else None
        self.epoch_pass: Optional[int] = None

    def indices(self, batch: Any, outputs: Any, popped: Optional[Tuple[int, List[Any]]]) -> Tuple[Any, str]:
        """(the batch's dataset indices, where they were found)."""
        if self.key is not None:
            return self.key.indices(batch), f"in batch[{self.key.key!r}]"
        if isinstance(outputs, Mapping) and outputs.get("index") is not None:
            return as_index_array(outputs["index"], "training_step's outputs['index']"), "in outputs['index']"
        if popped is None:
            reason = self.sampler.unusable or (
                "no index batch was recorded from the training DataLoader's sampler for it (the loader's iterator "
                "was created before the monitor could record it, or something else iterates the training loader "
                "during training)")
            raise ForgettingCaptureError(f"{self.owner} cannot tell which dataset indices this training batch holds: "
                                    f"{reason}. " + HOW_TO_FIX_INDEX)
        if self.epoch_pass is None:
            self.epoch_pass = popped[0]
        elif popped[0] != self.epoch_pass:
            raise ForgettingCaptureError(
                f"{self.owner}: a second pass over the training DataLoader's sampler started during this epoch "
                "(something else iterates the training loader while training runs), so the recorded dataset indices "
                "no longer follow the batches. " + HOW_TO_FIX_INDEX)
        return popped[1], SAMPLER
