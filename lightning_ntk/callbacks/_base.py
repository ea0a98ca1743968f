"""The base monitor: schedule + probes + table specs + ``measure``; the rest is shared.

A quantity's monitor subclasses :class:`Monitor` and supplies

* ``quantity`` - the run-file group (``ntk``, ``sharpness``, ...);
* :meth:`Monitor.fields` (or :meth:`Monitor.table_specs`) - the table's row schema;
* :meth:`Monitor.measure` - one snapshot: the row (arrays) and the scalars to log;
* ``state`` - the attributes a checkpoint must hold (converted by the base);
* optionally :meth:`Monitor.config_extra` (settings derived at run time; the arguments of
  ``__init__`` are recorded without it).

The :class:`~._session.FitSession` of the Trainer owns what the monitors share (run files,
budget, collectives, dispatch, the error policy). The base validates the common arguments,
draws the probes and declares the tables at ``on_train_start``, takes the step-0 snapshot,
runs the schedule, wraps every measurement in :func:`measurement_mode` (eval mode, RNG
forked, ``.grad`` untouched, modes restored), logs scalars to the Trainer's loggers and
keeps what resume needs in ``state_dict``.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import _args
from .._hygiene import measurement_mode
from ..budget import BudgetLike, Governor, as_governor
from ..probe import Probe, ProbeSet
from ..schedule import LogSpacedSteps, Schedule, ScheduleLike, as_schedule
from ..sizing import CostModel, LighterWork
from ..store import Field, RunStore, Table, wall_time
from ..store._writer import FixedTable
from ..task import predictions_in
from ._declared import (
    DEFAULT_MAX_ROW_MB,
    Declared,
    ProbeLike,
    ProbeSlot,
    TableSpec,
    as_probe,
    cap_rows,
    draw_probes,
    skipped_table,
)
from ._lightning import CALLBACK_BASES, strategy_refusal
from ._session import FitSession
from ._sizing import linear_cost, size_to_budget

_log = logging.getLogger("lightning_ntk")
ForwardFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]



class MeasuredModel(nn.Module):
    """Presents ``forward_fn(module, x)`` (default ``module(x)``) as a module whose parameters
    are ``module``'s and whose output is the predictions tensor: a dict's ``"logits"``, an
    output object's ``.logits`` (Hugging Face) or a tuple's first element."""

    def __init__(self, module: nn.Module, forward_fn: Optional[ForwardFn] = None):
        super().__init__()
        self.module = module
        self._forward_fn = forward_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_output(self.module(x) if self._forward_fn is None else self._forward_fn(self.module, x))

    @staticmethod
    def forward_output(out: Any) -> torch.Tensor:
        """The predictions tensor of a model output, or a clear error."""
        predictions = predictions_in(out)
        if predictions is None:
            raise TypeError(f"the model returned a {type(out).__name__} without a tensor of predictions (a tensor, "
                            "a 'logits' key or .logits attribute, a tuple's first element); pass forward_fn=(module, "
                            "x) -> the per-example predictions")
        return predictions


def model_summary(module: nn.Module) -> Dict[str, Any]:
    """Class, parameter counts and top-level layers of a model (stored as ``/`` attr ``model``)."""
    params = {id(p): p for p in module.parameters()}.values()
    layers = [[name, type(child).__name__, int(sum(p.numel() for p in child.parameters()))]
              for name, child in module.named_children()]
    return {"class": type(module).__qualname__, "module": type(module).__module__,
            "parameters": int(sum(p.numel() for p in params)),
            "trainable": int(sum(p.numel() for p in params if p.requires_grad)), "layers": layers[:200]}


def chunked_forward(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model``'s outputs on ``x``, in chunks of ``batch_size`` rows."""
    outs = [model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def fractional_epoch(trainer: Any, batch_idx: int) -> float:
    batches = getattr(trainer, "num_training_batches", None)
    if isinstance(batches, (int, float)) and np.isfinite(batches) and batches > 0:
        return float(trainer.current_epoch + min(batch_idx + 1, batches) / batches)
    return float(trainer.current_epoch)


class Monitor(Declared, *CALLBACK_BASES):  # type: ignore[misc]
    """Base of lightning_ntk's monitors: a Lightning callback of every installed namespace.

    Args:
        path: the run file (HDF5). Monitors given the same path share one file.
        name: distinguishes two monitors of one kind (group ``<quantity>_<name>``).
        schedule: when to snapshot: a :class:`~lightning_ntk.schedule.Schedule`, an int
            (every n steps) or a list of steps. Default: the monitor's own.
        probe: a :class:`~lightning_ntk.probe.Probe` (drawn from the Trainer's data), a
            :class:`~lightning_ntk.probe.ProbeSet`, or a pair of tensors ``(x, y)``.
        overwrite: replace an existing file at ``path`` (default: refuse, unless resuming).
        on_error: ``"warn"``: a failure is recorded in ``/errors``, warned once, this
            monitor is disabled and training goes on; ``"raise"``: the fit stops.
        forward_fn: ``forward_fn(pl_module, x) -> outputs``; default ``pl_module(x)``.
        batch_size: examples per forward pass on the probe.
        log_scalars: send scalars to the Trainer's loggers.
        fsync: force each snapshot to disk (``os.fsync``), not just to the OS cache.
        budget: snapshot time as a fraction of training time (:mod:`lightning_ntk.budget`):
            ``None`` (default) one 5% budget shared by the Trainer's monitors; a float: its
            own; a Governor: shared with the monitors given it; ``False``: no skipping.
            First and final snapshots are always taken; skipped ones are in ``/skipped/<group>``.
        collective_timeout: under DDP, seconds to wait for the other ranks before failing
            (never a hang); one group per Trainer, with the first monitor's timeout.
        max_row_mb: cap on one row of the monitor's table (MB): optional fields (logits,
            stored kernels) are left out above it, named in the table's ``dropped_fields``
            attribute; None: no cap.
    """

    quantity: ClassVar[str] = "monitor"
    needs_probe: ClassVar[bool] = True
    default_probe_size: ClassVar[Optional[int]] = 256
    dispatched_by_session: ClassVar[bool] = True  # the session's batch-end dispatch runs its schedule
    #: Sizing to the budget (:mod:`._sizing`): the smallest size a default may shrink to, and its name.
    size_floor: ClassVar[int] = 32
    size_name: ClassVar[str] = "probe size"
    size_argument: ClassVar[str] = "probe=Probe(size=...)"  # the argument that gives a size of the user's
    #: The arguments that make a row of its table smaller (named when a row exceeds max_row_mb).
    smaller_rows: ClassVar[str] = "a smaller probe= (or k=)"
    #: Attributes rebuilt for each fit (:meth:`_reset_runtime`), never pickled (``log``: Lightning's).
    runtime: ClassVar[Tuple[str, ...]] = ("_session", "_store", "_tables", "_specs", "_governor", "log", "log_dict")

    def __init__(self, path: Union[str, "os.PathLike[str]"], *, name: Optional[str] = None,
                 schedule: ScheduleLike = None, probe: ProbeLike = None, overwrite: bool = False,
                 on_error: str = "warn", forward_fn: Optional[ForwardFn] = None, batch_size: int = 256,
                 log_scalars: bool = True, fsync: bool = True, budget: BudgetLike = None,
                 collective_timeout: float = 300.0, max_row_mb: Optional[float] = DEFAULT_MAX_ROW_MB):
        owner = type(self).__name__
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise TypeError(f"{owner}: path must be a file path (str or os.PathLike), got {path!r}")
        self.path, self.name = os.fspath(path), _args.text(name, "name", owner, forbid="/", optional=True)
        self._state_key = f"{owner}[{self.group}]"  # read by Lightning at every hook dispatch
        self.on_error = _args.one_of(on_error, "on_error", ("warn", "raise"), owner)
        self.batch_size = _args.positive_int(batch_size, "batch_size", owner)
        self.forward_fn = _args.function(forward_fn, "forward_fn", owner, signature="(pl_module, x) -> outputs")
        self.collective_timeout = _args.positive(collective_timeout, "collective_timeout", owner)
        self.max_row_mb = _args.positive(max_row_mb, "max_row_mb", owner, optional=True)
        self._dropped: Dict[str, List[str]] = {}  # fields left out of each table by the row cap
        self._wrap_outputs = False  # the model returns more than a tensor (HF outputs): read its logits
        self.sizing: Dict[str, Any] = {}  # what sizing to the budget decided this fit (config "sizing")
        with _args.named(owner):  # the functional core's checks, with the monitor named
            as_governor(budget)
            self.schedule: Schedule = as_schedule(schedule, self.default_schedule())
        self.probe = as_probe(owner, probe, self.default_probe_size) if self.needs_probe else None
        self._probe = ProbeSlot("probe", self.probe, clamp=probe is None)
        self._heldout: Optional[ProbeSlot] = None  # set by monitors that take heldout=
        self.overwrite, self.log_scalars, self.fsync, self.budget = bool(overwrite), bool(log_scalars), bool(fsync), budget
        self.disabled = False
        self._rows: Dict[str, int] = {}
        self._last_step: Optional[int] = None  # the step of the latest snapshot
        self._loaded_state: Optional[Dict[str, Any]] = None  # a checkpoint's, until train start
        # The epoch whose last batch has ended but whose on_train_epoch_end has not run yet: a
        # checkpoint saved in that window resumes into the next epoch without that hook.
        self._pending_epoch_end: Optional[int] = None
        self._initial_due = False  # the step-0 snapshot, taken at the first batch
        self.next_due = 0  # no snapshot can be due at a step before this one (Schedule.next_due_after)
        #: Snapshots taken, their total seconds, and the seconds spent handing rows to the store.
        self.timings: Dict[str, float] = {"snapshots": 0, "snapshot_s": 0.0, "store_s": 0.0}
        self.snapshot_step, self.snapshot_epoch = None, None  # of the snapshot being taken (for measure)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._session: Optional[FitSession] = None
        self._store: Optional[RunStore] = None
        self._tables: Dict[str, Union[Table, FixedTable]] = {}
        self._specs: List[TableSpec] = []
        self._governor: Optional[Governor] = None

    # ---------------------------------------------------------------- to override
    def default_schedule(self) -> Schedule:
        return LogSpacedSteps()

    def fields(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[Field]:
        """Row schema of this monitor's snapshot table, besides ``step``, ``epoch``, ``wall_time``."""
        raise NotImplementedError(f"{type(self).__name__} must define fields() or table_specs()")

    def table_specs(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[TableSpec]:
        """Every table this monitor writes. Default: one snapshot table at :attr:`group`."""
        fields = [Field("step", (), "int64"), Field("epoch", (), "float64"), Field("wall_time", (), "float64"),
                  Field("snapshot_seconds", attrs={"description": "seconds the measurement took (training thread)"}),
                  *self.fields(probe, pl_module)]
        return [TableSpec(self.group, fields, coords=self.coords(probe),
                          attrs={"probe": probe.name if probe is not None else ""})]

    def coords(self, probe: Optional[ProbeSet]) -> Dict[str, Any]:
        """Coordinate values of per-row axes (by axis name)."""
        return {"probe_example": probe.index} if probe is not None else {}

    def measure(self, trainer: Any, pl_module: nn.Module, probe: Optional[ProbeSet]) -> Tuple[Dict[str, Any], Dict[str, float]]:
        """One snapshot, under measurement mode: (row for the table, scalars to log)."""
        raise NotImplementedError(f"{type(self).__name__} must define measure()")

    def config_extra(self) -> Dict[str, Any]:
        """Settings decided at run time, recorded beside the ``__init__`` arguments."""
        return {"model_mode": "eval"}

    @property
    def group(self) -> str:
        """The run-file group of this monitor's table."""
        return self.quantity if self.name is None else f"{self.quantity}_{self.name}"

    @property
    def state_key(self) -> str:
        return self._state_key

    @property
    def table(self) -> Optional[Table]:
        """The snapshot table (rank 0, during training)."""
        table = self._tables.get(self.group)
        return table if isinstance(table, Table) else None

    @property
    def probe_set(self) -> Optional[ProbeSet]:
        """The drawn probe (available from ``on_train_start``)."""
        return self._probe.drawn

    @property
    def heldout_set(self) -> Optional[ProbeSet]:
        """The drawn held-out probe (from ``on_train_start``), or None."""
        return None if self._heldout is None else self._heldout.drawn

    @property
    def _probes(self) -> List[ProbeSlot]:
        return [slot for slot in (self._probe, self._heldout) if slot is not None]

    @property
    def _writer(self) -> bool:
        return self._session is not None and self._session.writer

    @property
    def _dist(self) -> Any:
        return self._session.collectives

    def measured_model(self, pl_module: nn.Module) -> nn.Module:
        """What the monitor differentiates: ``pl_module``, or ``forward_fn`` (or the logits of
        a non-tensor output, see :meth:`sample_outputs`) as a module."""
        wrap = self.forward_fn is not None or self._wrap_outputs
        return MeasuredModel(pl_module, self.forward_fn) if wrap else pl_module

    def sample_outputs(self, pl_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The measured model's predictions on ``x`` (at train start): notes whether the
        module's raw output needs its logits read out (a dict or a ``ModelOutput``)."""
        if self.forward_fn is not None:
            return self.measured_model(pl_module)(x)
        out = pl_module(x)
        self._wrap_outputs = not isinstance(out, torch.Tensor)
        return MeasuredModel.forward_output(out)

    # ---------------------------------------------------------------- sizing to the budget
    def sizable_probe(self) -> bool:
        """Whether the probe is drawn from the data (a :class:`Probe`), so it can be sized."""
        return isinstance(self._probe.setting, Probe)

    def default_size(self) -> bool:
        """Whether the user left the size to the monitor (no ``probe=``)."""
        return self._probe.clamp

    @property
    def clock(self) -> Callable[[], float]:
        """The clock snapshots are timed with: the governor's (tests inject a fake one)."""
        return self._governor.clock if self._governor is not None else time.perf_counter

    def cost_model(self, trainer: Any, pl_module: nn.Module, probe: ProbeSet) -> Optional[CostModel]:
        """Predicted seconds of a snapshot by probe size, timed on this model (None: not sized)."""
        return None

    def lighter_work(self, cost: CostModel) -> List[LighterWork]:
        """Lighter settings of the work done per snapshot, lightest last, with their
        predicted cost (tried when even the floor size is over the allowance); only
        settings the user left to the monitor, each an attribute to set. Default: none."""
        return []

    def apply_work(self, settings: Dict[str, Any]) -> None:
        """Take the lighter settings sizing chose (attributes restored at the next fit:
        list them in ``per_fit``)."""
        for name, value in settings.items():
            setattr(self, name, value)

    def snapshot_cost(self, trainer: Any, pl_module: nn.Module) -> Optional[CostModel]:
        """A cost model from :meth:`measure` itself on the probe's first 16 and 32 examples,
        linear in the probe size (for monitors whose measure keeps no state across calls)."""
        return linear_cost(lambda sub: self.measure(trainer, pl_module, sub), self._probe.on(pl_module), small=16,
                           clock=self.clock)

    def _resume_sizes(self) -> None:
        """A resumed fit draws the sizes its checkpoint recorded (sizing may have shrunk them)."""
        loaded = (self._loaded_state or {}).get("probe_index")
        if loaded is not None and self.default_size() and self.sizable_probe():
            self._probe.setting = self._probe.setting.resized(len(loaded))
            self.apply_work(dict((self._loaded_state or {}).get("work") or {}))

    def resize_probes(self, trainer: Any, pl_module: nn.Module, size: int) -> None:
        """Draw the probe again at ``size`` examples and work the tables out again."""
        self._probe.setting = self._probe.setting.resized(size)
        draw_probes([self._probe], trainer, type(self).__name__, None)
        with measurement_mode(pl_module, grad=False):
            self._specs = self.table_specs(self.probe_set, pl_module)

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if str(stage) not in ("fit", "TrainerFn.FITTING"):
            return
        self._session, self.disabled = FitSession.join(trainer, self), False
        self._new_fit()  # a checkpoint's state, if any, is loaded after setup
        self._session.settle(self, 0, strategy_refusal(trainer, type(self).__name__))  # every rank
        if self._writer:  # fail fast on an unusable location; existence is checked once resume is known
            RunStore.check_path(self.path, overwrite=self.overwrite, resume=True, check_exists=False)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        session, resuming = self._session, self._loaded_state is not None  # checkpoints are restored by now
        session.start()
        self.next_due = 0
        self._governor = session.governor_for(self.budget)
        if self._governor is not None:
            self._governor.start()
            self._governor.expect_final(self.group, self.schedule.final)
        error: Optional[BaseException] = None
        try:  # every rank learns its probes and shapes here; a refusal is settled like a failed snapshot
            if resuming:
                self._resume_sizes()
            draw_probes(self._probes, trainer, type(self).__name__, self._loaded_state)
            with measurement_mode(pl_module, grad=False):
                self._specs = [] if self.disabled else self.table_specs(self.probe_set, pl_module)
            if not self.disabled:
                size_to_budget(self, trainer, pl_module)
            self._dropped = cap_rows(self._specs, self.max_row_mb, type(self).__name__, self.smaller_rows)
            for group, names in self._dropped.items():
                _log.info("%s: %s left out of /%s (a row would take more than max_row_mb=%g MB); pass a larger "
                          "max_row_mb= to keep them", type(self).__name__, ", ".join(names), group, self.max_row_mb)
        except Exception as exc:  # noqa: BLE001 - the session's error policy decides
            self._specs, error = [], exc
        self._session.settle(self, int(trainer.global_step), error)
        if self._governor is not None:
            self._specs.append(skipped_table(self.group, self._governor.budget))
        if self._writer:
            self._store = session.acquire_store(self, resume=resuming)
            self._store.set_config(self.state_key, self.config())
            self._store.set_model_summary(model_summary(pl_module))
            # A refused monitor writes no probe (two of its probes may even share a name).
            self._tables = session.declare(self._store, self._specs, [] if self.disabled else self._probes,
                                           self._rows if resuming else None)
        # The first snapshot waits for the first batch: every monitor's train-start checks
        # (refusals) come before any monitor's snapshot work.
        self._initial_due = self._last_step is None and self.schedule.due_at_step(trainer.global_step)
        if not self._initial_due and resuming and self._pending_epoch_end is not None:
            # Resumed after an epoch's last batch but before its end hook: Lightning goes on with
            # the next epoch, so take that epoch-end snapshot now (the model is as it was then).
            epoch, self._pending_epoch_end = self._pending_epoch_end, None
            if trainer.global_step != self._last_step and self.schedule.due_at_epoch_end(epoch):
                self._snapshot(trainer, pl_module, epoch=float(epoch + 1))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._session is not None:
            self._session.start_swmr()
        if self._initial_due:  # the model is still as it was at train start
            self._initial_due = False
            self._snapshot(trainer, pl_module, epoch=float(trainer.current_epoch))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._session.batch_end(self, trainer, pl_module, batch_idx)

    def _batch_end(self, trainer: Any, pl_module: nn.Module, batch_idx: int) -> None:
        """After each training batch (from the session): note an epoch's last batch, take a due snapshot."""
        step, batches = trainer.global_step, trainer.num_training_batches
        if isinstance(batches, int) and batch_idx + 1 >= batches:
            self._pending_epoch_end = int(trainer.current_epoch)
        if step < self.next_due:
            return
        self.next_due = self.schedule.next_due_after(step)  # one decision per step (gradient accumulation)
        if step != self._last_step and self.schedule.due_at_step(step):
            self._snapshot(trainer, pl_module, epoch=fractional_epoch(trainer, batch_idx))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._pending_epoch_end = None
        if trainer.global_step != self._last_step and self.schedule.due_at_epoch_end(trainer.current_epoch):
            self._snapshot(trainer, pl_module, epoch=float(trainer.current_epoch + 1))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.schedule.final and trainer.global_step != self._last_step:
            self._snapshot(trainer, pl_module, epoch=float(trainer.current_epoch), forced=True)
        self._flush_all()

    def _flush_all(self) -> None:
        """Wait until every row handed to the store is in the file (every rank together)."""
        if self.disabled:
            return
        error: Optional[BaseException] = None
        try:
            if self._store is not None:
                self._store.flush()
        except Exception as exc:  # noqa: BLE001 - the session's error policy decides
            error = exc
        self._failed(int(self._last_step or 0), error)

    def _disable(self) -> None:
        """Off for the rest of the run; the governor keeps no reserve for its final snapshot."""
        self.disabled = True
        if self._governor is not None:
            self._governor.expect_final(self.group, False)

    def _failed(self, step: int, error: Optional[BaseException]) -> bool:
        """The session's error policy (agreed across ranks); True if any rank failed."""
        return self._session.settle(self, step, error)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._session is not None:
            self._session.leave(self)
        self._session, self._store, self._tables = None, None, {}

    def state_dict(self) -> Dict[str, Any]:
        if self._store is not None:
            self._store.flush()
            self._rows = {g: t.n_committed for g, t in self._tables.items() if isinstance(t, Table)}
        return {"rows": dict(self._rows), "last_step": self._last_step, "group": self.group,
                "pending_epoch_end": self._pending_epoch_end,
                "probe_index": None if self.probe_set is None else self.probe_set.index.tolist(),
                "heldout_index": None if self.heldout_set is None else self.heldout_set.index.tolist(),
                "work": dict(self.sizing.get("work") or {}), "extra": self.extra_state()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict)
        rows = state_dict.get("rows", {})
        self._rows = {self.group: int(rows)} if isinstance(rows, int) else {str(k): int(v) for k, v in rows.items()}
        self._last_step = state_dict.get("last_step")
        self._pending_epoch_end = state_dict.get("pending_epoch_end")
        self.load_extra_state(state_dict.get("extra", {}))

    # ---------------------------------------------------------------- snapshot
    def _snapshot(self, trainer: Any, pl_module: nn.Module, epoch: float, forced: bool = False) -> None:
        step = int(trainer.global_step)
        if self.disabled or not self._session.allowed(self, step, epoch, forced or self._last_step is None):
            return
        self.snapshot_step, self.snapshot_epoch = step, float(epoch)  # visible to measure()
        clock = self.clock
        predicted = self._predicted_seconds()
        self._session.announce(self, step, predicted)
        started = clock()
        error: Optional[BaseException] = None
        try:
            with measurement_mode(pl_module):
                row, scalars = self.measure(trainer, pl_module, self._probe.on(pl_module))
            if self._writer and self.table is not None:
                measured = clock()
                row = {k: v for k, v in row.items() if k not in self._dropped.get(self.group, ())}
                self.table.append(dict(row, step=step, epoch=epoch, wall_time=wall_time(), snapshot_seconds=measured - started))
                self._store.flush_async()  # the writer thread writes; an earlier write's error surfaces here
                self.timings["store_s"] += clock() - measured
        except Exception as exc:  # noqa: BLE001 - the session's error policy decides
            error = exc
        if self._failed(step, error):
            return
        self._last_step = step
        seconds = clock() - started
        self.timings["snapshots"] += 1
        self.timings["snapshot_s"] += seconds
        if self._governor is not None:
            self._governor.record(self.group, seconds)
        self._session.report(self, step, seconds, predicted)
        if self.log_scalars and scalars:
            self._log(trainer, scalars, step)

    def _predicted_seconds(self) -> Optional[float]:
        """A snapshot's predicted seconds: the mean of this fit's so far, else the cost model's."""
        if self._governor is not None and self._governor.expected_cost(self.group) > 0:
            return self._governor.expected_cost(self.group)
        return self.sizing.get("predicted_seconds")

    def _log(self, trainer: Any, scalars: Mapping[str, float], step: int) -> None:
        self._session.log(self, trainer, scalars, step)
