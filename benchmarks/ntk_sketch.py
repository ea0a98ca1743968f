"""Sketched eNTK benchmark: ``sketched_ntk`` against the exact trace kernel at C = 1,000 outputs.

    .venv/bin/python benchmarks/ntk_sketch.py                  # both models, m = 8 ... 256
    .venv/bin/python benchmarks/ntk_sketch.py --models mlp     # the MLP only (--seeds, --threads)

Cases (2 CPU threads, ``torch.set_num_threads(2)``, or ``--threads``; float32, eval mode,
x2 = x1, N = 64 probe examples, inputs ~ N(0, 1), weights from ``torch.manual_seed(0)``):

* mlp: MLP 64-256-1000 (ReLU);
* cnn: Conv2d 3->16 (3x3, pad 1), ReLU, max-pool 2, Conv2d 16->32 (3x3, pad 1), ReLU,
  max-pool 2, Linear 2048->1000, on 3x32x32 inputs.

Exact: ``empirical_ntk(model, x, kind="trace")`` (method auto; the method it picked is
printed), C backward passes per batch. Sketch: ``sketched_ntk(model, x, projections=m,
seed=s)`` for m = 8, 16, 32, 64, 128, 256 and seeds s = 0 .. S-1 (``--seeds``, default 10).
The sign matrices of one seed are nested (the rows for m = 8 are the first rows for m = 16),
so the rows of one seed are not independent across m; the seeds are.

Columns: "rel. error" = root mean square over the seeds of ||K_hat - K||_F / ||K||_F
against the exact kernel; "stored rel. se" = mean over the seeds of the result's
``relative_stderr`` (||stderr||_F / ||K_hat||_F, what a user sees without the exact
kernel); "distance" = mean over the seeds of Fort et al.'s kernel distance
S(K_hat, K) = 1 - <K_hat, K>_F / (||K_hat||_F ||K||_F) (0 for K_hat = c K: the part of the
error that is not a common scale, which kernel distances, alignments and eigenvectors see);
"sketch s" = minimum wall time of the S seeded calls (after one untimed warm-up call);
"exact s" = minimum of 3 exact calls after a warm-up, timed before the rows m = 8, 64 and
256 (taking turns with the sketches); "speed-up" = exact s / sketch s. Minima, not medians:
on a shared 2-core machine another process makes 2-thread calls several times slower at
random (OpenMP threads wait at barriers), and the minimum is the time without that.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_ntk.ntk import empirical_ntk, estimate_ntk_memory, sketched_ntk  # noqa: E402
from lightning_ntk.spectral import kernel_distance  # noqa: E402

THREADS = 2
N = 64
C = 1000
PROJECTIONS = (8, 16, 32, 64, 128, 256)
EXACT_BEFORE = (8, 64, 256)  # the rows before which one exact call is timed


def make_case(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, C))
        x = torch.randn(N, 64)
        label = "MLP 64-256-1000"
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 8 * 8, C),
        )
        x = torch.randn(N, 3, 32, 32)
        label = "CNN 3-16-32 conv, 32x32 in, 1000 out"
    else:
        raise KeyError(name)
    return label, model.eval(), x


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_case(name: str, seeds: int):
    label, model, x = make_case(name)
    method = estimate_ntk_memory(model, x, kind="trace").method
    exact = empirical_ntk(model, x, kind="trace")  # warm-up, and the reference
    norm = float(exact.norm())
    exact_times = []
    rows = []
    for m in PROJECTIONS:
        if m in EXACT_BEFORE:  # taking turns with the sketches: both see the same machine load
            exact_times.append(timed(lambda: empirical_ntk(model, x, kind="trace"))[1])
        sketched_ntk(model, x, projections=m, seed=10_000)  # warm-up, a seed not among the timed ones
        errors, stored, distances, sketch_times = [], [], [], []
        for s in range(seeds):
            result, dt = timed(lambda: sketched_ntk(model, x, projections=m, seed=s))  # noqa: B023
            sketch_times.append(dt)
            errors.append(float((result.kernel - exact).norm()) / norm)
            stored.append(result.relative_stderr)
            distances.append(kernel_distance(result.kernel, exact))
        rms = (sum(e * e for e in errors) / len(errors)) ** 0.5
        rows.append((m, rms, sum(stored) / len(stored), sum(distances) / len(distances),
                     min(sketch_times)))
    exact_s = min(exact_times)
    return label, method, [(*row, exact_s, exact_s / row[-1]) for row in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# sketched eNTK vs exact trace: N={N}, C={C}, float32, {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads, {args.seeds} seeds per m, load average at start {load:.2f}"
    )
    for name in args.models:
        label, method, rows = run_case(name, args.seeds)
        print(f"\n{label} (exact trace: method {method!r})\n")
        print("| m | rel. error | stored rel. se | distance | sketch s | exact s | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for m, rms, stored, dist, sketch_s, exact_s, ratio in rows:
            print(f"| {m} | {rms:.2e} | {stored:.2e} | {dist:.1e} | {sketch_s:.3f} | {exact_s:.2f} | {ratio:.1f}x |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n# load average at end {load:.2f}")


if __name__ == "__main__":
    main()
