"""Probe sets: fixed, seeded, class-stratified subsets of a dataset, dataset indices kept.

Every quantity measured "on the probe" (eNTK, probe metrics, activation codes) is
computed on the same examples at every snapshot, identified by their index in the
dataset, so snapshots are comparable over time and examples can be traced back.

Batch layouts understood by :func:`batch_to_xy`: a tuple/list ``(x, y, ...)``, a dict
with recognised or configured keys, or a user function ``batch -> (x, y)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._args import integer, one_of, positive_int, text

#: ``batch_format``: None (automatic), a pair of keys/positions ``(x_key, y_key)``, or a
#: function ``batch -> (x, y)``.
BatchFormat = Union[None, Tuple[Union[str, int], Union[str, int]], Callable[[Any], Tuple[Any, Any]]]

_DICT_KEY_PAIRS = (("x", "y"), ("input", "target"), ("inputs", "targets"), ("image", "label"),
                   ("images", "labels"), ("input_ids", "labels"), ("features", "labels"), ("data", "target"))


class BatchLayoutError(TypeError):
    """A batch (or dataset item) whose inputs and targets cannot be found."""


def batch_to_xy(batch: Any, batch_format: BatchFormat = None) -> Tuple[Any, Any]:
    """Split a batch into ``(x, y)`` following ``batch_format``."""
    if callable(batch_format):
        out = batch_format(batch)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise BatchLayoutError(f"batch_format function must return a pair (x, y), got {type(out).__name__}")
        return out[0], out[1]
    if batch_format is not None:
        if not (isinstance(batch_format, (tuple, list)) and len(batch_format) == 2):
            raise BatchLayoutError(
                f"batch_format must be None, a pair (x_key, y_key) or a function batch -> (x, y); got {batch_format!r}"
            )
        x_key, y_key = batch_format
        try:
            return batch[x_key], batch[y_key]
        except (KeyError, IndexError, TypeError) as exc:
            keys = list(batch.keys()) if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
            raise BatchLayoutError(f"batch_format {tuple(batch_format)!r} does not match the batch ({keys}): {exc}") from exc
    if isinstance(batch, (tuple, list)):
        if len(batch) >= 2:
            return batch[0], batch[1]
        raise BatchLayoutError(
            f"a batch {type(batch).__name__} of length {len(batch)} has no targets; expected (x, y, ...). "
            "Pass batch_format= a function batch -> (x, y)"
        )
    if isinstance(batch, Mapping):
        for x_key, y_key in _DICT_KEY_PAIRS:
            if x_key in batch and y_key in batch:
                return batch[x_key], batch[y_key]
        raise BatchLayoutError(
            f"cannot find inputs and targets in a batch dict with keys {sorted(map(str, batch.keys()))}; pass "
            "batch_format=('<input key>', '<target key>') or a function batch -> (x, y)"
        )
    raise BatchLayoutError(
        f"unknown batch layout: a {type(batch).__name__}; expected a tuple (x, y, ...) or a dict. Pass "
        "batch_format= a function batch -> (x, y)"
    )


def batch_layout(batch: Any, batch_format: BatchFormat, n: int) -> Tuple[Optional[Tuple[Any, ...]], Dict[Any, torch.Tensor]]:
    """How to rebuild a batch of the user's layout from (x, y) and the other per-example
    tensors of the batch (``extras``, e.g. an ``attention_mask``): ``("dict", x_key, y_key)``
    or ``("tuple", length)``; None when it cannot be rebuilt (a ``batch_format`` function,
    or items that are not per-example tensors)."""
    def per_example(v: Any) -> bool:
        return isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n

    if callable(batch_format):
        return None, {}
    if isinstance(batch, Mapping):
        keys = tuple(batch_format) if batch_format is not None else next(
            ((a, b) for a, b in _DICT_KEY_PAIRS if a in batch and b in batch), None)
        if keys is None:
            return None, {}
        extras = {k: v for k, v in batch.items() if k not in keys and per_example(v)}
        if len(extras) + 2 != len(batch):
            return None, {}
        return ("dict", *keys), extras
    if isinstance(batch, (tuple, list)) and batch_format is None:
        extras = {i: v for i, v in enumerate(batch) if i >= 2}
        if not all(per_example(v) for v in extras.values()):
            return None, {}
        return ("tuple", len(batch)), extras
    return None, {}


@dataclass
class ProbeSet:
    """A fixed set of examples: inputs ``x``, targets ``y`` and their dataset indices.

    ``extras`` holds the batch's other per-example tensors (an ``attention_mask``, an index)
    and ``layout`` how the user's batches hold them (see :meth:`user_batch`)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    index: np.ndarray
    source: str = "tensors"
    meta: Dict[str, Any] = field(default_factory=dict)
    extras: Dict[Any, torch.Tensor] = field(default_factory=dict)
    layout: Optional[Tuple[Any, ...]] = None

    def user_batch(self, rows: slice) -> Any:
        """Rows of the probe as a batch of the user's layout (a dict with its keys, a tuple
        with its items), for a ``training_step``; ``(x, y)`` when the layout is unknown."""
        x, y = self.x[rows], self.y[rows]
        extras = {k: v[rows] for k, v in self.extras.items()}
        if self.layout is not None and self.layout[0] == "dict":
            return {self.layout[1]: x, self.layout[2]: y, **extras}
        if self.layout is not None and self.layout[0] == "tuple":
            return tuple([x, y] + [extras[i] for i in range(2, self.layout[1])])
        return (x, y)

    def __post_init__(self) -> None:
        self.index = np.asarray(self.index, dtype=np.int64)
        n = len(self.index)
        if self.x.shape[0] != n or self.y.shape[0] != n:
            raise ValueError(f"probe {self.name!r}: x has {self.x.shape[0]} rows, y {self.y.shape[0]}, index {n}")

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes for integer targets (max label + 1), else None."""
        if self.y.dtype.is_floating_point or self.y.ndim != 1 or len(self) == 0:
            return None
        return int(self.y.max().item()) + 1

    def to(self, device: Union[str, torch.device]) -> "ProbeSet":
        return ProbeSet(self.name, self.x.to(device), self.y.to(device), self.index, self.source, dict(self.meta),
                        {k: v.to(device) for k, v in self.extras.items()}, self.layout)

    def batches(self, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.x[start:start + batch_size], self.y[start:start + batch_size]

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: torch.Tensor, name: str = "probe",
                     index: Optional[Sequence[int]] = None) -> "ProbeSet":
        """A probe from given tensors; ``index`` defaults to ``0..N-1``."""
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        idx = np.arange(x.shape[0]) if index is None else np.asarray(index)
        return cls(name, x, y, idx, source="tensors")


def stratified_indices(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """``size`` distinct positions, drawn per class in proportion to class frequency.

    Each class gets ``floor(size * n_c / N)`` examples; the remaining slots go to the
    classes with the largest fractional parts (ties broken by the seeded generator).
    The result is sorted ascending.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if not 0 < size <= n:
        raise ValueError(f"probe size {size} must be between 1 and the {n} examples available")
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = size * counts / n
    alloc = np.floor(quota).astype(np.int64)
    remainder = size - int(alloc.sum())
    if remainder:
        frac = quota - alloc
        order = np.lexsort((rng.random(len(classes)), -frac))
        for c in order:
            if remainder == 0:
                break
            if alloc[c] < counts[c]:
                alloc[c] += 1
                remainder -= 1
    chosen = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        chosen.append(rng.choice(members, size=int(alloc[c]), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def random_indices(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` distinct positions out of ``n``, uniformly at random, sorted."""
    if not 0 < size <= n:
        raise ValueError(f"probe size {size} must be between 1 and the {n} examples available")
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def _default_collate(items: Sequence[Any]) -> Any:
    from torch.utils.data import default_collate

    return default_collate(list(items))


def dataset_labels(dataset: Any, batch_format: BatchFormat = None,
                   collate_fn: Optional[Callable[[Sequence[Any]], Any]] = None, chunk: int = 512) -> np.ndarray:
    """Targets of every example of a map-style dataset, cheaply where the dataset allows.

    Uses ``TensorDataset`` tensors, a ``targets``/``labels`` attribute, ``Subset``
    indirection, and otherwise reads the items (in chunks, collated).
    """
    from torch.utils.data import Subset, TensorDataset

    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset, batch_format, collate_fn, chunk)[np.asarray(dataset.indices)]
    if isinstance(dataset, TensorDataset) and batch_format is None and len(dataset.tensors) >= 2:
        return dataset.tensors[1].detach().cpu().numpy()
    if batch_format is None:
        for attr in ("targets", "labels"):
            values = getattr(dataset, attr, None)
            if values is not None and not callable(values):
                try:
                    array = np.asarray(values.cpu() if hasattr(values, "cpu") else values)
                except Exception:
                    continue
                if array.ndim >= 1 and array.shape[0] == len(dataset):
                    return array
    collate = collate_fn or _default_collate
    labels = []
    for start in range(0, len(dataset), chunk):
        items = [dataset[i] for i in range(start, min(start + chunk, len(dataset)))]
        _, y = batch_to_xy(collate(items), batch_format)
        labels.append(torch.as_tensor(y).detach().cpu().numpy())
    return np.concatenate(labels)


def draw_probe(dataset: Any, size: Optional[int] = 256, *, seed: int = 0, stratified: bool = True,
               name: str = "train", source: str = "dataset", batch_format: BatchFormat = None,
               collate_fn: Optional[Callable[[Sequence[Any]], Any]] = None,
               labels: Optional[Sequence[Any]] = None, first: bool = False) -> ProbeSet:
    """Draw a fixed probe from a map-style dataset; ``size=None`` takes every example.

    Stratified by class when targets are integer class labels (and ``stratified``),
    uniformly at random otherwise. The same ``seed`` gives the same examples.
    ``first=True`` takes the first ``size`` examples instead (Cohen et al.'s fixed set).
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"cannot draw a probe from a {type(dataset).__name__}: it needs a map-style dataset (with __len__ and "
            "__getitem__). For an iterable dataset pass the probe as tensors: ProbeSet.from_tensors(x, y)"
        )
    n = len(dataset)
    if n == 0:
        raise ValueError(f"cannot draw probe {name!r}: the {source} dataset is empty")
    size = positive_int(size, "size", "draw_probe", optional=True, hint="None takes the whole dataset")
    if size is None:
        size = n
    if size > n:
        raise ValueError(
            f"probe {name!r} asks for {size} examples but the {source} dataset has only {n}; pass size<={n} "
            "(or size=None for all of them)"
        )
    label_array = np.asarray(labels) if labels is not None else None
    if first:
        index = np.arange(size, dtype=np.int64)
    elif stratified and size < n:
        if label_array is None:
            label_array = dataset_labels(dataset, batch_format, collate_fn)
        is_class = label_array.ndim == 1 and label_array.dtype.kind in "biu"
        index = stratified_indices(label_array, size, seed) if is_class else random_indices(n, size, seed)
    else:
        index = np.arange(n, dtype=np.int64) if size == n else random_indices(n, size, seed)
    collate = collate_fn or _default_collate
    batch = collate([dataset[int(i)] for i in index])
    x, y = batch_to_xy(batch, batch_format)
    layout, extras = batch_layout(batch, batch_format, int(index.shape[0]))
    if not isinstance(x, torch.Tensor):
        raise BatchLayoutError(
            f"probe inputs must be a tensor, got {type(x).__name__}; pass batch_format= a function batch -> (x, y) "
            "returning tensors"
        )
    y = torch.as_tensor(y)
    meta = {"size": size, "seed": seed, "stratified": bool(stratified) and not first, "first": bool(first),
            "dataset_size": n}
    return ProbeSet(name, x.detach().clone(), y.detach().clone(), index, source=source, meta=meta,
                    extras={k: v.detach().clone() for k, v in extras.items()}, layout=layout)


class Probe:
    """How a monitor draws its probe set: from the Trainer's data, or from given tensors.

    ``source``: ``"train"`` (the training dataloader's dataset) or ``"val"`` (the first
    validation dataloader's). ``size=None`` takes the whole dataset. ``name`` (default
    ``"<source>_<size>"``) names ``/probe/<name>`` in the run file; monitors whose probes
    share a name share the stored probe, so they must draw the same examples.
    ``store_inputs``: keep ``x`` in the file (default: when it takes at most 16 MiB).
    ``first=True``: the first ``size`` examples of the dataset (no sampling), as in Cohen
    et al.'s sharpness set.
    The Trainer is used through its public attributes only (no Lightning import here).
    """

    def __init__(self, size: Optional[int] = 256, source: str = "train", seed: int = 0, stratified: bool = True,
                 name: Optional[str] = None, batch_format: BatchFormat = None,
                 store_inputs: Optional[bool] = None, first: bool = False):
        one_of(source, "source", ("train", "val"), "Probe", hint="for other data pass ProbeSet.from_tensors(x, y)")
        size = positive_int(size, "size", "Probe", optional=True, hint="None takes the whole dataset")
        seed = integer(seed, "seed", "Probe")
        text(name, "name", "Probe", forbid="/", optional=True)
        if batch_format is not None and not callable(batch_format) and not (
                isinstance(batch_format, (tuple, list)) and len(batch_format) == 2):
            raise ValueError(f"batch_format must be None, a pair (x_key, y_key) or a function batch -> (x, y); "
                             f"got {batch_format!r}")
        self.size = size
        self._named = name is not None  # a name given is kept by resized(); a default one follows the size
        self.source = source
        self.seed = seed
        self.stratified = stratified
        self.first = bool(first)
        self.name = name or f"{source}_{'first' if first else ''}{'all' if size is None else size}"
        self.batch_format = batch_format
        self.store_inputs = store_inputs

    def resized(self, size: Optional[int]) -> "Probe":
        """This probe setting at another size (the other settings, and a given name, kept)."""
        return Probe(size=size, source=self.source, seed=self.seed, stratified=self.stratified,
                     name=self.name if self._named else None, batch_format=self.batch_format,
                     store_inputs=self.store_inputs, first=self.first)

    def to_config(self) -> Dict[str, Any]:
        return {"size": self.size, "source": self.source, "seed": self.seed, "stratified": self.stratified,
                "first": self.first, "name": self.name, "batch_format": self.batch_format if not callable(self.batch_format)
                else getattr(self.batch_format, "__qualname__", "function")}

    def __repr__(self) -> str:
        return f"Probe(size={self.size}, source={self.source!r}, seed={self.seed}, name={self.name!r})"

    def draw(self, trainer: Any) -> ProbeSet:
        """Draw the probe from ``trainer``'s dataloaders (call from on_train_start or later)."""
        loader = _trainer_dataloader(trainer, self.source)
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise TypeError(
                f"the {self.source} dataloader ({type(loader).__name__}) has no .dataset to draw a probe from; "
                "pass the examples as tensors: ProbeSet.from_tensors(x, y)"
            )
        size = self.size
        if self.first and size is not None and hasattr(dataset, "__len__"):
            size = min(size, len(dataset))  # "the first n": fewer when the dataset is smaller
        return draw_probe(dataset, size, seed=self.seed, stratified=self.stratified, name=self.name,
                          source=self.source, batch_format=self.batch_format,
                          collate_fn=getattr(loader, "collate_fn", None), first=self.first)


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _trainer_dataloader(trainer: Any, source: str) -> Any:
    if source == "train":
        loader = _first_loader(getattr(trainer, "train_dataloader", None))
        if loader is None:
            raise RuntimeError("the Trainer has no training dataloader yet: draw the probe from on_train_start or later")
        return loader
    loader = _first_loader(getattr(trainer, "val_dataloaders", None))
    if loader is None:
        for owner in (getattr(trainer, "datamodule", None), getattr(trainer, "lightning_module", None)):
            method = getattr(owner, "val_dataloader", None)
            if method is None:
                continue
            try:
                loader = _first_loader(method())
            except (NotImplementedError, Exception) as exc:  # Lightning's default raises
                if type(exc).__name__ not in ("MisconfigurationException", "NotImplementedError"):
                    raise
                loader = None
            if loader is not None:
                break
    if loader is None:
        raise ValueError("Probe(source='val') needs a validation dataloader, and this run has none; use "
                         "source='train', or pass the examples as tensors: ProbeSet.from_tensors(x, y)")
    return loader
