"""Overhead of the monitors on the demo training, as ratios to the same training without them.

    .venv/bin/python benchmarks/overhead.py                  # the demo training (100 epochs)
    .venv/bin/python benchmarks/overhead.py --quick          # all six monitors only
    .venv/bin/python benchmarks/overhead.py --long-epochs 1500   # and a 1500-epoch training
    .venv/bin/python benchmarks/overhead.py --long-epochs 2000 --long-only   # that section alone

The training: ``lightning_ntk.demo`` (DigitsCNN on scikit-learn digits, 1440 training
images, batch 64, SGD lr 0.05 momentum 0.9, a validation pass per epoch), CPU, 2 threads,
``deterministic=True``, no logger, no checkpointing, no progress bar.

Configurations (each monitor at its default settings: only ``path`` given):

* ``none``: no monitor (the baseline, run before, between and after the others; the
  median of its runs is the denominator);
* each monitor alone, with the default governor (a budget of 5% of training time shared
  by the monitors of a Trainer) and without (``budget=False``: every scheduled snapshot);
* all six monitors together: default governor (5%), ``budget=0.02`` (shared, via
  ``set_default_budget``) and no governor.

The demo trains for ``lightning_ntk.demo.DEMO_EPOCHS`` = 100 epochs (2,300 steps of
2.5-5.5 ms, 6-14 s, depending on the day on this shared machine): still shorter than needed to pay for the first and last snapshots of the
expensive monitors, which the governor always takes (they anchor every curve) and which
cost a few seconds at the default settings (a 256-example NTK, Hessian eigenvalues on
1024 examples, codes and few-shot probes). The governor keeps instrumentation ≤ budget ×
training time only once training has paid for them, so an optional second section
(``--long-epochs N``) runs the same model for N epochs: the baseline before and after,
all six monitors with the 5% governor and with ``budget=0.02``.

Each configuration is run once, right after a baseline run; its overhead is against the
median of all baseline runs (the machine's drift shows in their spread).

Columns: wall time of ``trainer.fit``; overhead = time / baseline − 1 (an A/B ratio: on a
shared machine the baseline alone spreads by ±10% or more, see its runs); "acct %" = the
monitors' cost accounted inside the run (``_accounting.py``: Lightning's dispatches of their
hooks and the hooks themselves, snapshots included, less what the same dispatches cost
without monitors, plus ForgettingMonitor's forward hook) over the same run's time without
it; "wcpu %" = the CPU time of the run file's writer thread (beside the training thread)
over that same time; snapshots taken
and skipped by the governor; "snap s" = seconds the snapshots took on the training
thread (measurement and hand-over to the store, the governor's account); as percentages
of the snapshot seconds: "hand %" = the store's time on the training thread at each
snapshot (``Table.append`` and ``flush_async``), "sync %" = the synchronous flushes
(the step-0 rows before the file is published at the first batch, checkpoints, the wait
for the last rows at the end of training), "writer %" = the store's writer thread
(HDF5 write, flush, fsync: off the training thread). Forgetting works on every batch (no snapshots), so its
cost shows in the "acct %" and "wcpu %" columns, not in the snapshot columns.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_ntk import callbacks  # noqa: E402
from lightning_ntk.callbacks import set_default_budget  # noqa: E402
from lightning_ntk.callbacks._lightning import default_namespace  # noqa: E402
from lightning_ntk.demo import DEMO_EPOCHS, DigitsCNN, digits_split, make_lightning_module  # noqa: E402
from lightning_ntk.store import RunStore  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _accounting import HookClock, accounted_seconds, overhead_share, per_call_baseline, share_of_run  # noqa: E402

#: Times every callback dispatch and ForgettingMonitor's forward hook (see _accounting.py).
CLOCK = HookClock()

MONITORS = {
    "probe_metrics": callbacks.ProbeMetricsMonitor,
    "ntk": callbacks.NTKMonitor,
    "sharpness": callbacks.SharpnessMonitor,
    "forgetting": callbacks.ForgettingMonitor,
    "codes": callbacks.ActivationCodeMonitor,
    "representations": callbacks.RepresentationMonitor,
}


def train(path: Optional[str], names: List[str], budget: Any, epochs: int, seed: int = 0) -> Dict[str, Any]:
    """One training; ``budget``: "default" (the shared 5% governor), a float (shared) or False."""
    L = default_namespace()
    torch.manual_seed(seed)
    train_set, val_set = digits_split(seed=seed)
    previous = set_default_budget(0.05)
    try:
        kwargs: Dict[str, Any] = {}
        if budget is False:
            kwargs["budget"] = False
        elif budget != "default":
            set_default_budget(float(budget))
        monitors = [MONITORS[name](path, overwrite=True, **kwargs) for name in names]
        module = make_lightning_module(DigitsCNN(), namespace=L)
        trainer = L.Trainer(max_epochs=epochs, callbacks=monitors, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                            deterministic=True)
        train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
        val_loader = DataLoader(val_set, batch_size=256)
        CLOCK.reset()
        started = time.perf_counter()
        trainer.fit(module, train_loader, val_loader)
        seconds = time.perf_counter() - started
    finally:
        set_default_budget(previous)
    out: Dict[str, Any] = {"seconds": seconds, "snapshots": 0, "snapshot_s": 0.0, "store_s": 0.0, "skipped": 0,
                           "hooks": dict(CLOCK.snapshot(), wall=seconds)}
    for monitor in monitors:
        out["snapshots"] += int(monitor.timings["snapshots"])
        out["snapshot_s"] += monitor.timings["snapshot_s"]
        out["store_s"] += monitor.timings["store_s"]
        governor = monitor._governor
        if governor is not None:
            out["skipped"] += governor.skipped(monitor.group)
    stats = RunStore.closed_stats.get(os.path.realpath(path)) if path else None
    out["writer_s"] = stats["background_s"] if stats else 0.0
    out["writer_cpu_s"] = stats["background_cpu_s"] if stats else 0.0
    out["blocking_s"] = stats["blocking_s"] if stats else 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="epochs of the first section (the demo's)")
    parser.add_argument("--long-epochs", type=int, default=0, help="epochs of the long section (0: skip it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="all monitors only (no per-monitor rows)")
    parser.add_argument("--long-only", action="store_true",
                        help="with --long-epochs: the long section only (and the demo's baselines, for the dispatch costs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = []
    if args.long_only and not args.long_epochs:
        parser.error("--long-only needs --long-epochs N")
    if not args.long_only:
        if not args.quick:
            for name in MONITORS:
                configs.append((f"{name} (5% governor)", [name], "default"))
                configs.append((f"{name} (no governor)", [name], False))
        configs += [("all six (5% governor)", list(MONITORS), "default"),
                    ("all six (budget=0.02)", list(MONITORS), 0.02),
                    ("all six (no governor)", list(MONITORS), False)]
    print(f"# overhead on the demo training: {args.epochs} epochs, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    CLOCK.install()
    baseline: List[Dict[str, Any]] = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train(None, [], "default", 1)  # warm-up: imports, first-call costs
        baseline.append(train(None, [], "default", args.epochs))
        for i, (label, names, budget) in enumerate(configs):
            path = os.path.join(tmp, f"run{i}.h5")
            rows.append((label, train(path, names, budget, args.epochs)))
            baseline.append(train(None, [], "default", args.epochs))
            print(f"  done: {label} ({rows[-1][1]['seconds']:.1f} s)", file=sys.stderr, flush=True)
        baseline.append(train(None, [], "default", args.epochs))
    if rows:
        print_table(f"{args.epochs} epochs (the demo)", baseline, rows)
    if args.long_epochs and not args.quick:
        long_configs = [("all six (5% governor)", "default"), ("all six (budget=0.02)", 0.02)]
        long_baseline, rows = [], []
        with tempfile.TemporaryDirectory() as tmp:
            long_baseline.append(train(None, [], "default", args.long_epochs))
            for i, (label, budget) in enumerate(long_configs):
                rows.append((label, train(os.path.join(tmp, f"long{i}.h5"), list(MONITORS), budget, args.long_epochs)))
                print(f"  done: long {label} ({rows[-1][1]['seconds']:.1f} s)", file=sys.stderr, flush=True)
            long_baseline.append(train(None, [], "default", args.long_epochs))
        # Per-dispatch costs without monitors do not depend on the training's length: the
        # demo section's baselines (more runs) give them.
        print_table(f"{args.long_epochs} epochs (long)", long_baseline, rows, dispatch_baseline=baseline)
    CLOCK.remove()


def print_table(title: str, baseline: List[Dict[str, Any]], rows: List[Any],
                dispatch_baseline: Optional[List[Dict[str, Any]]] = None) -> None:
    walls = [b["seconds"] for b in baseline]
    base = statistics.median(walls)
    per_call = per_call_baseline([b["hooks"] for b in (dispatch_baseline or baseline)])
    print(f"\n## {title}: baseline (no monitor) median {base:.2f} s over {len(walls)} runs "
          f"({', '.join(f'{b:.2f}' for b in walls)}); spread ±{(max(walls) - min(walls)) / 2 / base:.1%}")
    head = (f"{'configuration':<34} {'time s':>7} {'overhead':>9} {'acct %':>7} {'wcpu %':>7} {'snaps':>6} "
            f"{'skipped':>7} {'snap s':>7} {'hand %':>7} {'sync %':>7} {'writer %':>9}")
    print(head)
    print("-" * len(head))
    for label, r in rows:
        snap = r["snapshot_s"]
        pct = {k: f"{100 * r[k] / snap:.2f}" if snap else "-" for k in ("store_s", "blocking_s", "writer_s")}
        accounted = accounted_seconds(r["hooks"], per_call)
        thread = overhead_share(accounted, r["seconds"])
        writer_cpu = share_of_run(r["writer_cpu_s"], r["seconds"], accounted)
        print(f"{label:<34} {r['seconds']:>7.2f} {r['seconds'] / base - 1:>+9.1%} {100 * thread:>7.2f} "
              f"{100 * writer_cpu:>7.2f} {r['snapshots']:>6} {r['skipped']:>7} {snap:>7.2f} {pct['store_s']:>7} "
              f"{pct['blocking_s']:>7} {pct['writer_s']:>9}", flush=True)


if __name__ == "__main__":
    main()
