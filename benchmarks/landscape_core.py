"""Cost of the landscape functional core on digits (``lightning_ntk.landscape``).

    .venv/bin/python benchmarks/landscape_core.py            # ~1 min on 2 cores
    .venv/bin/python benchmarks/landscape_core.py --repeats 20 --threads 2   # default: 1 thread

Table 1, linearised training: one SGD step (forward, cross-entropy, backward, update) of
``Linearized(net)`` against one of ``net`` itself, batch 64 of 8x8 digits, float32, the two
timed in turns in one process; minimum over ``--repeats`` (other processes on the shared
machine slow random calls, never speed them up). The linearised step computes
f(θ₀, x) + J(θ₀, x)(θ − θ₀) with one ``torch.func.jvp`` and back-propagates through it,
so its cost is a small multiple of the network's. The explicit alternative stores the
Jacobian of the training set, N·C × P floats: its size is printed (not allocated).

Table 2, linear path: seconds per point of ``linear_path`` on the 1797 digits (one pass
to evaluate), with and without BatchNorm statistics re-estimated on the same set (one more
pass), for a CNN with BatchNorm.

Models: MLP 64-256-256-10 (ReLU); CNN (two 3x3 conv layers of width 32 with BatchNorm,
max-pool, Linear 512-64-10), the demo's shape with BatchNorm added.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_ntk.landscape import Linearized, linear_path


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    start = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y_all = torch.tensor(digits.target)
    x, y = x_all[:64], y_all[:64]

    print(f"torch {torch.__version__}, {args.threads} threads, minimum of {args.repeats} steps after 3 warm-up steps")
    print("\n| model | P | network step (ms) | linearised step (ms) | ratio | explicit J of the set (MB) |")
    print("|---|---|---|---|---|---|")
    for name, build in (("MLP 64-256-256-10", mlp), ("CNN+BN", cnn)):
        torch.manual_seed(0)
        net = build().train()
        lin = Linearized(build().train())
        n_params = sum(p.numel() for p in net.parameters())
        times = {"net": [], "lin": []}
        for i in range(args.repeats + 3):
            for key, model in (("net", net), ("lin", lin)):  # in turns: load changes hit both
                t = step_time(model, x, y)
                if i >= 3:
                    times[key].append(t)
        t_net, t_lin = min(times["net"]), min(times["lin"])
        jacobian_mb = len(x_all) * 10 * n_params * 4 / 2**20
        print(f"| {name} | {n_params:,} | {1e3 * t_net:.2f} | {1e3 * t_lin:.2f} | {t_lin / t_net:.1f}x | "
              f"{jacobian_mb:,.0f} |")

    print("\n| model | points | BatchNorm re-estimated | s per point |")
    print("|---|---|---|---|")
    data = [(x_all[i:i + 256], y_all[i:i + 256]) for i in range(0, len(x_all), 256)]
    torch.manual_seed(0)
    a, b = cnn(), cnn()
    for reestimate in (False, True):
        start = time.perf_counter()
        path = linear_path(a, a.state_dict(), b.state_dict(), data, points=5, reestimate_batchnorm=reestimate)
        seconds = (time.perf_counter() - start) / 5
        print(f"| CNN+BN, 1797 digits | 5 | {reestimate} | {seconds:.3f} |")
    assert path.batchnorm_reestimated


if __name__ == "__main__":
    main()
