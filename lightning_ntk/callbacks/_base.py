"""The base monitor: schedule + probe + store + mode hygiene, shared by every quantity.

A quantity's monitor subclasses :class:`Monitor` and supplies

* ``quantity`` - the run-file group (``ntk``, ``sharpness``, ...);
* :meth:`Monitor.fields` - the table's row schema, given the probe and the model;
* :meth:`Monitor.measure` - one snapshot: the row (arrays) and the scalars to log;
* optionally :meth:`Monitor.config` and :meth:`Monitor.extra_state`.

The base does the rest: validates arguments in ``__init__``, opens the shared run file in
``on_fit_start`` (rank 0 only), draws the probe and declares the table in
``on_train_start``, takes the step-0 snapshot, switches the file to SWMR at the first
batch, runs the schedule, wraps every measurement in :func:`measurement_mode` (eval mode,
RNG forked, ``.grad`` untouched, modes restored), flushes after each snapshot, logs scalars
to the Trainer's loggers, and keeps what resume needs in ``state_dict``.
"""
from __future__ import annotations

import logging
import os
import weakref
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .._hygiene import measurement_mode, module_device
from ..budget import SKIP_BUDGET, SKIP_REASONS, BudgetLike, Governor, as_governor
from ..probe import Probe, ProbeSet
from ..schedule import LogSpacedSteps, Schedule, ScheduleLike, as_schedule
from ..store import Field, RunStore, Table, wall_time
from ..store._writer import FixedTable
from ._distributed import Collectives
from ._lightning import dispatch_skips_non_callables, loggers_of, skip_unimplemented_batch_hooks

log = logging.getLogger(__name__)

ProbeLike = Union[Probe, ProbeSet, Tuple[torch.Tensor, torch.Tensor], None]
ForwardFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]

#: Budget of the governor that monitors share by default (``budget=None``): together, the
#: monitors of one Trainer spend at most this fraction of training time.
DEFAULT_BUDGET = 0.05
_trainer_governors: "weakref.WeakKeyDictionary[Any, Governor]" = weakref.WeakKeyDictionary()


_default_budget: Optional[float] = DEFAULT_BUDGET


def set_default_budget(budget: Optional[float]) -> Optional[float]:
    """Set the shared budget of monitors created with ``budget=None`` (None or 0: no
    governor by default). Returns the previous value."""
    global _default_budget
    if budget:
        Governor(budget)  # validates
    previous, _default_budget = _default_budget, (float(budget) if budget else None)
    return previous


def shared_governor(trainer: Any) -> Optional[Governor]:
    """The default governor of ``trainer``'s fit, shared by its monitors (see
    :func:`set_default_budget`; 5% unless changed)."""
    if _default_budget is None:
        return None
    governor = _trainer_governors.get(trainer)
    if governor is None or governor.budget != _default_budget:
        governor = _trainer_governors[trainer] = Governor(_default_budget)
    return governor


#: The monitors of a Trainer's fit whose on_train_batch_end is Monitor's own, in callback
#: order: the first (the leader) runs the batch-end check of all of them (one Lightning
#: dispatch per batch instead of one per monitor). Reset at each fit's setup.
_batch_end_groups: "weakref.WeakKeyDictionary[Any, List[Monitor]]" = weakref.WeakKeyDictionary()

#: Probe inputs are stored in the file by default when they take at most this many bytes.
_STORE_INPUTS_MAX_BYTES = 16 * 1024 * 1024


def _default_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


@dataclass
class TableSpec:
    """A table a monitor writes: an append table, or a fixed one when ``n_rows`` is set."""

    group: str
    fields: List[Field]
    key: str = "step"
    row_dim: Optional[str] = None
    coords: Dict[str, Any] = field(default_factory=dict)
    attrs: Dict[str, Any] = field(default_factory=dict)
    n_rows: Optional[int] = None


def model_summary(module: nn.Module) -> Dict[str, Any]:
    """Class, parameter counts and top-level layers of a model (stored as ``/`` attr ``model``)."""
    params = {id(p): p for p in module.parameters()}.values()
    layers = []
    for name, child in module.named_children():
        n = sum(p.numel() for p in child.parameters())
        layers.append([name, type(child).__name__, int(n)])
    return {
        "class": type(module).__qualname__,
        "module": type(module).__module__,
        "parameters": int(sum(p.numel() for p in params)),
        "trainable": int(sum(p.numel() for p in params if p.requires_grad)),
        "layers": layers[:200],
    }


class Monitor:
    """Base of lightning_ntk's monitors (see the module docstring).

    Args:
        path: the run file (HDF5). Monitors given the same path share one file.
        name: distinguishes two monitors of one kind (group ``<quantity>_<name>``,
            distinct ``state_key``).
        schedule: when to snapshot: a :class:`~lightning_ntk.schedule.Schedule`, an int
            (every n steps) or a list of steps. Default: the monitor's own.
        probe: a :class:`~lightning_ntk.probe.Probe` (drawn from the Trainer's data),
            a :class:`~lightning_ntk.probe.ProbeSet`, or a pair of tensors ``(x, y)``.
        overwrite: replace an existing file at ``path`` (default: refuse, unless resuming).
        on_error: ``"raise"``, or ``"warn"``: a failing measurement warns once, disables
            this monitor and lets training go on.
        forward_fn: ``forward_fn(pl_module, x) -> outputs``; default ``pl_module(x)``.
        batch_size: examples per forward pass on the probe.
        log_scalars: send scalars to the Trainer's loggers.
        fsync: force each snapshot to disk (``os.fsync``), not just to the OS cache.
        collective_timeout: under distributed training, seconds a monitor waits for the
            other ranks at its own collectives before failing (never a hang).
        budget: wall-clock budget of the snapshots, as a fraction of training time
            (:mod:`lightning_ntk.budget`). ``None`` (default): one 5% budget shared by
            all monitors of the Trainer; a float: this monitor's own; a
            :class:`~lightning_ntk.budget.Governor`: shared with the monitors given the
            same one; ``False``: every scheduled snapshot is taken. The first and the
            final snapshots are always taken; skipped ones are recorded in
            ``/skipped/<group>`` with the reason.
    """

    quantity: str = "monitor"
    needs_probe: bool = True
    default_probe_size: Optional[int] = 256

    def __init__(self, path: Union[str, "os.PathLike[str]"], *, name: Optional[str] = None,
                 schedule: ScheduleLike = None, probe: ProbeLike = None, overwrite: bool = False,
                 on_error: str = "warn", forward_fn: Optional[ForwardFn] = None, batch_size: int = 256,
                 log_scalars: bool = True, fsync: bool = True, budget: BudgetLike = None,
                 collective_timeout: float = 300.0):
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise TypeError(f"{type(self).__name__}: path must be a file path (str or os.PathLike), got {path!r}")
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise ValueError(f"{type(self).__name__}: name must be a non-empty string without '/', got {name!r}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"{type(self).__name__}: on_error must be 'warn' or 'raise', got {on_error!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be a positive integer, got {batch_size!r}")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"{type(self).__name__}: forward_fn must be callable (pl_module, x) -> outputs")
        self.path = os.fspath(path)
        self.name = name
        self.schedule: Schedule = as_schedule(schedule, self.default_schedule())
        self.probe = self._as_probe(probe) if self.needs_probe else None
        self.overwrite = bool(overwrite)
        self.on_error = on_error
        self.forward_fn: ForwardFn = forward_fn or _default_forward
        self.batch_size = batch_size
        self.log_scalars = bool(log_scalars)
        self.fsync = bool(fsync)
        if budget is not None and budget is not False and not isinstance(budget, Governor):
            as_governor(budget)  # validates: a clear error now rather than at train start
        self.budget = budget
        self._governor: Optional[Governor] = None
        if isinstance(collective_timeout, bool) or not isinstance(collective_timeout, (int, float)) or not collective_timeout > 0:
            raise ValueError(f"{type(self).__name__}: collective_timeout must be positive seconds, got {collective_timeout!r}")
        self.collective_timeout = float(collective_timeout)
        self._dist = Collectives(self.collective_timeout)
        # Run-time state (not pickled into spawn workers: see __getstate__).
        self._store: Optional[RunStore] = None
        self._tables: Dict[str, Union[Table, FixedTable]] = {}
        self._specs: List[TableSpec] = []
        self._probe_set: Optional[ProbeSet] = None
        self._probe_on_device: Optional[ProbeSet] = None
        self._writer = False
        self._resuming = False
        self._disabled = False
        self._rows: Dict[str, int] = {}
        self._last_step: Optional[int] = None
        # No snapshot can be due at a step before this one (Schedule.next_due_after): the
        # per-batch check is one comparison between due steps.
        self._next_due = 0
        self._group_next_due = 0  # the group leader's: the smallest _next_due of its group
        # The epoch whose last batch has ended but whose on_train_epoch_end has not run yet: a
        # checkpoint saved in that window resumes into the next epoch without that hook.
        self._pending_epoch_end: Optional[int] = None
        #: Snapshots taken, their total seconds (measurement and hand-over to the store) and
        #: the seconds of that spent handing rows to the store (benchmarks read these).
        self.timings: Dict[str, float] = {"snapshots": 0, "snapshot_s": 0.0, "store_s": 0.0}
        self.snapshot_step: Optional[int] = None
        self.snapshot_epoch: Optional[float] = None
        self._loaded_state: Optional[Dict[str, Any]] = None
        self._batch_end_group: Optional[List["Monitor"]] = None  # set on the leader (see _join_batch_end_group)
        skip_unimplemented_batch_hooks(self)

    # ---------------------------------------------------------------- to override
    def default_schedule(self) -> Schedule:
        return LogSpacedSteps()

    def fields(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[Field]:
        """Row schema of this monitor's snapshot table, besides ``step``, ``epoch``, ``wall_time``."""
        raise NotImplementedError

    def table_specs(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[TableSpec]:
        """Every table this monitor writes. Default: one snapshot table at :attr:`group`."""
        fields = [Field("step", (), "int64"), Field("epoch", (), "float64"), Field("wall_time", (), "float64"),
                  *self.fields(probe, pl_module)]
        return [TableSpec(self.group, fields, coords=self.coords(probe),
                          attrs={"probe": probe.name if probe is not None else ""})]

    def coords(self, probe: Optional[ProbeSet]) -> Dict[str, Any]:
        """Coordinate values of per-row axes (by axis name)."""
        coords: Dict[str, Any] = {}
        if probe is not None:
            coords["probe_example"] = probe.index
        return coords

    def measure(self, trainer: Any, pl_module: nn.Module, probe: Optional[ProbeSet]) -> Tuple[Dict[str, Any], Dict[str, float]]:
        """One snapshot, under measurement mode: (row for the table, scalars to log)."""
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """Settings recorded in the run file's ``config`` attribute."""
        budget = self.budget
        return {
            "class": type(self).__name__, "group": self.group, "schedule": self.schedule.to_config(),
            "budget": _default_budget if budget is None else (budget.budget if isinstance(budget, Governor) else budget),
            "probe": self.probe.to_config() if isinstance(self.probe, Probe) else
            ({"name": self.probe.name, "size": len(self.probe), "source": self.probe.source} if self.probe else None),
            "batch_size": self.batch_size, "model_mode": "eval",
        }

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- helpers
    def _as_probe(self, probe: ProbeLike) -> Union[Probe, ProbeSet]:
        if probe is None:
            return Probe(size=self.default_probe_size)
        if isinstance(probe, (Probe, ProbeSet)):
            return probe
        if isinstance(probe, (tuple, list)) and len(probe) == 2:
            return ProbeSet.from_tensors(probe[0], probe[1], name="given")
        raise TypeError(
            f"{type(self).__name__}: probe must be a lightning_ntk.Probe, a ProbeSet or a pair of tensors (x, y); "
            f"got {type(probe).__name__}"
        )

    @property
    def group(self) -> str:
        """The run-file group of this monitor's table."""
        return self.quantity if self.name is None else f"{self.quantity}_{self.name}"

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}[{self.group}]"

    @property
    def table(self) -> Optional[Table]:
        """The snapshot table (rank 0, during training)."""
        table = self._tables.get(self.group)
        return table if isinstance(table, Table) else None

    @property
    def probe_set(self) -> Optional[ProbeSet]:
        """The drawn probe (available from ``on_train_start``)."""
        return self._probe_set

    def _probe_for(self, pl_module: nn.Module) -> Optional[ProbeSet]:
        if self._probe_set is None:
            return None
        device = module_device(pl_module)
        if self._probe_on_device is None or self._probe_on_device.x.device != device:
            self._probe_on_device = self._probe_set.to(device)
        return self._probe_on_device

    def forward(self, pl_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's outputs on ``x`` (in chunks of ``batch_size``)."""
        outs = [self.forward_fn(pl_module, x[i:i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_store", "_probe_on_device"):
            state[key] = None
        state["_dist"] = Collectives(self.collective_timeout)
        state["_tables"] = {}
        state["_batch_end_group"] = None
        for hook in ("on_train_batch_start", "on_train_batch_end"):
            state.pop(hook, None)
        return state

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if str(stage) not in ("fit", "TrainerFn.FITTING"):
            return
        _batch_end_groups[trainer] = []  # every monitor's setup runs before any on_train_start
        self._writer = bool(trainer.is_global_zero)
        self._dist.setup()  # every rank, same order: creates this monitor's process group
        if self._writer:  # fail fast on an unusable location; existence is checked once resume is known
            RunStore.check_path(self.path, overwrite=self.overwrite, resume=True, check_exists=False)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._disabled = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Every strategy has restored checkpoints (and called load_state_dict) by now.
        self._restore_batch_hooks()
        self._next_due = 0
        self._join_batch_end_group(trainer)
        self._resuming = self._loaded_state is not None
        self._governor = shared_governor(trainer) if self.budget is None else as_governor(self.budget)
        if self._governor is not None:
            self._governor.start()
            self._governor.expect_final(self.group, self.schedule.final)
        if self.needs_probe:
            probe = self.probe.draw(trainer) if isinstance(self.probe, Probe) else self.probe
            loaded = (self._loaded_state or {}).get("probe_index")
            if loaded is not None and not np.array_equal(np.asarray(loaded), probe.index):
                raise RuntimeError(
                    f"{type(self).__name__}: the probe drawn on resume differs from the checkpoint's (the dataset or "
                    "the probe settings changed); resume with the same data and settings"
                )
            self._probe_set = probe
        # Every rank works out the schema (monitors learn their shapes here); rank 0 declares it.
        self._specs = self._schema(pl_module)
        if self._writer:
            self._store = RunStore.acquire(self.path, owner=self.state_key, overwrite=self.overwrite,
                                           resume=self._resuming, fsync=self.fsync)
            try:
                self._store.set_config(self.state_key, self.config())
                self._store.set_model_summary(model_summary(pl_module))
                self._declare(pl_module)
            except Exception:
                self._release()
                raise
        if self._last_step is None and self.schedule.due_at_step(trainer.global_step):
            self._snapshot(trainer, pl_module, epoch=float(trainer.current_epoch))
        elif self._resuming and self._pending_epoch_end is not None:
            # Resumed from a checkpoint taken after an epoch's last batch but before its end-of-epoch
            # hook: Lightning goes on with the next epoch, so take that epoch-end snapshot now (the
            # model is exactly as it was at that epoch's end).
            epoch, self._pending_epoch_end = self._pending_epoch_end, None
            if trainer.global_step != self._last_step and self.schedule.due_at_epoch_end(epoch):
                self._snapshot(trainer, pl_module, epoch=float(epoch + 1))

    def _write_probe(self, probe: ProbeSet, store_inputs: Optional[bool] = None) -> None:
        """Write ``probe`` as ``/probe/<name>``: ``index``, ``y``, and ``x`` when ``store_inputs``
        (None: when it takes at most 16 MiB). Rank 0, before SWMR (from ``_declare``)."""
        assert self._store is not None
        group = f"probe/{probe.name}"
        dims = ("probe_example",)
        coords = {"probe_example": probe.index}
        self._store.write_static(group, "index", probe.index, dims, coords=coords)
        self._store.write_static(group, "y", probe.y.cpu().numpy(),
                                 dims + tuple(f"y_dim{i}" for i in range(1, probe.y.ndim)), coords=coords)
        nbytes = probe.x.numel() * probe.x.element_size()
        if store_inputs or (store_inputs is None and nbytes <= _STORE_INPUTS_MAX_BYTES):
            self._store.write_static(group, "x", probe.x.cpu().numpy(),
                                     dims + tuple(f"x_dim{i}" for i in range(1, probe.x.ndim)), coords=coords)

    def _schema(self, pl_module: nn.Module) -> List[TableSpec]:
        with measurement_mode(pl_module, grad=False):
            specs = self.table_specs(self._probe_set, pl_module)
        if self._governor is not None:
            specs.append(TableSpec(f"skipped/{self.group}", [
                Field("step", (), "int64"), Field("epoch"), Field("reason", (), "int8"),
                Field("expected_cost"), Field("overhead")], attrs={"reasons": list(SKIP_REASONS),
                                                                 "budget": self._governor.budget}))
        return specs

    def _declare(self, pl_module: nn.Module) -> None:
        """Rank 0: write the probe and declare :attr:`_specs` in the store."""
        assert self._store is not None
        probe = self._probe_set
        if probe is not None:
            self._write_probe(probe, self.probe.store_inputs if isinstance(self.probe, Probe) else None)
        resuming = self._loaded_state is not None
        for spec in self._specs:
            if spec.n_rows is not None:
                table: Union[Table, FixedTable] = self._store.declare_fixed_table(
                    spec.group, spec.fields, spec.n_rows, row_dim=spec.row_dim or "row", coords=spec.coords,
                    attrs=spec.attrs)
            else:
                table = self._store.declare_table(spec.group, spec.fields, key=spec.key, row_dim=spec.row_dim,
                                                  coords=spec.coords, attrs=spec.attrs,
                                                  rows=self._rows.get(spec.group, 0) if resuming else None)
            self._tables[spec.group] = table

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._store is not None and not self._store.swmr:
            self._store.start_swmr()  # every monitor has declared its tables by the first batch
        if (type(self).on_train_batch_start is Monitor.on_train_batch_start
                and dispatch_skips_non_callables()):
            self.on_train_batch_start = None  # nothing more to do per batch: out of Lightning's dispatch

    # A Lightning dispatch costs more than a monitor's batch-end check (a few µs each, per
    # monitor, per step): the monitors that keep Monitor's on_train_batch_end form one group
    # per fit, whose first member checks all of them, in callback order; the others' hooks
    # are instance attributes None, which Lightning skips.
    def _join_batch_end_group(self, trainer: Any) -> None:
        self._batch_end_group = None
        if type(self).on_train_batch_end is not Monitor.on_train_batch_end or not dispatch_skips_non_callables():
            return
        group = _batch_end_groups.get(trainer)
        if group is None:
            return
        if self not in group:  # (on_train_start again within one setup: already a member)
            group.append(self)
        group[0]._group_next_due = 0  # check every member at the next batch end
        if group[0] is self:
            self._batch_end_group = group  # the leader: checks every member at batch end
        else:
            self.on_train_batch_end = None

    def _restore_batch_hooks(self) -> None:
        """Undo the per-fit instance attributes that take hooks out of Lightning's dispatch."""
        self.__dict__.pop("on_train_batch_start", None)
        self.__dict__.pop("on_train_batch_end", None)
        self._batch_end_group = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        group = self._batch_end_group
        if group is None:
            self._batch_end(trainer, pl_module, batch_idx)
            return
        # Before every member's next due step, and away from an epoch's last batch, no
        # member has anything to do: one comparison for the whole group.
        if trainer.global_step < self._group_next_due:
            batches = trainer.num_training_batches
            if not (isinstance(batches, int) and batch_idx + 1 >= batches):
                return
        for monitor in group:
            monitor._batch_end(trainer, pl_module, batch_idx)
        self._group_next_due = min(monitor._next_due for monitor in group)

    def _batch_end(self, trainer: Any, pl_module: nn.Module, batch_idx: int) -> None:
        """After each training batch: note an epoch's last batch, take a due snapshot."""
        step = trainer.global_step
        batches = trainer.num_training_batches
        if isinstance(batches, int) and batch_idx + 1 >= batches:
            self._pending_epoch_end = int(trainer.current_epoch)
        if step < self._next_due:
            return
        # One decision per step: with gradient accumulation several batches end at one step.
        self._next_due = self.schedule.next_due_after(step)
        if step == self._last_step or not self.schedule.due_at_step(step):
            return
        self._snapshot(trainer, pl_module, epoch=_fractional_epoch(trainer, batch_idx))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._pending_epoch_end = None
        if trainer.global_step != self._last_step and self.schedule.due_at_epoch_end(trainer.current_epoch):
            self._snapshot(trainer, pl_module, epoch=float(trainer.current_epoch + 1))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.schedule.final and trainer.global_step != self._last_step:
            self._snapshot(trainer, pl_module, epoch=float(trainer.current_epoch), forced=True)
        self._flush_all()

    def _flush_all(self) -> None:
        """Wait until every row this monitor handed to the store is in the file (an error
        of the store's writer thread is raised here, or handled by ``on_error``). Every
        rank calls it together under DDP."""
        if self._disabled:
            return
        error: Optional[BaseException] = None
        try:
            if self._store is not None:
                self._store.flush()
        except Exception as exc:
            error = exc
        self._failed(int(self._last_step or 0), error)

    def _disable(self) -> None:
        """Off for the rest of the run; the governor keeps no reserve for its final snapshot,
        which will not come."""
        self._disabled = True
        if self._governor is not None:
            self._governor.expect_final(self.group, False)

    def _failed(self, step: int, error: Optional[BaseException]) -> bool:
        """Apply ``on_error`` to ``error`` (None: nothing failed on this rank); True if any
        rank failed. Under DDP every rank learns whether any failed, so all raise or all
        disable together."""
        error = self._dist.agree_on_error(error, f"{type(self).__name__} ({self.group})")
        if error is None:
            return False
        exc = error
        if self._store is not None:
            self._store.record_error(step, self.group, f"{type(exc).__name__}: {exc}")
        if self.on_error == "raise":
            raise exc
        self._disable()
        warnings.warn(
            f"{type(self).__name__} ({self.group}) failed at step {step} and is disabled for the rest of this "
            f"run: {type(exc).__name__}: {exc}. Pass on_error='raise' to stop training instead.",
            RuntimeWarning, stacklevel=3,
        )
        return True

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        self._restore_batch_hooks()
        if self._store is not None:
            store, self._store = self._store, None
            store.release(self.state_key)
        self._tables = {}

    def state_dict(self) -> Dict[str, Any]:
        if self._store is not None:
            self._store.flush()
            self._rows = {g: t.n_committed for g, t in self._tables.items() if isinstance(t, Table)}
        return {
            "rows": dict(self._rows), "last_step": self._last_step, "group": self.group,
            "pending_epoch_end": self._pending_epoch_end,
            "probe_index": None if self._probe_set is None else self._probe_set.index.tolist(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict)
        rows = state_dict.get("rows", {})
        self._rows = {self.group: int(rows)} if isinstance(rows, int) else {str(k): int(v) for k, v in rows.items()}
        self._last_step = state_dict.get("last_step")
        self._pending_epoch_end = state_dict.get("pending_epoch_end")
        self.load_extra_state(state_dict.get("extra", {}))

    # ---------------------------------------------------------------- snapshot
    def _allowed(self, trainer: Any, step: int, epoch: float, forced: bool) -> bool:
        """The governor's decision, taken on rank 0 and broadcast (ranks must agree)."""
        governor = self._governor
        if governor is None:
            return True
        allowed = bool(self._dist.broadcast_object(governor.allow(self.group, forced=forced or self._last_step is None)))
        if not allowed:
            table = self._tables.get(f"skipped/{self.group}")
            if self._writer and isinstance(table, Table):
                table.append(step=step, epoch=epoch, reason=SKIP_BUDGET,
                             expected_cost=governor.expected_cost(self.group), overhead=governor.overhead())
        return allowed

    def _snapshot(self, trainer: Any, pl_module: nn.Module, epoch: float, forced: bool = False) -> None:
        if self._disabled:
            return
        step = int(trainer.global_step)
        if not self._allowed(trainer, step, epoch, forced):
            return
        # Visible to measure(): the step and fractional epoch of the snapshot being taken.
        self.snapshot_step, self.snapshot_epoch = step, float(epoch)
        clock = self._governor.clock if self._governor is not None else time.perf_counter
        started = clock()
        error: Optional[BaseException] = None
        try:
            with measurement_mode(pl_module):
                row, scalars = self.measure(trainer, pl_module, self._probe_for(pl_module))
            table = self.table
            if self._writer and table is not None:
                measured = clock()
                table.append(dict(row, step=step, epoch=epoch, wall_time=wall_time()))
                # The writer thread writes it; an error of a previous write surfaces here.
                self._store.flush_async()
                self.timings["store_s"] += clock() - measured
        except Exception as exc:
            error = exc
        if self._failed(step, error):
            return
        self._last_step = step
        seconds = clock() - started
        self.timings["snapshots"] += 1
        self.timings["snapshot_s"] += seconds
        if self._governor is not None:
            self._governor.record(self.group, seconds)
        log.debug("%s snapshot at step %d took %.3fs", self.group, step, seconds)
        if self.log_scalars and scalars:
            self._log(trainer, scalars, step)

    def _log(self, trainer: Any, scalars: Mapping[str, float], step: int) -> None:
        metrics = {f"{self.group}/{k}": float(v) for k, v in scalars.items()}
        if self._writer:
            for logger in loggers_of(trainer):
                logger.log_metrics(metrics, step=step)
        callback_metrics = getattr(trainer, "callback_metrics", None)
        if isinstance(callback_metrics, dict):
            for key, value in metrics.items():
                callback_metrics[key] = torch.tensor(value)


def _fractional_epoch(trainer: Any, batch_idx: int) -> float:
    batches = getattr(trainer, "num_training_batches", None)
    if isinstance(batches, (int, float)) and np.isfinite(batches) and batches > 0:
        return float(trainer.current_epoch + min(batch_idx + 1, batches) / batches)
    return float(trainer.current_epoch)
