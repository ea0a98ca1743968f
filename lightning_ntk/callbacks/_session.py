"""FitSession: what the monitors of one Trainer share during one fit.

One session per ``Trainer.fit``, created by the first monitor's ``setup`` and found through
one registry (:meth:`FitSession.join`). It owns

* the run files: one :class:`~lightning_ntk.store.RunStore` per path, acquired for the
  monitors that write it (rank 0), switched to SWMR at the first batch, released at the end;
* the budget governor shared by the monitors created with ``budget=None``;
* one collectives group (:class:`~._distributed.Collectives`) for every monitor;
* the due-monitor dispatch: Lightning calls every monitor's batch-end hook, the first
  snapshot monitor's call checks all of them (one comparison per batch between due steps)
  and the others return at once;
* the error policy (:meth:`settle`): agree across ranks, record in ``/errors``, then raise
  (``on_error="raise"``) or disable the monitor and warn; training goes on;
* progress output: a log line for every snapshot that took longer than
  :data:`PROGRESS_SECONDS`.

Monitors keep their arguments, schedule, probes, table specs, ``measure`` and state; their
Lightning hooks delegate here for everything shared.
"""
from __future__ import annotations

import logging
import os
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..budget import SKIP_BUDGET, Governor, as_governor
from ..probe import ProbeSet
from ..sizing import TrainingLength
from ..store import RunStore, Table
from ._declared import ProbeSlot, TableSpec
from ._distributed import Collectives
from ._lightning import loggers_of

if TYPE_CHECKING:  # pragma: no cover
    from ._base import Monitor

log = logging.getLogger("lightning_ntk")

#: Budget of the governor shared by monitors created with ``budget=None``: together, the
#: monitors of one Trainer spend at most this fraction of training time.
DEFAULT_BUDGET = 0.05
_default_budget: Optional[float] = DEFAULT_BUDGET

#: A snapshot that takes longer than this many seconds gets a progress line.
PROGRESS_SECONDS = 2.0

#: Probe inputs are stored in the file by default when they take at most this many bytes.
_STORE_INPUTS_MAX_BYTES = 16 * 1024 * 1024

_sessions: "weakref.WeakKeyDictionary[Any, FitSession]" = weakref.WeakKeyDictionary()


def set_default_budget(budget: Optional[float]) -> Optional[float]:
    """Set the shared budget of monitors created with ``budget=None`` (None or 0: no
    governor by default). Returns the previous value."""
    global _default_budget
    if budget:
        Governor(budget)  # validates
    previous, _default_budget = _default_budget, (float(budget) if budget else None)
    return previous


def default_budget() -> Optional[float]:
    return _default_budget


class FitSession:
    """The shared state of one fit's monitors (see the module docstring)."""

    def __init__(self, trainer: Any, collective_timeout: float) -> None:
        self.writer = bool(getattr(trainer, "is_global_zero", True))
        self.collectives = Collectives(collective_timeout)
        self.collectives.setup()  # every rank, at the first monitor's setup: the same point everywhere
        self.monitors: List["Monitor"] = []
        self.stores: Dict[str, RunStore] = {}
        self._unrecorded: Dict[str, List[Tuple[int, str, str]]] = {}  # path -> /errors rows
        self._shared_governor: Optional[Governor] = None
        self._leader: Optional["Monitor"] = None
        self._next_due = 0
        self._length: Optional[TrainingLength] = None  # predicted at the first sized monitor's train start
        self.closed = False

    # ---------------------------------------------------------------- membership
    @classmethod
    def join(cls, trainer: Any, monitor: "Monitor") -> "FitSession":
        """The session of ``trainer``'s current fit, with ``monitor`` as a member. A monitor
        that is already a member of the trainer's session starts a new fit: a new session."""
        session = _sessions.get(trainer)
        if session is None or session.closed or monitor in session.monitors:
            session = _sessions[trainer] = cls(trainer, monitor.collective_timeout)
        session.monitors.append(monitor)
        return session

    def leave(self, monitor: "Monitor") -> None:
        """``monitor`` is done with this fit: its share of the run file is released; the
        last member to leave closes the session."""
        self.release_store(monitor)
        if monitor in self.monitors:
            self.monitors.remove(monitor)
        if self._leader is monitor:
            self._leader = None
        if not self.monitors:
            self.closed = True

    def start(self) -> None:
        """Called by each monitor at train start: the batch-end dispatch is re-checked."""
        snapshotting = [m for m in self.monitors if m.dispatched_by_session]
        self._leader = snapshotting[0] if snapshotting else None
        self._next_due = 0

    # ---------------------------------------------------------------- sizing
    def training_length(self, trainer: Any, pl_module: Any, sample: ProbeSet, clock: Any) -> TrainingLength:
        """The training's predicted length (once per fit; see :mod:`._sizing`)."""
        if self._length is None:
            from ._sizing import training_length

            self._length = training_length(trainer, pl_module, sample, clock)
        return self._length

    def snapshot_monitors(self) -> int:
        """How many members take snapshots (they share the budget of the forced ones)."""
        return max(1, sum(1 for m in self.monitors if m.dispatched_by_session and not m.disabled))

    # ---------------------------------------------------------------- run files
    def acquire_store(self, monitor: "Monitor", *, resume: bool) -> RunStore:
        """Rank 0: the run file at ``monitor.path``, shared with the other monitors naming it."""
        store = RunStore.acquire(monitor.path, owner=monitor.state_key, overwrite=monitor.overwrite,
                                 resume=resume, fsync=monitor.fsync)
        self.stores[os.path.realpath(monitor.path)] = store
        for row in self._unrecorded.pop(os.path.realpath(monitor.path), []):
            store.record_error(*row)
        return store

    def declare(self, store: RunStore, specs: List[TableSpec], probes: List[ProbeSlot],
                rows: Optional[Dict[str, int]]) -> Dict[str, Any]:
        """Rank 0, before SWMR: write the drawn probes as ``/probe/<name>`` and declare the
        tables (append tables resume at ``rows``); returns the tables by group."""
        for slot in probes:
            if slot.drawn is not None:
                _write_probe(store, slot.drawn, slot.store_inputs)
        tables: Dict[str, Any] = {}
        for spec in specs:
            if spec.n_rows is not None:
                tables[spec.group] = store.declare_fixed_table(spec.group, spec.fields, spec.n_rows,
                                                               row_dim=spec.row_dim or "row", coords=spec.coords,
                                                               attrs=spec.attrs)
            else:
                tables[spec.group] = store.declare_table(spec.group, spec.fields, key=spec.key, row_dim=spec.row_dim,
                                                         coords=spec.coords, attrs=spec.attrs,
                                                         rows=None if rows is None else rows.get(spec.group, 0))
        return tables

    def release_store(self, monitor: "Monitor") -> None:
        store = self.stores.get(os.path.realpath(monitor.path))
        if store is None or monitor.state_key not in store.owners:
            return
        store.release(monitor.state_key)
        if store.closed:
            self.stores.pop(os.path.realpath(monitor.path), None)

    def start_swmr(self) -> None:
        """At the first batch every monitor has declared its tables: no new objects after."""
        for store in self.stores.values():
            if not store.swmr and not store.closed:
                store.start_swmr()

    # ---------------------------------------------------------------- budget
    def governor_for(self, budget: Any) -> Optional[Governor]:
        """``budget=None``: the session's shared governor (the default budget); a float: a
        governor of its own; a Governor: that one; False: none."""
        if budget is None:
            if _default_budget is None:
                return None
            if self._shared_governor is None or self._shared_governor.budget != _default_budget:
                self._shared_governor = Governor(_default_budget)
            return self._shared_governor
        return as_governor(budget)

    @property
    def shared_governor(self) -> Optional[Governor]:
        return self.governor_for(None)

    def allowed(self, monitor: "Monitor", step: int, epoch: float, forced: bool) -> bool:
        """The governor's decision on a snapshot, taken on rank 0 and broadcast (ranks must
        agree); a skipped one is a row of ``/skipped/<group>``."""
        governor = monitor._governor
        if governor is None:
            return True
        allowed = bool(self.collectives.broadcast_object(governor.allow(monitor.group, forced=forced)))
        table = monitor._tables.get(f"skipped/{monitor.group}")
        if not allowed and self.writer and isinstance(table, Table):
            table.append(step=step, epoch=epoch, reason=SKIP_BUDGET, expected_cost=governor.expected_cost(monitor.group),
                         overhead=governor.overhead())
        return allowed

    # ---------------------------------------------------------------- dispatch
    def due_by(self, step: int) -> None:
        """A member planned a snapshot at ``step`` outside its schedule (from a measurement,
        e.g. NTKMonitor's constant-Δt partner): the batch-end dispatch runs by then."""
        self._next_due = min(self._next_due, int(step))

    def batch_end(self, monitor: "Monitor", trainer: Any, pl_module: Any, batch_idx: int) -> None:
        """Every monitor's batch-end hook calls this; the leader's call checks all members."""
        if monitor is not self._leader:
            return
        last_batch = isinstance(trainer.num_training_batches, int) and batch_idx + 1 >= trainer.num_training_batches
        if trainer.global_step < self._next_due and not last_batch:
            return
        members = [m for m in self.monitors if m.dispatched_by_session]
        for member in members:
            member._batch_end(trainer, pl_module, batch_idx)
        self._next_due = min(m.next_due for m in members)

    # ---------------------------------------------------------------- errors
    def settle(self, monitor: "Monitor", step: int, error: Optional[BaseException], *,
               collective: bool = True) -> bool:
        """Apply ``monitor.on_error`` to ``error`` (None: nothing failed on this rank); True
        if any rank failed. ``collective``: every rank calls this at the same point, so all
        learn whether any failed and all raise, or all disable, together."""
        if collective:
            error = self.collectives.agree_on_error(error, f"{type(monitor).__name__} ({monitor.group})")
        if error is None:
            return False
        if self.writer and not getattr(error, "_lightning_ntk_recorded", False):
            store = self.stores.get(os.path.realpath(monitor.path))
            row = (step, monitor.group, f"{type(error).__name__}: {error}")
            if store is not None:
                store.record_error(*row)
            else:  # failed before its run file was open: recorded when it opens
                self._unrecorded.setdefault(os.path.realpath(monitor.path), []).append(row)
        if monitor.on_error == "raise":
            try:
                error._lightning_ntk_recorded = True  # type: ignore[attr-defined]
            except AttributeError:  # pragma: no cover - exceptions with __slots__
                pass
            raise error
        if not monitor.disabled:
            message = str(error).rstrip()
            warnings.warn(
                f"{type(monitor).__name__} ({monitor.group}) failed at step {step} and is disabled for the rest of "
                f"this run: {type(error).__name__}: {message}{'' if message.endswith('.') else '.'} Pass "
                "on_error='raise' to stop training instead.", RuntimeWarning, stacklevel=3)
        monitor._disable()
        return True

    # ---------------------------------------------------------------- output
    def log(self, monitor: "Monitor", trainer: Any, scalars: Mapping[str, float], step: int) -> None:
        """Scalars to the Trainer's loggers (rank 0) and its ``callback_metrics`` (every rank)."""
        metrics = {f"{monitor.group}/{k}": float(v) for k, v in scalars.items()}
        if self.writer:
            for logger in loggers_of(trainer):
                logger.log_metrics(metrics, step=step)
        callback_metrics = getattr(trainer, "callback_metrics", None)
        if isinstance(callback_metrics, dict):
            for key, value in metrics.items():
                callback_metrics[key] = torch.tensor(value)

    def announce(self, monitor: "Monitor", step: int, predicted: Optional[float]) -> None:
        """Before a snapshot predicted to take long: one line, so a fit never looks hung."""
        if predicted is not None and predicted >= PROGRESS_SECONDS:
            log.info("%s (%s): snapshot at step %d on %s examples, predicted %.1f s", type(monitor).__name__,
                     monitor.group, step, len(monitor.probe_set) if monitor.probe_set is not None else "no",
                     predicted)

    def report(self, monitor: "Monitor", step: int, seconds: float, predicted: Optional[float] = None) -> None:
        if seconds >= PROGRESS_SECONDS or (predicted is not None and predicted >= PROGRESS_SECONDS):
            guess = "" if predicted is None else f" (predicted {predicted:.1f} s)"
            log.info("%s (%s): snapshot at step %d took %.1f s%s", type(monitor).__name__, monitor.group, step,
                     seconds, guess)
        else:
            log.debug("%s snapshot at step %d took %.3fs", monitor.group, step, seconds)


def _write_probe(store: RunStore, probe: ProbeSet, store_inputs: Optional[bool]) -> None:
    """``/probe/<name>``: ``index``, ``y``, and ``x`` when ``store_inputs`` (None: when it
    takes at most 16 MiB)."""
    group, dims, coords = f"probe/{probe.name}", ("probe_example",), {"probe_example": probe.index}
    store.write_static(group, "index", probe.index, dims, coords=coords)
    store.write_static(group, "y", probe.y.cpu().numpy(), dims + tuple(f"y_dim{i}" for i in range(1, probe.y.ndim)),
                       coords=coords)
    if store_inputs or (store_inputs is None and probe.x.numel() * probe.x.element_size() <= _STORE_INPUTS_MAX_BYTES):
        store.write_static(group, "x", probe.x.cpu().numpy(),
                           dims + tuple(f"x_dim{i}" for i in range(1, probe.x.ndim)), coords=coords)
