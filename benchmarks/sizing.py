"""Snapshots sized to the budget: the A/B wall time of ordinary trainings with every monitor.

    .venv/bin/python benchmarks/sizing.py                       # cnn, resnet and demo, 3 pairs each
    .venv/bin/python benchmarks/sizing.py --cases resnet --pairs 5
    .venv/bin/python benchmarks/sizing.py --cases long          # budget=0.02 on a ~3-minute training

Each case trains the same model from the same seed without monitors and with all six
monitors given only ``path=`` (every default: the shared 5% governor, sizes chosen at train
start), alternating (bare, monitored) pairs; the table gives the median wall time of
``trainer.fit`` of each, the ratio of the medians and the ratio of each pair, the same for
the process's CPU seconds (a steadier measure when other jobs share the machine; with
``--threads 1`` no thread waits spinning), and what the sizing chose for each monitor
(size, lighter work, predicted seconds per snapshot, its allowance; refused monitors).

Cases (CPU, 2 threads, ``deterministic=True``, no logger, checkpointing or progress bar):

* ``cnn``: the digits CNN at width 64 (lightning_ntk.demo.DigitsCNN(width=64)), 80 epochs,
  batch 64 (~40 s bare): the issue's target is at most 5% overhead;
* ``resnet``: a small ResNet (BatchNorm, three stages of one basic block, 16-32-64
  channels) on 1,024 synthetic 3x32x32 images of 10 classes, 10 epochs, batch 64 (~10 s):
  target at most max(10%, 5 s);
* ``demo``: the demo's own configuration (``lightning_ntk.demo.demo_monitors``, 100 epochs):
  target at most 1.15x, with at least two points per curve;
* ``long``: the digits CNN at width 64 for ~3 minutes, with ``budget=0.02`` (shared):
  target at most 2%.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_ntk import callbacks  # noqa: E402
from lightning_ntk.callbacks import set_default_budget  # noqa: E402
from lightning_ntk.callbacks._lightning import default_namespace  # noqa: E402
from lightning_ntk.demo import DEMO_BUDGET, DEMO_EPOCHS, DigitsCNN, demo_monitors, digits_split, make_lightning_module  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class SmallResNet(nn.Module):
    """A three-stage ResNet (16-32-64 channels, one basic block each) for 3x32x32 images."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def synthetic_images(n: int = 1024, classes: int = 10, seed: int = 0) -> TensorDataset:
    """Class templates (smooth random patterns) plus noise: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.nn.functional.interpolate(torch.randn(classes, 3, 8, 8, generator=g), size=32, mode="bilinear")
    y = torch.arange(n) % classes
    x = templates[y] + 1.5 * torch.randn(n, 3, 32, 32, generator=g)
    return TensorDataset(x, y)


def every_monitor(path: str) -> List[Any]:
    return [callbacks.ProbeMetricsMonitor(path), callbacks.NTKMonitor(path), callbacks.SharpnessMonitor(path),
            callbacks.ForgettingMonitor(path), callbacks.ActivationCodeMonitor(path),
            callbacks.RepresentationMonitor(path)]


def fit(case: str, monitored: bool, epochs: int, tmp: str) -> Tuple[float, float, List[Any]]:
    L = default_namespace()
    torch.manual_seed(0)
    path = os.path.join(tmp, f"{case}.h5")
    if os.path.exists(path):
        os.remove(path)
    if case == "resnet":
        train = synthetic_images()
        val = synthetic_images(256, seed=1)
        module = make_lightning_module(SmallResNet(), lr=0.05, namespace=L)
    else:
        train, val = digits_split()
        module = make_lightning_module(DigitsCNN(width=16 if case == "demo" else 64), namespace=L)
    monitors: List[Any] = []
    if monitored:
        monitors = demo_monitors(path) if case == "demo" else every_monitor(path)
    trainer = L.Trainer(max_epochs=epochs, callbacks=monitors, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        deterministic=True)
    started, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256))
    return time.perf_counter() - started, time.process_time() - cpu, monitors


def describe(monitors: List[Any]) -> List[str]:
    lines = []
    for m in monitors:
        sizing = getattr(m, "sizing", {}) or {}
        taken = m.timings["snapshots"]
        if sizing.get("size") is not None and "predicted_seconds" in sizing:
            work = "".join(f" {k}={v}" for k, v in (sizing.get("work") or {}).items())
            lines.append(f"  {type(m).__name__:24s} size {sizing['size']:5d} (default {sizing.get('default', '-')}){work}, "
                         f"predicted {sizing['predicted_seconds']:.2f} s/snapshot, allowance "
                         f"{sizing['allowance_seconds']:.2f} s for two; {taken} snapshots, "
                         f"{m.timings['snapshot_s']:.2f} s measured" + (" REFUSED" if sizing.get("refused") else ""))
        else:
            lines.append(f"  {type(m).__name__:24s} {taken} snapshots, {m.timings['snapshot_s']:.2f} s measured"
                         + (f" ({sizing.get('note')})" if sizing.get("note") else ""))
    return lines


def run_case(case: str, pairs: int, epochs: int, budget: Optional[float]) -> None:
    previous = set_default_budget(budget) if budget is not None else None
    bare, monitored, ratios, cpu_bare, cpu_monitored = [], [], [], [], []
    last: List[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(pairs):
            b, cb, _ = fit(case, False, epochs, tmp)
            m, cm, last = fit(case, True, epochs, tmp)
            bare.append(b)
            monitored.append(m)
            ratios.append(m / b)
            cpu_bare.append(cb)
            cpu_monitored.append(cm)
    if budget is not None:
        set_default_budget(previous)
    mb, mm = statistics.median(bare), statistics.median(monitored)
    print(f"\n{case}: {epochs} epochs, budget {budget if budget is not None else 'default (0.05)'}, {pairs} pairs")
    print(f"  bare      median {mb:7.2f} s   runs {', '.join(f'{t:.2f}' for t in bare)}")
    print(f"  monitored median {mm:7.2f} s   runs {', '.join(f'{t:.2f}' for t in monitored)}")
    print(f"  ratio of medians {mm / mb:.3f} (+{mm - mb:.2f} s); pair ratios {', '.join(f'{r:.3f}' for r in ratios)}")
    cb, cm = statistics.median(cpu_bare), statistics.median(cpu_monitored)
    print(f"  process CPU seconds: bare median {cb:.2f}, monitored {cm:.2f}, ratio {cm / cb:.3f} (less sensitive "
          "to other jobs on the machine than wall time)")
    print("  what the sizing chose (last monitored run):")
    for line in describe(last):
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["cnn", "resnet", "demo"],
                        choices=["cnn", "resnet", "demo", "long"])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long-epochs", type=int, default=360, help="epochs of the long case (~3 minutes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, numpy {np.__version__}")
    plans: Dict[str, Callable[[], None]] = {
        "cnn": lambda: run_case("cnn", args.pairs, 80, None),
        "resnet": lambda: run_case("resnet", args.pairs, 10, None),
        "demo": lambda: run_case("demo", args.pairs, DEMO_EPOCHS, DEMO_BUDGET),
        "long": lambda: run_case("long", max(1, args.pairs // 3), args.long_epochs, 0.02),
    }
    for case in args.cases:
        plans[case]()


if __name__ == "__main__":
    main()
