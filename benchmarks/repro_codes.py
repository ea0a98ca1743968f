"""Activation codes of ReLU MLPs of increasing width on digits (He, Lei et al., "Neural
networks behave as hash encoders", arXiv:2101.05490), at toy scale.

    .venv/bin/python benchmarks/repro_codes.py          # noisy digits, about 1-3 min on 2 (busy) CPU cores
    .venv/bin/python benchmarks/repro_codes.py --task digits --seeds 0 --depths 2

The paper's picture: a network that is *under-expressive* (too narrow) maps many training
examples to one linear region (high redundancy ratio) and its codes categorise poorly; past
a *critical* width the redundancy ratio drops to about 0 (almost every region holds at most
one example), and a *sufficiently expressive* network's codes are good features: k-NN on
them (k = 9, Hamming distance) approaches the network's own test accuracy. Training time
acts like width: the redundancy falls and the k-NN accuracy rises as training goes on.

Setting: scikit-learn digits (8x8, 10 classes), the seeded stratified split of
``lightning_ntk.demo.digits_split`` (1440 train / 357 test), inputs scaled to [0, 1] and
flattened to 64 features; ``--task noisy`` (default) adds fixed Gaussian pixel noise
(sigma = 0.4, ``benchmarks/_tasks.py``): on the clean digits the codes of a random network
already give 0.96 k-NN accuracy at width 256 (a random-hyperplane hash of easily
separated inputs), so training has little room to show. MLP 64 -> [width] * depth -> 10,
ReLU, PyTorch default init; SGD (lr 0.05, momentum 0.9), batch 64, cross-entropy, 40
epochs. At epochs 0 (init), 1, 5, 20 and 40: the codes of all 1440 training and 357 test images over all depth * width hidden
units (``activation_codes``), the redundancy ratio of each set, the k-NN accuracy (train
codes -> test labels), and the network's test accuracy. For reference, the k-NN accuracy
on the raw pixels (Euclidean) is printed first. Each number is the mean over the
seeds (default 0, 1, 2); the k-NN and network accuracies are given as mean±std.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ntk.codes import activation_codes, knn_accuracy, redundancy_ratio  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tasks import task_split  # noqa: E402

WIDTHS = (2, 4, 8, 16, 64, 256)
EPOCHS = (0, 1, 5, 20, 40)


def mlp(width: int, depth: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def data(task: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    train, test = task_split(task)
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    return xtr.flatten(1), ytr, xte.flatten(1), yte


def measure(model: nn.Module, xtr, ytr, xte, yte, k: int) -> Dict[str, float]:
    model.eval()
    codes_tr = activation_codes(model, xtr)
    codes_te = activation_codes(model, xte)
    with torch.no_grad():
        net_acc = float((model(xte).argmax(1) == yte).double().mean())
    model.train()
    return {"units": codes_tr.n_units, "red_train": redundancy_ratio(codes_tr), "red_test": redundancy_ratio(codes_te),
            "knn": knn_accuracy(codes_tr, ytr, codes_te, yte, k=k), "net": net_acc}


def run(width: int, depth: int, seed: int, epochs: Sequence[int], k: int, tensors) -> Dict[int, Dict[str, float]]:
    xtr, ytr, xte, yte = tensors
    torch.manual_seed(seed)
    model = mlp(width, depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for epoch in range(max(epochs) + 1):
        if epoch in epochs:
            out[epoch] = measure(model, xtr, ytr, xte, yte, k)
        if epoch == max(epochs):
            break
        order = torch.randperm(xtr.shape[0], generator=gen)
        for start in range(0, xtr.shape[0], 64):
            idx = order[start:start + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return out


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["noisy", "digits"], default="noisy")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--epochs", type=int, nargs="+", default=list(EPOCHS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny MLPs: 1 is fastest)")
    args = parser.parse_args(list(argv))
    torch.set_num_threads(args.threads)
    tensors = data(args.task)
    print(f"task {args.task}: {tensors[0].shape[0]} train / {tensors[2].shape[0]} test images; SGD lr 0.05 momentum 0.9, "
          f"batch 64; k-NN k={args.k} (Hamming); mean over seeds {args.seeds}")
    from sklearn.neighbors import KNeighborsClassifier

    xtr, ytr, xte, yte = tensors
    raw = KNeighborsClassifier(n_neighbors=args.k).fit(xtr.numpy(), ytr.numpy()).score(xte.numpy(), yte.numpy())
    print(f"reference: k-NN (k={args.k}, Euclidean) on the raw 64 pixels: test accuracy {raw:.3f}")
    started = time.perf_counter()
    for depth in args.depths:
        print(f"\ndepth {depth} (hidden layers)")
        header = (f"{'width':>5} {'units':>5} {'epoch':>5} | {'redund. train':>13} {'redund. test':>12} | "
                  f"{'k-NN acc (codes)':>16} {'net test acc':>13}")
        print(header)
        print("-" * len(header))
        for width in args.widths:
            per_seed = [run(width, depth, seed, args.epochs, args.k, tensors) for seed in args.seeds]
            for epoch in args.epochs:
                rows = [r[epoch] for r in per_seed]

                def mean(key: str, rows: list = rows) -> float:
                    return float(np.mean([r[key] for r in rows]))

                def pm(key: str, rows: list = rows) -> str:
                    values = [r[key] for r in rows]
                    return f"{np.mean(values):.3f}±{np.std(values):.3f}"

                print(f"{width:>5} {int(mean('units')):>5} {epoch:>5} | {mean('red_train'):>13.3f} "
                      f"{mean('red_test'):>12.3f} | {pm('knn'):>16} {pm('net'):>13}")
    print(f"\ntotal time {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
