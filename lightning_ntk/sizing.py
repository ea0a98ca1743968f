"""Snapshots sized to the budget: predicted costs and the largest default size that fits.

The budget governor (:mod:`lightning_ntk.budget`) skips discretionary snapshots, but the
first and the last snapshot of every monitor are always taken, so their cost is what the
defaults cost. Before the first snapshot each monitor times its unit of work on this model
and device at two small sizes and fits a :class:`CostModel`; the training's length is
predicted from its number of steps and the measured time of one training step
(:class:`TrainingLength`); :func:`choose_size` then halves a monitor's default size until
its forced snapshots fit its share of the budget (:func:`forced_allowance`), down to a floor
below which the quantity would mean little. When even the floor is predicted over the
share, the monitor's lighter settings of the work it does per snapshot (fewer few-shot
episodes, fewer k-means restarts, a looser Lanczos tolerance: :class:`LighterWork`) are
tried in turn at the floor;
when none fits, the lightest is used and a warning gives the budget that would fit it
(the first and last snapshots anchor every curve: the training pays for them however
short it is), unless those two snapshots would take longer than the training itself:
then the monitor is refused for that fit (the callbacks' ``BudgetError``).
Sizes the user gave are never changed. Clocks are injectable for tests.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

#: Share of the budget kept for the forced (first and last) snapshots of all monitors; the
#: rest pays for the discretionary snapshots in between.
FORCED_SHARE = 0.5
#: Forced snapshots per monitor: the first and the last.
FORCED_SNAPSHOTS = 2


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds of one snapshot of ``n`` examples: fixed + per_example·n + per_pair·n²."""

    fixed: float = 0.0
    per_example: float = 0.0
    per_pair: float = 0.0

    def predict(self, n: int) -> float:
        return self.fixed + self.per_example * n + self.per_pair * n * n

    @classmethod
    def from_timings(cls, sizes: Sequence[int], seconds: Sequence[float], *, pairs: bool = False,
                     fixed: float = 0.0) -> "CostModel":
        """The model through two timings (n1 < n2): linear in n (``pairs=False``), or
        per_example·n + per_pair·n² (``pairs=True``, e.g. a kernel's Gram matrix); ``fixed``
        seconds are added (e.g. classifiers whose cost does not depend on n). Negative
        coefficients from noisy timings are clipped to a line through the origin and the
        larger timing, so predictions never fall with n."""
        (n1, n2), (t1, t2) = sizes, seconds
        if not 0 < n1 < n2:
            raise ValueError(f"from_timings needs two sizes 0 < n1 < n2, got {sizes}")
        t1, t2 = max(float(t1), 0.0), max(float(t2), 0.0)
        if pairs:
            # t = a n + b n²: b from the two equations, a from the first
            b = (t2 / n2 - t1 / n1) / (n2 - n1)
            a = t1 / n1 - b * n1
            if a < 0 or b < 0:
                return cls(fixed, max(t1 / n1, t2 / n2), 0.0)
            return cls(fixed, a, b)
        slope = (t2 - t1) / (n2 - n1)
        intercept = t1 - slope * n1
        if slope < 0 or intercept < 0:
            return cls(fixed, max(t1 / n1, t2 / n2), 0.0)
        return cls(fixed + intercept, slope, 0.0)

    def to_config(self) -> Dict[str, float]:
        return asdict(self)


def timed(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter, repeats: int = 2) -> float:
    """Seconds of ``fn()``: the fastest of ``repeats`` calls (the first may pay one-off costs)."""
    best = math.inf
    for _ in range(max(1, repeats)):
        started = clock()
        fn()
        best = min(best, clock() - started)
    return best


@dataclass(frozen=True)
class TrainingLength:
    """The training's predicted length: ``steps`` optimiser steps of ``step_seconds`` each
    (``steps`` None when the Trainer cannot tell, e.g. an iterable dataset without max_steps)."""

    steps: Optional[int]
    step_seconds: float

    @property
    def seconds(self) -> Optional[float]:
        return None if self.steps is None else self.steps * self.step_seconds

    def to_config(self) -> Dict[str, Any]:
        return {"steps": self.steps, "step_seconds": self.step_seconds, "seconds": self.seconds}


def forced_allowance(budget: float, training_seconds: float, monitors: int, fixed_seconds: float = 0.0) -> float:
    """Seconds the forced snapshots of one sized monitor may take: ``FORCED_SHARE`` of the
    budget's seconds over the training, less what the monitors that are not sized will
    spend (``fixed_seconds``), split evenly over the ``monitors`` sized ones."""
    if monitors < 1:
        raise ValueError(f"forced_allowance needs at least one monitor, got {monitors}")
    return max(0.0, FORCED_SHARE * budget * training_seconds - fixed_seconds) / monitors


@dataclass(frozen=True)
class LighterWork:
    """A lighter setting of a monitor's default work (e.g. ``{"episodes": 50}``) and its
    predicted snapshot cost by size."""

    settings: Dict[str, Any]
    cost: CostModel


@dataclass(frozen=True)
class SizeChoice:
    """What :func:`choose_size` decided: the size, the lighter settings taken (``work``,
    empty for the monitor's defaults), the predicted snapshot seconds, the allowance for the
    forced snapshots and whether they fit in it."""

    size: int
    default: int
    predicted_seconds: float
    allowance_seconds: float
    fits: bool
    work: Dict[str, Any] = field(default_factory=dict)

    def to_config(self) -> Dict[str, Any]:
        return asdict(self)

    def explain(self, what: str) -> str:
        change = f"{what} {self.size} (default {self.default})" if self.size != self.default else f"{what} {self.size}"
        if self.work:
            change += " with " + ", ".join(f"{k}={v}" for k, v in self.work.items())
        return (f"{change}: {FORCED_SNAPSHOTS} forced snapshots predicted at {self.predicted_seconds:.2f} s each, "
                f"allowance {self.allowance_seconds:.2f} s")


def choose_size(cost: CostModel, allowance: float, default: int, floor: int,
                lighter: Sequence[LighterWork] = ()) -> SizeChoice:
    """The largest of ``default``, ``default/2``, ``default/4``, ... (not below ``floor``) whose
    :data:`FORCED_SNAPSHOTS` snapshots are predicted to fit in ``allowance`` seconds. When
    the floor does not fit either, the ``lighter`` settings (lightest last) are tried in turn
    at the floor: the first that fits, else the lightest, marked as not fitting."""
    if not 0 < floor <= default:
        raise ValueError(f"choose_size needs 0 < floor <= default, got floor={floor}, default={default}")
    n = default
    while n > floor and FORCED_SNAPSHOTS * cost.predict(n) > allowance:
        n = max(floor, n // 2)
    work: Dict[str, Any] = {}
    predicted = cost.predict(n)
    for option in lighter:
        if FORCED_SNAPSHOTS * predicted <= allowance:
            break
        work, predicted = dict(option.settings), option.cost.predict(n)
    return SizeChoice(n, default, predicted, allowance, FORCED_SNAPSHOTS * predicted <= allowance, work)
