"""The base of per-batch (streaming) monitors: record every training batch, process what
was buffered at processing points, write at most every ``write_interval`` seconds.

A subclass supplies :meth:`record_batch` (cheap, per batch: keep what the batch needs),
:meth:`collect` (this process's buffered batches -> records), :meth:`apply` (records ->
state and table rows) and optionally :meth:`prepare`, :meth:`gather` (every rank's records
in one order, under DDP) and :meth:`after_processing`. Processing points: every
``flush_every`` batches, the first epoch end after each ``write_interval`` seconds (every
epoch end under DDP), checkpoints, the end of training. Under DDP they are collective:
every rank reaches them together, and a failure of any rank since the last one is settled
there by the session's error policy, on every rank.

Streaming monitors take no snapshots; their per-batch time is charged to the Trainer's
shared budget, so the snapshot monitors give way to it.
"""
from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, Optional, Tuple

from .. import _args
from ..schedule import Schedule, StepList
from ..store import Table
from ._base import Monitor

#: Per-batch time is handed to the governor once this many seconds have accumulated.
_CHARGE_EVERY = 1e-3
#: ``flush_every=None`` under several processes.
DDP_FLUSH_BATCHES = 64
#: Buffered table rows that force a write whatever ``write_interval`` says.
MAX_BUFFERED_ROWS = 1 << 18


class StreamingMonitor(Monitor):
    """Base of monitors that record every training batch (see the module docstring).

    Args:
        flush_every: process the buffered batches every this many batches (bounds memory).
            None: the subclass decides from the first batch (:meth:`default_flush_every`);
            64 under several processes.
        write_interval: seconds between writes to the file (0: at every epoch end). Always
            written at the end of training, before a checkpoint and on an exception.
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor` (``schedule``, ``probe``,
            ``forward_fn`` and ``budget`` do not apply: every batch is recorded).
    """

    needs_probe = False
    dispatched_by_session = False
    smaller_rows = ""  # a row is a few numbers
    config_exclude: ClassVar[Tuple[str, ...]] = ("schedule", "probe", "forward_fn", "batch_size", "budget")
    runtime = ("_deferred", "_charged_governor")
    #: The clock of ``write_interval`` (a fake one in tests).
    _clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, path: str, *, flush_every: Optional[int] = None, write_interval: float = 5.0, **kwargs: Any):
        owner = type(self).__name__
        for option in ("schedule", "probe", "forward_fn"):
            if kwargs.get(option) is not None:
                raise ValueError(f"{owner}: {option}= does not apply: it records every training batch from the "
                                 "training forward pass")
        if kwargs.get("budget") not in (None, False):
            raise ValueError(f"{owner}: budget= does not apply: it must record every training batch (a skipped "
                             "batch would hide events); its time counts against the other monitors' budget")
        kwargs["budget"] = False
        super().__init__(path, **kwargs)
        self.flush_every = _args.positive_int(flush_every, "flush_every", owner, optional=True)
        self.write_interval = _args.number(write_interval, "write_interval", owner, minimum=0)
        self._batches_since_flush = 0
        self._flush_every: Optional[int] = None
        self._last_write = self._last_epoch_processing = float("-inf")
        self._uncharged = 0.0
        self._scalars_logged_at: Optional[int] = None

    def _reset_runtime(self) -> None:
        super()._reset_runtime()
        self._deferred: Optional[BaseException] = None
        self._charged_governor: Any = None

    def default_schedule(self) -> Schedule:
        return StepList([], final=False)

    # ---------------------------------------------------------------- to override
    def prepare(self, trainer: Any, pl_module: Any) -> None:
        """At train start, before the tables are declared."""

    def record_batch(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define record_batch()")

    def collect(self) -> Any:
        """This process's buffered batches -> records (None: nothing buffered)."""
        raise NotImplementedError(f"{type(self).__name__} must define collect()")

    def gather(self, records: Any) -> Any:
        """Every rank's records in one training order (a collective; identity for one process)."""
        return records

    def apply(self, records: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define apply()")

    def after_processing(self, step: int, reason: str) -> None:
        """After a processing point (``reason``: ``"batches"``, ``"epoch_end"``, ``"checkpoint"``, ``"end"``)."""

    def default_flush_every(self, batch: Any) -> int:
        return 256

    def scalars(self) -> dict:
        """Scalars logged at epoch-end processing points and at the end of training."""
        return {}

    # ---------------------------------------------------------------- error policy
    def _guard(self, step: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run local work; a failure is settled now (one process) or at the next processing
        point (every rank learns of it there)."""
        if self.disabled:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the session's error policy decides
            if self._dist.active:
                self._deferred = self._deferred or exc
            else:
                self._session.settle(self, step, exc, collective=False)
            return None

    def _settle_deferred(self, step: int, error: Optional[BaseException] = None) -> bool:
        error, self._deferred = error or self._deferred, None
        return self._session.settle(self, step, error)

    # ---------------------------------------------------------------- processing
    def _process(self, step: int, reason: str) -> None:
        """A processing point: every rank calls it at the same moments."""
        if self.disabled:
            return
        local, error = None, None
        try:
            local = self.collect()
        except Exception as exc:  # noqa: BLE001 - settled below, on every rank
            error = exc
        if self._settle_deferred(step, error):
            return
        records = self._guard(step, self.gather, local)  # every rank the same records: the same outcome
        if records is not None:
            self._guard(step, self.apply, records)
        self._guard(step, self.after_processing, step, reason)

    def _write_due(self) -> bool:
        return self._clock() - self._last_write >= self.write_interval

    def _write(self) -> None:
        """Hand the buffered rows to the store's writer thread (flush, fsync there)."""
        if self._store is not None:
            self._store.flush_async()  # an earlier write's error surfaces here
        self._last_write = self._clock()

    def _charge(self, seconds: float) -> None:
        self._uncharged += seconds
        if self._uncharged >= _CHARGE_EVERY:
            if self._charged_governor is not None:
                self._charged_governor.charge(self._uncharged)
            self._uncharged = 0.0

    # ---------------------------------------------------------------- Lightning hooks
    def _snapshot(self, trainer: Any, pl_module: Any, epoch: float, forced: bool = False) -> None:
        pass  # no snapshots: every batch is recorded

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._charged_governor = self._session.shared_governor
        if self._charged_governor is not None:
            self._charged_governor.start()
        self._batches_since_flush, self._deferred, self._scalars_logged_at = 0, None, None
        # Under DDP the processing points are collectives: a fixed count every rank knows (an
        # automatic one would be decided from each rank's first batch).
        self._flush_every = self.flush_every or (DDP_FLUSH_BATCHES if self._dist.active else None)
        step = int(trainer.global_step)
        self._guard(step, self.prepare, trainer, pl_module)
        self._settle_deferred(step)
        self._last_write = self._last_epoch_processing = self._clock()
        super().on_train_start(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        started = time.perf_counter()
        step = int(trainer.global_step)
        self._guard(step, self.record_batch, trainer, pl_module, outputs, batch, batch_idx)
        if self._flush_every is None and not self.disabled:
            self._flush_every = self.default_flush_every(batch)
        self._batches_since_flush += 1
        if not self.disabled and self._batches_since_flush >= (self._flush_every or 1):
            self._batches_since_flush = 0
            self._process(step, "batches")
            if self._write_due() or self._buffered_rows() >= MAX_BUFFERED_ROWS:
                self._guard(step, self._write)
        self._charge(time.perf_counter() - started)

    def _log_scalars(self, trainer: Any, step: int) -> None:
        if not self.disabled and self.log_scalars and self._scalars_logged_at != step:  # once per step
            self._scalars_logged_at = step
            self._log(trainer, self.scalars(), step)

    def _buffered_rows(self) -> int:
        return sum(t.n_rows - t.n_committed for t in self._tables.values() if isinstance(t, Table))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        started = time.perf_counter()
        # Processing at every epoch end would cost more than the rest of the monitor on short
        # epochs: only when a write is due. Under DDP at every epoch end: a collective point
        # every rank must reach together (clocks differ).
        if not self.disabled and (self._dist.active or self._clock() - self._last_epoch_processing >= self.write_interval):
            self._last_epoch_processing = self._clock()
            step = int(trainer.global_step)
            self._batches_since_flush = 0
            self._process(step, "epoch_end")
            self._log_scalars(trainer, step)
        self._charge(time.perf_counter() - started)

    def state_dict(self) -> dict:
        if not self.disabled and self._session is not None:
            self._process(int(self._last_step or 0), "checkpoint")
        return super().state_dict()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._charged_governor is not None and self._uncharged:
            self._charged_governor.charge(self._uncharged)  # hand over what is left
        self._uncharged = 0.0
        step = int(trainer.global_step)
        self._process(step, "end")
        self._log_scalars(trainer, step)
        if not self.disabled and self._store is not None:
            # Everything in the file before training ends, written here: handing the rows to
            # the writer thread only to wait for it would add a thread switch to the wait.
            self._guard(step, self._store.flush)
        if not self.disabled:
            self._settle_deferred(step)  # a failure of rank 0's last write reaches every rank

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._store is not None and not self.disabled:
            try:  # keep what was recorded before the failure (no collectives now)
                if not self._dist.active:
                    records = self.collect()
                    if records is not None:
                        self.apply(records)
                self._store.flush()
            except Exception:  # noqa: BLE001 - the training's own exception matters more
                pass
        super().on_exception(trainer, pl_module, exception)
