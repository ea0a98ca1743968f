"""ParentStateMonitor: save parent states during training, for spawning children later.

At each scheduled step (log-spaced by default: 0, 1, 2, 3, 6, 10, 18, 32, 56, 100, ...) the
monitor saves a Lightning checkpoint of the training (model, optimisers, LR schedulers,
loops, datamodule and callback states) with what a child needs to continue exactly where
the parent was (:mod:`lightning_ntk.parent_states`): the position in the data (epoch, next
batch) and the global RNG states from which that epoch's data order was drawn and with
which the next batch would start. States go to ``<run file>.parents/step_<step>.ckpt``,
written atomically, and one row per state to the run file's ``/parents`` table.

The state of step t is taken after step t's optimizer update (at the batch end; at the first
batch start for step 0) and written when the next batch starts, once the RNG state that
batch starts from is known (so a state never holds a partial RNG record). Replay is exact
on CPU when nothing draws random numbers between those two points other than Lightning's
own validation, and the data loading draws none in the main process (see docs/landscape.md).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..parent_states import PARENT_FORMAT, PARENT_KEY, capture_rng, parent_dir, state_files, state_path, write_atomic
from ..schedule import LogSpacedSteps, Schedule, ScheduleLike
from ..store import Field, wall_time
from ._base import Monitor


class ParentStateMonitor(Monitor):
    """Saves parent states (checkpoints with data position and RNG states) at chosen steps.

    Args:
        path: the run file; the states go to the folder ``<path>.parents`` beside it (with a
            ``name``: ``<path>.parents_<name>``) and one row per state to ``/parents``.
        schedule: the steps to save at (default :class:`~lightning_ntk.LogSpacedSteps` with
            4 per decade: 0, 1, 2, 3, 6, 10, 18, 32, 56, 100, 178, ...; the final step too).
        name, overwrite, on_error, fsync: as for every monitor. ``overwrite=True`` also
            removes the states of an earlier run in the folder.

    Only single-process trainings: children are trained on one process, and a parent
    trained under DDP could not be continued the same way there.
    """

    quantity = "parents"
    needs_probe = False
    default_probe_size = None
    smaller_rows = ""
    config_exclude = ("probe", "forward_fn", "batch_size", "budget", "log_scalars", "max_row_mb",
                      "collective_timeout")
    runtime = ("_pending", "_fit_rng", "_epoch_rng", "_iter_epoch", "_last_batch_idx", "_notes")

    def __init__(self, path: "str | os.PathLike[str]", *, schedule: ScheduleLike = None, name: Optional[str] = None,
                 overwrite: bool = False, on_error: str = "warn", fsync: bool = True):
        super().__init__(path, name=name, schedule=schedule, overwrite=overwrite, on_error=on_error, fsync=fsync,
                         budget=False, log_scalars=False)
        self.directory = parent_dir(self.path) + ("" if self.name is None else f"_{self.name}")

    def _reset_runtime(self) -> None:
        super()._reset_runtime()
        self._pending: Optional[Dict[str, Any]] = None
        self._fit_rng: Optional[Dict[str, Any]] = None
        self._epoch_rng: Optional[Dict[str, Any]] = None
        self._iter_epoch: Optional[int] = None
        self._last_batch_idx = -1
        self._notes: List[str] = []

    def default_schedule(self) -> Schedule:
        return LogSpacedSteps(per_decade=4)

    def fields(self, probe: Any, pl_module: nn.Module) -> List[Field]:
        return [Field("next_batch", (), "int64", attrs={"description": "index in its epoch of the batch the "
                                                                         "training would take next"}),
                Field("bytes", (), "int64", attrs={"description": "size of the state file"}),
                Field("replayable", (), "bool", attrs={"description": "a child can repeat the parent's own "
                                                                      "continuation (else the file says why not)"})]

    def coords(self, probe: Any) -> Dict[str, Any]:
        return {}

    def config_extra(self) -> Dict[str, Any]:
        return {"directory": self.directory}

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if str(stage) not in ("fit", "TrainerFn.FITTING") or self._session is None:
            return
        world = int(getattr(trainer, "world_size", 1) or 1)
        error = None if world == 1 else ValueError(
            f"ParentStateMonitor: the Trainer runs {world} processes; children are trained on one process, where a "
            "parent trained under DDP could not be continued the same way (per-rank data shards and RNG "
            "streams). Train the parent with devices=1")
        self._session.settle(self, 0, error)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # The first epoch's data iterator is created after this hook (FitLoop.setup_data):
        # its order is drawn from the RNG state here.
        self._fit_rng = capture_rng()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        if self.disabled:
            return
        resumed = getattr(trainer, "ckpt_path", None) is not None
        self._epoch_rng = None if resumed else self._fit_rng
        self._iter_epoch = int(trainer.current_epoch)
        self._notes = _replay_notes(trainer)
        error: Optional[BaseException] = None
        if self._writer:
            try:
                self._prepare_directory(int(trainer.global_step), resumed)
            except Exception as exc:  # noqa: BLE001 - the session's error policy decides
                error = exc
        self._session.settle(self, int(trainer.global_step), error)

    def _prepare_directory(self, step: int, resumed: bool) -> None:
        os.makedirs(self.directory, exist_ok=True)
        files = state_files(self.directory)
        if resumed:  # states past the checkpoint belong to the continuation that was abandoned
            stale = [p for s, p in files.items() if s > step]
        elif files and not self.overwrite:
            raise FileExistsError(f"ParentStateMonitor: {self.directory} already holds {len(files)} parent state(s) "
                                  "of another run; pass overwrite=True to replace them, or choose another path=")
        else:
            stale = list(files.values())
        for file in stale:
            os.remove(file)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        epoch = int(trainer.current_epoch)
        if epoch != self._iter_epoch:  # this epoch's iterator is created after the hook
            self._epoch_rng, self._iter_epoch = capture_rng(), epoch

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)  # the step-0 state, if due
        if self._pending is not None:
            note = "" if self._epoch_rng is not None else (
                "the fit resumed from a checkpoint in this epoch: its data order was drawn before the fit")
            self._finalize(batch_idx, capture_rng(), "; ".join(n for n in [note, *self._notes] if n))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._last_batch_idx = int(batch_idx)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.schedule.final and trainer.global_step != self._last_step:
            self._snapshot(trainer, pl_module, epoch=float(trainer.current_epoch), forced=True)
        if self._pending is not None:
            batches = trainer.num_training_batches
            following = self._last_batch_idx + 1
            if isinstance(batches, int) and following >= batches:
                following = 0
            self._finalize(following, None, "the final state: no batch followed it")
        self._flush_all()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._pending = None
        super().on_exception(trainer, pl_module, exception)

    # ---------------------------------------------------------------- states
    def _snapshot(self, trainer: Any, pl_module: nn.Module, epoch: float, forced: bool = False) -> None:
        step = int(trainer.global_step)
        if self.disabled:
            return
        started = self.clock()
        error: Optional[BaseException] = None
        try:
            if self._writer:
                self._capture(trainer, pl_module, step, epoch, started)
        except Exception as exc:  # noqa: BLE001 - the session's error policy decides
            error = exc
        if self._failed(step, error):
            return
        self._last_step = step

    def _capture(self, trainer: Any, pl_module: nn.Module, step: int, epoch: float, started: float) -> None:
        """The training's checkpoint now, as ``trainer.save_checkpoint`` writes it (a scratch
        file read back: a copy the next update cannot reach)."""
        scratch = os.path.join(self.directory, f".capture.{os.getpid()}.ckpt")
        try:
            trainer.save_checkpoint(scratch, weights_only=False)
            checkpoint = torch.load(scratch, weights_only=False)
        finally:
            if os.path.exists(scratch):
                os.remove(scratch)
        ours = {cb.state_key for cb in trainer.callbacks if isinstance(cb, Monitor)}
        if isinstance(checkpoint.get("callbacks"), dict):  # where the monitors' tables stand: nothing to continue
            checkpoint["callbacks"] = {k: v for k, v in checkpoint["callbacks"].items() if k not in ours}
        datamodule = getattr(trainer, "datamodule", None)
        self._pending = {
            "checkpoint": checkpoint, "step": step, "epoch": float(epoch), "started": started,
            "batches_per_epoch": trainer.num_training_batches if isinstance(trainer.num_training_batches, int) else -1,
            "module": class_path(type(pl_module)),
            "datamodule": None if datamodule is None else class_path(type(datamodule)),
            "trainer": trainer_settings(trainer)}

    def _finalize(self, next_batch: int, next_rng: Optional[Dict[str, Any]], note: str) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self.disabled:
            return
        step = pending["step"]
        error: Optional[BaseException] = None
        try:
            checkpoint = pending.pop("checkpoint")
            checkpoint[PARENT_KEY] = {
                "format": PARENT_FORMAT, "step": step, "epoch": pending["epoch"], "next_batch": int(next_batch),
                "batches_per_epoch": pending["batches_per_epoch"],
                "epoch_rng": self._epoch_rng if next_rng is not None else None, "next_batch_rng": next_rng,
                "replayable": note, "module": pending["module"], "datamodule": pending["datamodule"],
                "trainer": pending["trainer"], "run": os.path.abspath(self.path)}
            size = write_atomic(state_path(self.directory, step), checkpoint, fsync=self.fsync)
            seconds = self.clock() - pending["started"]
            if self.table is not None:
                self.table.append(step=step, epoch=pending["epoch"], wall_time=wall_time(), snapshot_seconds=seconds,
                                  next_batch=int(next_batch), bytes=size, replayable=not note)
                self._store.flush_async()
            self.timings["snapshots"] += 1
            self.timings["snapshot_s"] += seconds
        except Exception as exc:  # noqa: BLE001 - the session's error policy decides
            error = exc
        self._failed(step, error)


def class_path(cls: type) -> str:
    """``"package.module:QualName"`` of a class (importable unless defined in a function)."""
    return f"{cls.__module__}:{cls.__qualname__}"


#: Trainer settings that shape a training step, recorded so the CLI can train children alike.
_TRAINER_SETTINGS = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "precision",
                     "limit_train_batches", "limit_val_batches", "val_check_interval", "check_val_every_n_epoch",
                     "num_sanity_val_steps", "reload_dataloaders_every_n_epochs")


def trainer_settings(trainer: Any) -> Dict[str, Any]:
    """The Trainer's settings that shape training (:data:`_TRAINER_SETTINGS`), its
    accelerator and whether deterministic algorithms are on, as plain values."""
    import torch

    out: Dict[str, Any] = {}
    for name in _TRAINER_SETTINGS:
        value = getattr(trainer, name, None)
        if value is not None and not isinstance(value, (bool, int, float, str)):
            value = getattr(value, "value", str(value))  # enums (gradient_clip_algorithm)
        out[name] = value
    accelerator = type(getattr(trainer, "accelerator", None)).__name__.lower()
    out["accelerator"] = {"cpuaccelerator": "cpu", "cudaaccelerator": "gpu", "mpsaccelerator": "mps"}.get(
        accelerator, "auto")
    out["deterministic"] = bool(torch.are_deterministic_algorithms_enabled())
    return out


def _replay_notes(trainer: Any) -> List[str]:
    """Why this training's continuation cannot be replayed by a child, if it cannot."""
    notes = []
    if int(getattr(trainer, "reload_dataloaders_every_n_epochs", 0) or 0) > 0:
        notes.append("reload_dataloaders_every_n_epochs > 0: a later epoch's loader is made before its RNG state is "
                     "recorded")
    loaders = getattr(trainer, "train_dataloader", None)
    loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    for loader in loaders:
        samplers = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
        if getattr(loader, "generator", None) is not None or any(
                getattr(s, "generator", None) is not None for s in samplers):
            notes.append("the training loader draws its order from a generator of its own (generator=), not the "
                         "global RNG, whose state at each epoch start is not recorded")
            break
        if any(callable(getattr(s, "state_dict", None)) for s in [*samplers, getattr(loader, "batch_sampler", None)]
               if s is not None):
            notes.append(f"the training sampler ({type(samplers[0]).__name__}) keeps a state of its own (state_dict), "
                         "which a child does not restore: its position is set by skipping batches")
            break
    return notes
