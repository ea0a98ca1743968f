"""Checking that recorded dataset indices follow the batches: a ``TensorDataset``'s labels at
the recorded indices must equal the targets the network was trained on."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch


def label_source(dataset: Any) -> Optional[Tuple[torch.Tensor, Tuple[Any, ...]]]:
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


class LabelSnapshot:
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


class LabelCheck:
    """The labels of the training dataset over a fit: compared with the latest snapshot at
    every epoch start and processing point. If they differ, that snapshot's batches are not
    checked (they were trained on either labels, in an order no hook sees: a LightningModule's
    own on_train_epoch_start runs after the callbacks', DataLoader workers hold their own
    copy of the dataset) and the new labels become the snapshot; with workers, checks stop
    for the rest of the fit (a worker started before the change keeps the old labels)."""

    def __init__(self) -> None:
        self.dataset: Any = None
        self.workers = False
        self.snapshot: Optional[LabelSnapshot] = None
        self.stopped = False

    def follow(self, loader: Any, usable: bool) -> None:
        dataset = getattr(loader, "dataset", None)
        if dataset is not self.dataset:
            self.dataset = dataset if usable and label_source(dataset) is not None else None
        self.workers = int(getattr(loader, "num_workers", 0) or 0) > 0
        self.note()

    def note(self) -> None:
        source = label_source(self.dataset) if self.dataset is not None else None
        if self.snapshot is not None and source is not None and self.snapshot.same(*source):
            return
        if self.snapshot is not None:
            self.snapshot.valid = False
            self.stopped = self.stopped or self.workers
        self.snapshot = LabelSnapshot(*source) if source is not None and not self.stopped else None

    def mismatch(self, snapshots: Sequence[Optional[LabelSnapshot]], sizes: np.ndarray, index: np.ndarray,
                 targets: torch.Tensor) -> bool:
        """Whether some batch's targets differ from the labels of its time at its indices."""
        self.note()
        snapshots = [s if s is not None and s.valid else None for s in snapshots]
        distinct = {id(s): s for s in snapshots if s is not None}
        if not distinct:
            return False
        number = {key: k for k, key in enumerate(distinct)}
        per_row = np.repeat(np.array([-1 if s is None else number[id(s)] for s in snapshots]), sizes)
        seen = targets.cpu().numpy()
        for key, snapshot in distinct.items():
            rows = per_row == number[key]
            checked, labels = index[rows], snapshot.labels
            inside = (checked >= 0) & (checked < labels.shape[0])
            if not np.all(inside) or not np.array_equal(labels[checked], seen[rows]):
                return True
        return False

    def clear(self) -> None:
        self.dataset = self.snapshot = None  # nothing keeps the dataset alive after fit
