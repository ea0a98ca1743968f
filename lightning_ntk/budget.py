"""A wall-clock budget for instrumentation: the governor that thins snapshots.

Monitors spend time on measurements that training would not otherwise spend. With a
budget b (a fraction, e.g. 0.05), the governor keeps

    instrumentation time  <=  b × training time

where training time is the wall time since training started minus the instrumentation
time. Before a scheduled snapshot it predicts its cost (the running mean of that
monitor's past snapshots) and allows it only if the inequality still holds afterwards.
The first snapshot of each monitor and the final one (end of training) are always taken:
they anchor every curve (distance to init, final kernel); their cost counts all the same,
so later snapshots wait until training has paid for them, and every discretionary
snapshot leaves room for the final ones (the expected cost of one more snapshot of each
monitor is held in reserve). The total therefore stays within the budget whenever the
training is long enough to pay for the forced first and last snapshots, i.e. longer
than (their cost) / b, and every monitor takes its first snapshot at step 0 (the
default: a first snapshot that comes later is forced too, and no reserve was kept for
it); a shorter training costs those two snapshots and nothing more.
Skipped snapshots are recorded with the reason by the monitor.

One governor can be shared by several monitors (one budget for all of them, which is
how "5% for everything" is enforced); ``budget=0.05`` on a single monitor gives it its
own. Clocks are injectable so the policy can be tested with a fake clock.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

from ._args import positive

#: Reasons a snapshot is skipped (stored as integer codes; names in the table's attrs).
SKIP_REASONS = ("", "budget")
SKIP_BUDGET = 1


@dataclass
class _MonitorCost:
    count: int = 0
    total: float = 0.0
    last: float = 0.0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


class Governor:
    """Keeps instrumentation time within ``budget`` × training time (see the module docs).

    Args:
        budget: allowed instrumentation time as a fraction of training time (> 0).
        clock: a monotonic clock in seconds (default ``time.perf_counter``).
    """

    def __init__(self, budget: float = 0.05, clock: Optional[Callable[[], float]] = None):
        self.budget = positive(budget, "budget", "Governor", hint="a fraction of training time, e.g. 0.05 for 5%")
        self.clock: Callable[[], float] = clock or time.perf_counter
        self._start: Optional[float] = None
        self._spent = 0.0
        self._costs: Dict[str, _MonitorCost] = {}
        self._skipped: Dict[str, int] = {}
        self._no_final: set = set()  # monitors that will take no final snapshot (see expect_final)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ accounting
    def start(self) -> None:
        """Mark the start of training (idempotent: the first call counts)."""
        with self._lock:
            if self._start is None:
                self._start = self.clock()

    @property
    def spent(self) -> float:
        """Instrumentation seconds recorded so far."""
        return self._spent

    def elapsed(self) -> float:
        """Wall seconds since :meth:`start`."""
        return 0.0 if self._start is None else max(0.0, self.clock() - self._start)

    def training_time(self) -> float:
        """Wall time since start minus instrumentation time."""
        return max(0.0, self.elapsed() - self._spent)

    def overhead(self) -> float:
        """Instrumentation time / training time so far (inf before any training time)."""
        train = self.training_time()
        return self._spent / train if train > 0 else (0.0 if self._spent == 0 else math.inf)

    def expected_cost(self, monitor: str) -> float:
        return self._costs.get(monitor, _MonitorCost()).mean

    def record(self, monitor: str, seconds: float) -> None:
        """Account a snapshot of ``monitor`` that took ``seconds``."""
        with self._lock:
            cost = self._costs.setdefault(monitor, _MonitorCost())
            cost.count += 1
            cost.total += float(seconds)
            cost.last = float(seconds)
            self._spent += float(seconds)

    def expect_final(self, monitor: str, expected: bool = True) -> None:
        """Whether ``monitor`` will take a final snapshot (the default); a monitor without
        one (``final=False``, or disabled after a failure) needs no reserve."""
        with self._lock:
            if expected:
                self._no_final.discard(monitor)
            else:
                self._no_final.add(monitor)

    def reserved(self) -> float:
        """Seconds kept free for the final snapshots, which are always taken: the expected
        cost of one more snapshot of every monitor that has taken one and will take a final
        one. A discretionary snapshot is allowed only if it leaves them room, so that the
        total, final ones included, stays within the budget once training has paid for the
        forced ones."""
        return sum(cost.mean for name, cost in self._costs.items() if cost.count and name not in self._no_final)

    def charge(self, seconds: float) -> None:
        """Account instrumentation time that is not a skippable snapshot (per-batch
        bookkeeping such as forgetting events): it counts against the budget, so the
        snapshots of the other monitors give way to it."""
        with self._lock:
            self._spent += float(seconds)

    # ------------------------------------------------------------------ policy
    def allow(self, monitor: str, *, forced: bool = False) -> bool:
        """Whether ``monitor`` may take its due snapshot now.

        ``forced`` (first / final snapshot) is always allowed. Otherwise allowed when the
        spent time plus this monitor's expected cost plus :meth:`reserved` (the final
        snapshots still to come) stays within budget × training time.
        """
        self.start()
        if forced:
            return True
        with self._lock:
            cost = self._costs.get(monitor)
            if cost is None or cost.count == 0:
                return True  # nothing known yet: its first snapshot
            allowed = self._spent + cost.mean + self.reserved() <= self.budget * self.training_time()
            if not allowed:
                self._skipped[monitor] = self._skipped.get(monitor, 0) + 1
            return allowed

    def skipped(self, monitor: Optional[str] = None) -> int:
        """Snapshots refused so far (for one monitor, or all)."""
        if monitor is not None:
            return self._skipped.get(monitor, 0)
        return sum(self._skipped.values())

    def to_config(self) -> Dict[str, float]:
        return {"budget": self.budget}

    def __repr__(self) -> str:
        return f"Governor(budget={self.budget})"


BudgetLike = Union[None, bool, float, Governor]


def as_governor(budget: BudgetLike) -> Optional[Governor]:
    """Normalise a monitor's ``budget=``: a float gives its own governor, a Governor is
    shared, ``False``/``None`` means no governor (``None`` lets the caller apply a default)."""
    if budget is None or budget is False:
        return None
    if isinstance(budget, Governor):
        return budget
    if budget is True:
        return Governor()
    return Governor(budget)
