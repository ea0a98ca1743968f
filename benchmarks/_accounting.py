"""In-run accounting of what monitors cost a training (benchmarks only).

Comparing the wall time of a training with monitors against one without cannot resolve a
few percent on a shared machine: the same training varies by ±10% between runs. The
accounting here measures, inside the run with monitors, the time the monitors take:

* every callback dispatch of the Trainer (Lightning's ``_call_callback_hooks``, whose
  time includes Lightning's own per-callback dispatch work), minus what the same
  dispatches cost without monitors (per hook name, measured in the baseline runs);
* ``ForgettingMonitor``'s forward hook (it runs inside ``training_step``);
* the run file's writer thread (its CPU time, reported separately: it runs beside the
  training thread, on another core when one is free).

Not counted: recording the sampler's indices (a generator step per example and a list
append per batch, inside the DataLoader's iteration), the ``process_dataloader`` wrapper
(once per loader), and the longer path ``Module.__call__``
takes when the module has a forward hook (``ForgettingMonitor``'s: ~3.4 µs per call of
the LightningModule in a tight loop on 2026-12-07, about 0.07% of a 5 ms demo step).

Overhead on the training thread = accounted time / (wall time - accounted time), both from
the same run, so a slower or faster machine moves numerator and denominator together.
"""
from __future__ import annotations

import collections
import importlib
import time
from typing import Any, Dict, List, Tuple

_CALL_MODULES = ("lightning.pytorch.trainer.call", "pytorch_lightning.trainer.call")


class HookClock:
    """Times Lightning's callback dispatches (per hook name) and ForgettingMonitor's forward hook."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = collections.Counter()
        self.calls: Dict[str, int] = collections.Counter()
        self.capture_s = 0.0
        self._patched: List[Tuple[Any, str, Any]] = []

    def install(self) -> "HookClock":
        clock = self
        for name in _CALL_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            original = module._call_callback_hooks

            def timed(trainer: Any, hook_name: str, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return _original(trainer, hook_name, *args, **kwargs)
                finally:
                    clock.seconds[hook_name] += time.perf_counter() - started
                    clock.calls[hook_name] += 1

            module._call_callback_hooks = timed
            self._patched.append((module, "_call_callback_hooks", original))
        from lightning_ntk.callbacks._capture import LogitsCapture

        capture = LogitsCapture._hook

        def timed_capture(recorder: Any, *args: Any) -> None:
            started = time.perf_counter()
            try:
                capture(recorder, *args)
            finally:
                clock.capture_s += time.perf_counter() - started

        LogitsCapture._hook = timed_capture
        self._patched.append((LogitsCapture, "_hook", capture))
        return self

    def remove(self) -> None:
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched = []

    def reset(self) -> None:
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        self.capture_s = 0.0

    def snapshot(self) -> Dict[str, Any]:
        """This run's dispatch times and counts (call after the run, then :meth:`reset`)."""
        return {"seconds": dict(self.seconds), "calls": dict(self.calls), "capture_s": self.capture_s}


def per_call_baseline(runs: List[Dict[str, Any]]) -> Dict[str, float]:
    """Median seconds per dispatch of each hook over runs without monitors."""
    import statistics

    per_hook: Dict[str, List[float]] = collections.defaultdict(list)
    for run in runs:
        for hook, seconds in run["seconds"].items():
            per_hook[hook].append(seconds / max(1, run["calls"][hook]))
    return {hook: statistics.median(values) for hook, values in per_hook.items()}


def accounted_seconds(run: Dict[str, Any], baseline: Dict[str, float]) -> float:
    """Seconds the monitors took on the training thread in ``run``: its dispatch times less
    what they cost without monitors, plus the forward hook."""
    total = run["capture_s"]
    for hook, seconds in run["seconds"].items():
        # Signed: for hooks the monitors leave out of the dispatch the difference is noise
        # around a small positive cost, which clipping at zero would bias upwards.
        total += seconds - run["calls"][hook] * baseline.get(hook, 0.0)
    return total


def per_hook(runs: List[Dict[str, Any]], baseline: Dict[str, float]) -> Dict[str, float]:
    """Median over ``runs`` of each hook's accounted share of the run's time (the forward
    hook as ``forward hook``); hooks under 0.01% in every run are left out."""
    import statistics

    shares: Dict[str, List[float]] = collections.defaultdict(list)
    for run in runs:
        accounted = accounted_seconds(run, baseline)
        shares["forward hook"].append(share_of_run(run["capture_s"], run["wall"], accounted))
        for hook, seconds in run["seconds"].items():
            shares[hook].append(share_of_run(seconds - run["calls"][hook] * baseline.get(hook, 0.0), run["wall"],
                                             accounted))
    return {hook: statistics.median(v) for hook, v in sorted(shares.items(), key=lambda kv: -statistics.median(kv[1]))
            if max(abs(x) for x in v) >= 1e-4}


def share_of_run(seconds: float, wall: float, accounted: float) -> float:
    """``seconds`` as a share of the run's time without the monitors: / (wall - accounted)."""
    return seconds / max(1e-12, wall - accounted)


def overhead_share(accounted: float, wall: float) -> float:
    """accounted / (wall - accounted): the monitors' overhead over the same run without them."""
    return share_of_run(accounted, wall, accounted)
