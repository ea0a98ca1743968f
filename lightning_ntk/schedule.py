"""When to snapshot: schedules over optimizer steps and epoch ends.

A schedule answers two questions: is a snapshot due after optimizer step ``step``
(:meth:`Schedule.due_at_step`), and is one due at the end of epoch ``epoch``
(:meth:`Schedule.due_at_epoch_end`). Step 0 (the untrained model) is due by default
(``initial=True``) and so is the end of training (``final=True``): the first and last
snapshots anchor every curve (distance to init, final kernel).

Schedules are plain objects with typed constructors, so LightningCLI / jsonargparse can
build them from YAML (``class_path: lightning_ntk.schedule.LogSpacedSteps``).
"""
from __future__ import annotations

import bisect
import sys
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Sequence, Union

from ._args import integer, positive_int

#: "No step": what :meth:`Schedule.next_due_after` returns when no later step is due.
NEVER = sys.maxsize


class Schedule(ABC):
    """Base class: decides at which steps / epoch ends a monitor takes a snapshot."""

    def __init__(self, initial: bool = True, final: bool = True):
        self.initial = bool(initial)
        self.final = bool(final)

    def due_at_step(self, step: int) -> bool:
        """True if a snapshot is due once ``step`` optimizer steps have been taken."""
        if step == 0:
            return self.initial
        return self._due_at_step(step)

    @abstractmethod
    def _due_at_step(self, step: int) -> bool:
        """Schedule-specific rule for ``step >= 1``."""

    def due_at_epoch_end(self, epoch: int) -> bool:
        """True if a snapshot is due at the end of (0-based) epoch ``epoch``."""
        return False

    def next_due_after(self, step: int) -> int:
        """A step ``s > step`` such that no step in ``(step, s)`` is due: monitors need not
        check the steps before it (:data:`NEVER` if none is due any more). A lower bound
        of the next due step, exact for the built-in schedules; ``step + 1`` (check every
        step) for a schedule whose rule it does not know, such as a subclass that
        overrides ``due_at_step`` or ``_due_at_step`` without ``_next_due_after``."""
        if step < 0:
            return 0
        if not _knows_next_due(type(self)):
            return step + 1
        return max(step + 1, self._next_due_after(step))

    def _next_due_after(self, step: int) -> int:
        """Schedule-specific :meth:`next_due_after` for ``step >= 0``."""
        return step + 1

    def steps_up_to(self, last: int) -> List[int]:
        """All steps in ``[0, last]`` at which a snapshot is due (epoch ends not included)."""
        return [s for s in range(0, last + 1) if self.due_at_step(s)]

    def to_config(self) -> Dict[str, Any]:
        return {"class": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class EveryNSteps(Schedule):
    """A snapshot every ``n`` optimizer steps (``step % n == 0``)."""

    def __init__(self, n: int = 100, initial: bool = True, final: bool = True):
        super().__init__(initial, final)
        self.n = positive_int(n, "n", "EveryNSteps")

    def _due_at_step(self, step: int) -> bool:
        return step % self.n == 0

    def _next_due_after(self, step: int) -> int:
        return (step // self.n + 1) * self.n


class EveryNEpochs(Schedule):
    """A snapshot at the end of every ``n``-th epoch (epochs ``n-1, 2n-1, ...``, 0-based)."""

    def __init__(self, n: int = 1, initial: bool = True, final: bool = True):
        super().__init__(initial, final)
        self.n = positive_int(n, "n", "EveryNEpochs")

    def _due_at_step(self, step: int) -> bool:
        return False

    def _next_due_after(self, step: int) -> int:
        return NEVER

    def due_at_epoch_end(self, epoch: int) -> bool:
        return (epoch + 1) % self.n == 0


class LogSpacedSteps(Schedule):
    """Dense early, sparse late: steps ``round(10**(i / per_decade))`` for i = 0, 1, 2, ...

    With ``per_decade=8`` the steps are 1, 2, 3, 4, 6, 7, 10, 13, 18, 24, 32, 42, 56, 75,
    100, ... (duplicates removed). ``max_interval`` caps the gap: from the point where log
    spacing would leave more than ``max_interval`` steps between snapshots, every multiple
    of ``max_interval`` is due as well, so long trainings stay sampled.
    """

    def __init__(self, per_decade: int = 8, max_interval: Optional[int] = None, initial: bool = True,
                 final: bool = True):
        super().__init__(initial, final)
        self.per_decade = positive_int(per_decade, "per_decade", "LogSpacedSteps")
        self.max_interval = positive_int(max_interval, "max_interval", "LogSpacedSteps", optional=True)
        self._points: List[int] = [1]
        self._i = 0

    def _extend_to(self, step: int) -> None:
        while self._points[-1] < step:
            self._i += 1
            point = int(round(10 ** (self._i / self.per_decade)))
            if point > self._points[-1]:
                self._points.append(point)

    def _due_at_step(self, step: int) -> bool:
        self._extend_to(step)
        pos = bisect.bisect_left(self._points, step)
        if pos < len(self._points) and self._points[pos] == step:
            return True
        if self.max_interval is not None and step % self.max_interval == 0:
            # Only once log spacing has become sparser than max_interval.
            previous = self._points[pos - 1] if pos > 0 else 0
            following = self._points[pos] if pos < len(self._points) else step
            return following - previous > self.max_interval
        return False

    def _next_due_after(self, step: int) -> int:
        self._extend_to(step + 1)
        following = self._points[bisect.bisect_right(self._points, step)]
        if self.max_interval is not None:  # a lower bound: the next multiple may be due
            following = min(following, (step // self.max_interval + 1) * self.max_interval)
        return following


class StepList(Schedule):
    """Snapshots at an explicit list of optimizer steps."""

    def __init__(self, steps: Sequence[int], initial: bool = True, final: bool = True):
        super().__init__(initial, final)
        checked = sorted({integer(int(s) if not isinstance(s, bool) else s, "step", "StepList", minimum=0)
                          for s in steps})
        self.steps = checked
        self._set = set(checked)

    def _due_at_step(self, step: int) -> bool:
        return step in self._set

    def _next_due_after(self, step: int) -> int:
        pos = bisect.bisect_right(self.steps, step)
        return self.steps[pos] if pos < len(self.steps) else NEVER


def _defining_class(cls: type, name: str) -> Optional[type]:
    return next((klass for klass in cls.__mro__ if name in klass.__dict__), None)


_KNOWS_NEXT_DUE: Dict[type, bool] = {}


def _knows_next_due(cls: type) -> bool:
    """Whether ``cls``'s ``_next_due_after`` belongs to its step rule: defined by the same
    class as ``_due_at_step``, and ``due_at_step`` not overridden."""
    known = _KNOWS_NEXT_DUE.get(cls)
    if known is None:
        rule = _defining_class(cls, "_due_at_step")
        known = _KNOWS_NEXT_DUE[cls] = (_defining_class(cls, "_next_due_after") is rule and rule is not Schedule
                                        and _defining_class(cls, "due_at_step") is Schedule)
    return known


ScheduleLike = Union[Schedule, int, Sequence[int], None]


def as_schedule(value: ScheduleLike, default: Optional[Schedule] = None) -> Schedule:
    """Normalise a user's ``schedule=`` argument.

    ``None`` gives ``default`` (log-spaced steps if none), an ``int`` n gives
    :class:`EveryNSteps` (n), a list of ints gives :class:`StepList`.
    """
    if value is None:
        return default if default is not None else LogSpacedSteps()
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool):
        raise TypeError("schedule must be a Schedule, an int (every n steps) or a list of steps, got a bool")
    if isinstance(value, int):
        return EveryNSteps(value)
    if isinstance(value, (list, tuple)):
        return StepList(value)
    raise TypeError(
        f"schedule must be a lightning_ntk.schedule.Schedule (EveryNSteps, EveryNEpochs, LogSpacedSteps, StepList), "
        f"an int (every n steps) or a list of steps; got {type(value).__name__}"
    )
