"""Parent states: a training saved at chosen steps so that children can be spawned from it.

Frankle et al. (2020, "Linear mode connectivity and the lottery ticket hypothesis") and Fort
et al. (2020, "Deep learning versus kernel learning") train a *parent* to step t, then train
k *children* from the parent's state that differ only in the randomness that follows (data
order, augmentation): the SGD noise. Their error barrier and kernel distance as functions of
t say when the network settles into one linearly connected basin.

A parent state is a Lightning checkpoint (``Trainer.fit(ckpt_path=...)`` and
``load_from_checkpoint`` read it) with one more entry, ``checkpoint["lightning_ntk_parent"]``:

=====================  ==============================================================
step, epoch            optimizer steps taken; fractional epoch
next_batch             index, within its epoch, of the batch the training would take next
epoch_rng              global RNG states (torch, CUDA, NumPy, Python) when the data
                       iterator of that batch's epoch was created: replaying them redraws
                       the epoch's order
next_batch_rng         global RNG states just before that batch (None for the final state)
replayable             "" when a child can repeat the parent's own continuation, else why not
module, datamodule     ``"package.module:QualName"`` of the LightningModule and datamodule
trainer                the Trainer settings that shape training (precision, clipping, ...)
=====================  ==============================================================

RNG states hold only tensors, numbers and strings, so ``torch.load(weights_only=True)``
accepts them. Files are written atomically (:func:`write_atomic`): a crash leaves the
previous file or the new one, never half of one.
"""
from __future__ import annotations

import io
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .store._recover import fsync_directory

#: The checkpoint entry holding what spawning needs besides Lightning's own state.
PARENT_KEY = "lightning_ntk_parent"
PARENT_FORMAT = 1
_STATE_NAME = re.compile(r"^step_(\d{9})\.ckpt$")

PathLike = Union[str, "os.PathLike[str]"]


def parent_dir(run_path: PathLike) -> str:
    """The folder of a run file's parent states: ``<run file>.parents`` beside it."""
    return os.fspath(run_path) + ".parents"


def state_path(directory: PathLike, step: int) -> str:
    """The file of the parent state at ``step`` in ``directory``."""
    return os.path.join(os.fspath(directory), f"step_{int(step):09d}.ckpt")


# ---------------------------------------------------------------------------- RNG states
def capture_rng() -> Dict[str, Any]:
    """The global RNG states (torch CPU, every initialised CUDA device, NumPy, Python's
    ``random``) as tensors, numbers and strings."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "random": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global RNGs to ``state`` (from :func:`capture_rng`)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["random"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rng(seed: int) -> None:
    """Seed every global RNG from ``seed`` (torch incl. CUDA, NumPy, Python)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def child_seed(seed: int, step: int, child: int) -> int:
    """The seed of child ``child`` spawned at ``step`` (distinct per spawn and child)."""
    return int(np.random.SeedSequence([int(seed), int(step), int(child)]).generate_state(1, np.uint32)[0])


# ---------------------------------------------------------------------------- files
def write_atomic(path: PathLike, obj: Any, *, fsync: bool = True) -> int:
    """``torch.save(obj)`` to ``path`` atomically: written to a temporary file in the same
    folder, flushed (and fsynced), then renamed over ``path``. Returns the bytes written."""
    data = obj if isinstance(obj, (bytes, bytearray)) else serialize(obj)
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if fsync:
        fsync_directory(path)  # the rename made durable
    return len(data)


def serialize(obj: Any) -> bytes:
    """``torch.save`` into bytes (the tensors' values at this moment)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def state_files(directory: PathLike) -> Dict[int, str]:
    """``{step: path}`` of the complete parent states in ``directory`` (temporary files of an
    interrupted write are not states)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return {}
    out = {}
    for name in os.listdir(directory):
        match = _STATE_NAME.match(name)
        if match:
            out[int(match.group(1))] = os.path.join(directory, name)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class ParentState:
    """One saved parent state (:func:`read_parent_states`); ``info`` is its
    ``lightning_ntk_parent`` entry (see the module docstring)."""

    path: str
    step: int
    epoch: float
    next_batch: int
    replayable: str
    info: Dict[str, Any] = field(repr=False)

    @property
    def can_replay(self) -> bool:
        """Whether a child can repeat the parent's own continuation (same data order, same RNG)."""
        return self.replayable == ""

    def checkpoint(self, map_location: Any = "cpu") -> Dict[str, Any]:
        """The whole checkpoint (model, optimizers, schedulers, loops, ...)."""
        return torch.load(self.path, map_location=map_location, weights_only=False)


def read_parent_state(path: PathLike) -> ParentState:
    """The parent state in the file ``path`` (a checkpoint written by ``ParentStateMonitor``)."""
    path = os.fspath(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - a clear message naming the file
        raise ValueError(f"cannot read parent state {path}: {type(exc).__name__}: {exc}") from exc
    info = ckpt.get(PARENT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(info, dict):
        raise ValueError(f"{path} is not a parent state: it has no {PARENT_KEY!r} entry (write parent states with "
                         "lightning_ntk.callbacks.ParentStateMonitor)")
    if int(info.get("format", 0)) > PARENT_FORMAT:
        raise ValueError(f"parent state {path} has format {info.get('format')}, newer than this lightning_ntk "
                         f"reads ({PARENT_FORMAT}); upgrade lightning_ntk")
    return ParentState(path=path, step=int(info["step"]), epoch=float(info["epoch"]),
                       next_batch=int(info["next_batch"]), replayable=str(info.get("replayable", "")), info=dict(info))


def read_parent_states(source: PathLike, steps: Optional[Sequence[int]] = None) -> List[ParentState]:
    """The parent states of a run, by step: ``source`` is the run file (its states are in
    ``<run file>.parents``) or that folder. ``steps``: only these (each must exist)."""
    source = os.fspath(source)
    directory = source if os.path.isdir(source) else parent_dir(source)
    files = state_files(directory)
    if not files:
        raise FileNotFoundError(f"no parent states in {directory}: train the parent with "
                                "lightning_ntk.callbacks.ParentStateMonitor(path=<the run file>)")
    if steps is not None:
        missing = sorted(set(int(s) for s in steps) - set(files))
        if missing:
            raise ValueError(f"no parent state at step(s) {missing} in {directory}; saved steps: {sorted(files)}")
        files = {s: files[s] for s in sorted(set(int(s) for s in steps))}
    return [read_parent_state(path) for path in files.values()]
