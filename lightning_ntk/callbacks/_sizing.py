"""Sizing a monitor's default work to the budget at train start (:mod:`lightning_ntk.sizing`).

At train start, after its probe is drawn at the default size and its tables worked out,
a monitor with a budget governor predicts the cost of one snapshot from timings of its own
work at two small sizes (:meth:`Monitor.cost_model`), and the session predicts the
training's length (steps × the time of one training step, measured on a batch of the
training batch size). When the user left the size to the monitor, the largest of the
default, half of it, a quarter, ... (not below the monitor's floor) whose first and last
snapshots fit the monitor's share of the budget is drawn instead; a size the user gave is
kept, with a warning when its forced snapshots are predicted over the share. The choice is
recorded in the monitor's ``config`` (``sizing``) and explained in a log line.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .._hygiene import measurement_mode, module_device
from ..probe import ProbeSet
from ..sizing import FORCED_SHARE, FORCED_SNAPSHOTS, CostModel, TrainingLength, choose_size, forced_allowance, timed
from ..task import predictions_in

if TYPE_CHECKING:  # pragma: no cover
    from ._base import Monitor

_log = logging.getLogger("lightning_ntk")


class BudgetError(RuntimeError):
    """A monitor's first and last snapshots at its smallest size are predicted to take longer
    than the training itself: refused (the session records it and training goes on)."""


def probe_head(probe: ProbeSet, n: int) -> ProbeSet:
    """The first ``n`` examples of a probe (for timing)."""
    rows = slice(0, n)
    return ProbeSet(probe.name, probe.x[rows], probe.y[rows], probe.index[rows], probe.source, dict(probe.meta),
                    {k: v[rows] for k, v in probe.extras.items()}, probe.layout)


def timing_sizes(n: int, small: int = 8) -> Optional[tuple]:
    """Two sizes to time at (``small`` and twice it, within ``n``), or None for a tiny probe."""
    if n < 2:
        return None
    n2 = min(2 * small, n)
    return (max(1, n2 // 2), n2)


def step_seconds(trainer: Any, pl_module: Any, sample: ProbeSet,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one training step, predicted from a forward and backward pass of the
    module's outputs on the sample, scaled to the training batch size. Never the user's
    ``training_step`` (it may step optimisers or update queues); eval mode, RNG and modes
    restored, gradients by ``torch.autograd.grad`` (``.grad`` untouched); the loss and the
    optimiser's update are not counted."""
    loader = getattr(trainer, "train_dataloader", None)
    batch_size = getattr(loader, "batch_size", None) or len(sample)
    n = min(len(sample), int(batch_size))
    x = sample.x[:n].to(module_device(pl_module))
    params = [p for p in pl_module.parameters() if p.requires_grad]

    def step() -> None:
        out = predictions_in(pl_module(x))
        if out is not None and params and out.requires_grad:
            torch.autograd.grad(out.float().sum(), params, allow_unused=True)

    with measurement_mode(pl_module):
        seconds = timed(step, clock)
    return seconds * int(batch_size) / n


def training_length(trainer: Any, pl_module: Any, sample: ProbeSet,
                    clock: Callable[[], float] = time.perf_counter) -> TrainingLength:
    """Optimiser steps (``trainer.estimated_stepping_batches``, None when unknown) and the
    seconds of each: one batch's forward and backward times ``accumulate_grad_batches``."""
    try:
        steps = float(getattr(trainer, "estimated_stepping_batches", math.inf))
    except Exception:  # noqa: BLE001 - Lightning raises when it cannot tell (iterable data, no max_steps)
        steps = math.inf
    batches = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    return TrainingLength(int(steps) if math.isfinite(steps) else None,
                          batches * step_seconds(trainer, pl_module, sample, clock))


def size_to_budget(monitor: "Monitor", trainer: Any, pl_module: Any) -> None:
    """Decide the monitor's size for this fit (see the module docstring); may redraw its
    probes at a smaller size and work its tables out again. The time it takes counts
    against the budget."""
    governor, probe = monitor._governor, monitor.probe_set
    if governor is None or probe is None or not monitor.sizable_probe():
        return
    started = governor.clock()
    try:
        _size(monitor, governor, probe, trainer, pl_module)
    finally:
        governor.charge(governor.clock() - started)


def _size(monitor: "Monitor", governor: Any, probe: ProbeSet, trainer: Any, pl_module: Any) -> None:
    owner, n, user_size = type(monitor).__name__, len(probe), not monitor.default_size()
    if (monitor._loaded_state or {}).get("probe_index") is not None and not user_size:
        monitor.sizing = {"size": n, "work": dict(monitor._loaded_state.get("work") or {}),
                          "note": "resumed: the size (and lighter work) the checkpoint recorded"}
        return
    try:
        with measurement_mode(pl_module):
            cost = monitor.cost_model(trainer, pl_module, probe)
        length = TrainingLength(None, math.nan) if cost is None else \
            monitor._session.training_length(trainer, pl_module, probe, governor.clock)
    except Exception as exc:  # noqa: BLE001 - a size it cannot predict is kept, never a refusal
        _log.warning("%s: could not predict its snapshot cost (%s: %s); keeping its size %d", owner,
                     type(exc).__name__, exc, n)
        cost, length = None, TrainingLength(None, math.nan)
    if length.seconds is None:
        cost = None
        monitor.sizing = {"size": n, "note": "training length or cost unknown: the size is kept"}
    allowance = 0.0 if cost is None else forced_allowance(governor.budget, float(length.seconds),
                                                          monitor._session.snapshot_monitors())
    if cost is None:
        size = n
    elif user_size:
        size, fits = n, FORCED_SNAPSHOTS * cost.predict(n) <= allowance
        if not fits:
            warnings.warn(f"{owner}: the size you gave ({n} examples) is predicted to take {cost.predict(n):.1f} s per "
                          f"snapshot; its first and last snapshots alone exceed this monitor's share of the budget "
                          f"({allowance:.1f} s of a {length.seconds:.0f} s training). Leave the size to the monitor or "
                          "pass a larger budget=", RuntimeWarning, stacklevel=2)
        monitor.sizing = {"size": n, "user_size": True, "predicted_seconds": cost.predict(n),
                          "allowance_seconds": allowance, "fits": fits}
    else:
        choice = choose_size(cost, allowance, default=n, floor=min(n, monitor.size_floor),
                             lighter=monitor.lighter_work(cost))
        size = choice.size
        monitor.sizing = dict(choice.to_config(), user_size=False)
        _log.info("%s: %s (a %.0f s training, budget %g)", owner, choice.explain(monitor.size_name), length.seconds,
                  governor.budget)
    if cost is not None:
        monitor.sizing.update(cost_model=cost.to_config(), training=length.to_config())
    refuse = False
    if not user_size and cost is not None and not monitor.sizing.get("fits", True):
        refuse = _outlasts_training(monitor, trainer, pl_module, probe, cost, length, governor)
    if not user_size:
        # every rank draws the same examples: rank 0's decision
        size, fits, work, per_snapshot, seconds, refuse = monitor._session.collectives.broadcast_object(
            (size, monitor.sizing.get("fits", True), monitor.sizing.get("work") or {},
             monitor.sizing.get("predicted_seconds"), monitor.sizing.get("training", {}).get("seconds"), refuse))
        size = int(size)
        monitor.sizing["work"] = dict(work)
        monitor.apply_work(dict(work))
        if not fits and per_snapshot is not None:
            predicted, seconds = FORCED_SNAPSHOTS * float(per_snapshot), float(seconds)
            needed = predicted / (FORCED_SHARE * seconds / monitor._session.snapshot_monitors())
            smallest = f"its smallest {monitor.size_name} ({size}{''.join(f', {k}={v}' for k, v in work.items())})"
            if refuse:
                monitor.sizing["refused"] = True
                raise BudgetError(
                    f"{owner}: at {smallest} its first and last snapshots are predicted to take {predicted:.2f} s, "
                    f"longer than the whole training ({seconds:.1f} s predicted; budget {governor.budget:g}): it is "
                    f"off for this fit. Pass budget={min(needed, 1.0):.2g} (or budget=False) to measure anyway, give "
                    f"a size of your own ({monitor.size_argument}), or leave it out of short trainings")
            warnings.warn(
                f"{owner}: this training is short for it: at {smallest} its first and last snapshots are predicted "
                f"to take {predicted:.2f} s, over its share of the budget ({allowance:.2f} s of budget "
                f"{governor.budget:g} x a {seconds:.0f} s training); they are taken all the same (they anchor "
                f"its curves). Pass budget={min(needed, 1.0):.2g} to make room for them, or leave the monitor out of "
                "short trainings", RuntimeWarning, stacklevel=2)
        if size < n or work:  # probes drawn again, tables worked out again (their attributes name the work)
            try:
                monitor.resize_probes(trainer, pl_module, size)
            except Exception as exc:  # noqa: BLE001 - e.g. too few examples per class for its probes
                _log.warning("%s: the probes at %d examples do not serve it (%s); keeping %d", owner, size, exc, n)
                monitor.resize_probes(trainer, pl_module, n)
                monitor.sizing.update(size=n, note=f"sized {size} refused by the monitor: {exc}")


def _outlasts_training(monitor: "Monitor", trainer: Any, pl_module: Any, probe: ProbeSet, cost: CostModel,
                       length: TrainingLength, governor: Any) -> bool:
    """Whether the first and last snapshots sizing chose would take longer than the training
    itself (it would more than double it: a margin for the training's low prediction),
    confirmed by timing both once more, so that a stall of the machine during one timing
    does not switch the monitor off: the smaller snapshot cost and the longer training
    count. ``monitor.sizing`` keeps the confirmed prediction."""
    sizing = monitor.sizing
    predicted = FORCED_SNAPSHOTS * float(sizing["predicted_seconds"])
    if predicted <= float(length.seconds):
        return False
    with measurement_mode(pl_module):
        fresh = monitor.cost_model(trainer, pl_module, probe)
    again = training_length(trainer, pl_module, probe, governor.clock)
    scale = 1.0 if fresh is None else min(1.0, fresh.predict(sizing["size"]) / max(cost.predict(sizing["size"]), 1e-12))
    seconds = max(float(length.seconds), float(again.seconds or 0.0))
    per_snapshot = float(sizing["predicted_seconds"]) * scale
    sizing.update(predicted_seconds=per_snapshot, fits=FORCED_SNAPSHOTS * per_snapshot <= sizing["allowance_seconds"],
                  training=dict(sizing["training"], seconds=seconds, confirmed=True))
    return FORCED_SNAPSHOTS * per_snapshot > seconds


def linear_cost(measure: Any, probe: ProbeSet, small: int = 8, fixed: float = 0.0, pairs: bool = False,
                clock: Callable[[], float] = time.perf_counter) -> Optional[CostModel]:
    """A :class:`CostModel` from timing ``measure(sub_probe)`` on the probe's first examples
    at two small sizes."""
    sizes = timing_sizes(len(probe), small)
    if sizes is None:
        return None
    # one call per size: a second would double what sizing costs (the first call's one-off
    # costs, if any, make the prediction larger, never smaller)
    seconds = [timed(lambda n=n: measure(probe_head(probe, n)), clock, repeats=1) for n in sizes]
    return CostModel.from_timings(sizes, seconds, pairs=pairs, fixed=fixed)
