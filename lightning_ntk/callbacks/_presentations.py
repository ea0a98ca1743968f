"""Presentations of training examples: one buffered batch (:class:`Presentation`), the
records of many (:class:`Records`), and their single-process order under DDP."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, List, Optional, Sequence

import numpy as np
import torch


@dataclass
class Presentation:
    """One training batch as recorded at its end: processed later, with others."""

    index: Any  # dataset indices: a list from a sampler (converted when processed) or an int64 array
    step: int  # the global step before this batch's optimiser update
    epoch: int
    logits: torch.Tensor  # a copy, (B, C)
    targets: torch.Tensor  # (B,)
    labels: Optional[Any] = None  # the dataset's labels of its time (a label snapshot), to check the pairing


@dataclass
class Records:
    """Presentations of several batches, in training order (numpy arrays, one entry each)."""

    batch: np.ndarray  # batch number, to keep each tracker update to whole batches
    index: np.ndarray
    step: np.ndarray
    epoch: np.ndarray
    correct: np.ndarray
    loss: np.ndarray
    margin: np.ndarray
    p_true: np.ndarray

    @classmethod
    def empty(cls) -> "Records":
        ints, floats = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        return cls(batch=ints, index=ints, step=ints, epoch=ints, correct=np.zeros(0, dtype=bool), loss=floats,
                   margin=floats, p_true=floats)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def select(self, keep: np.ndarray) -> "Records":
        return Records(**{f.name: getattr(self, f.name)[keep] for f in fields(Records)})

    def columns(self) -> dict:
        """The event-table columns."""
        return {"step": self.step, "epoch": self.epoch, "index": self.index, "correct": self.correct,
                "loss": self.loss, "margin": self.margin, "p_true": self.p_true}


def position_in_batch(batch: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal batch numbers."""
    n = batch.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], batch[1:] != batch[:-1])))
    return np.arange(n) - np.repeat(starts, np.diff(np.concatenate((starts, [n]))))


def interleave(parts: Sequence[Records]) -> Records:
    """Every rank's records in one training order: batch by batch; within a batch, element j
    of rank 0, element j of rank 1, ..., then element j + 1 (an unshuffled DistributedSampler
    gives rank r the examples r, r + W, r + 2W, ...: this restores the single-process order)."""
    names = [f.name for f in fields(Records)]
    rank = np.concatenate([np.full(len(p), r, dtype=np.int64) for r, p in enumerate(parts)])
    position = np.concatenate([position_in_batch(p.batch) for p in parts])
    merged = {name: np.concatenate([getattr(p, name) for p in parts]) for name in names}
    order = np.lexsort((rank, position, merged["batch"]))
    return Records(**{name: values[order] for name, values in merged.items()})


class EpochDeduplicator:
    """Under DDP a ``DistributedSampler`` pads an epoch with repeats of its first indices so
    that every rank gets as many examples; those repeats are not presentations of the
    single-process run. Within an epoch, a slot seen again is dropped (a sampler without
    replacement presents each index once per epoch)."""

    def __init__(self) -> None:
        self._epoch: Optional[int] = None
        self._seen = np.zeros(0, dtype=bool)

    def __call__(self, records: Records, slots: np.ndarray, n_slots: int) -> Records:
        if len(records) == 0:
            return records
        keep = np.ones(len(records), dtype=bool)
        for i in range(len(records)):
            epoch = int(records.epoch[i])
            if epoch != self._epoch or self._seen.shape[0] != n_slots:
                self._epoch, self._seen = epoch, np.zeros(n_slots, dtype=bool)
            keep[i] = not self._seen[slots[i]]
            self._seen[slots[i]] = True
        return records if keep.all() else records.select(keep)


def concat_indices(parts: List[Any], as_array: Any) -> np.ndarray:
    """Index batches (lists of ints from a sampler, or int64 arrays) -> one int64 array."""
    if all(isinstance(p, list) for p in parts):
        return as_array([i for p in parts for i in p], "the index batches of the DataLoader's sampler")
    return np.concatenate([as_array(p, "an index batch of the DataLoader's sampler") for p in parts])
