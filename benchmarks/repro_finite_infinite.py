"""Finite versus infinite width on digits (Lee et al. 2020, "Finite versus infinite neural
networks: an empirical study"), at toy scale, with ``lightning_ntk.analytic_kernels``.

    .venv/bin/python benchmarks/repro_finite_infinite.py            # ~6-9 min on 2 (busy) cores
    .venv/bin/python benchmarks/repro_finite_infinite.py --quick    # ~2 min
    .venv/bin/python benchmarks/repro_finite_infinite.py --parts distance

Setting: scikit-learn digits (8x8, 10 classes), a seeded stratified split 1000 train /
200 validation / 597 test, pixels in [0, 1] centred per pixel and divided by one global
standard deviation (training statistics). Networks in PyTorch's standard parameterisation and default
initialisation (weights U(±1/√fan_in): σ_w² = 1/3; biases U(±1/√fan_in)):

* MLP-2: 64 -> n -> ReLU -> n -> ReLU -> 10;
* CNN-GAP: Conv3x3(1 -> n, pad 1) -> ReLU -> Conv3x3(n -> n, pad 1) -> ReLU -> global average
  pooling -> Linear(n -> 10) (full pixel x pixel kernels);
* CNN-VEC: the same convolutions, then Flatten -> Linear(64 n -> 10) (Lee et al.'s "CNN-VEC").

Part 1, ``distance``: the eNTK at initialisation (``empirical_ntk(kind="trace")``, float64)
on a stratified probe of 100 training images (64 for the CNN) against the analytic NTK of
the same width in standard parameterisation: relative Frobenius error ‖K − Θ‖/‖Θ‖, Fort et
al.'s kernel distance S(K, Θ) and the scale ⟨K, Θ⟩/‖Θ‖², mean over seeds, for PyTorch's
uniform initialisation and for Gaussian weights and biases with the same variances; the
slopes are least-squares fits of log(mean) against log(width), over all widths and over
the wider half. Expected: relative error ∝ width^-1/2, S ∝ width^-1 (S is quadratic in a
small deviation), once the width-proportional terms of the standard-parameterisation Θ
outweigh its width-independent ones (the readout bias's matrix of ones, the first layer's
weights); before that the error falls more slowly. Then the eNTK averaged over 32 Gaussian
draws at one width: an unbiased limit leaves an error of one draw's RMS / √32.

Part 2, ``regression``: kernel regression with the analytic NNGP and NTK (float64, Lee et
al.'s regulariser K + ε·tr(K)/n·I, ε chosen on the validation set from 0, 1e-6 .. 1;
targets one-hot minus 0.1; zero prior mean) against trained networks of growing width:
SGD with momentum 0.9, batch 100, ½‖f − y‖² per example, learning rate N / λ_max(Θ_train)
from the analytic NTK of that width (about a quarter of the stability limit (2 + 2β)N/λ_max,
so it shrinks like 1/width in standard parameterisation), no weight decay, test accuracy at
the epoch of best validation accuracy (evaluated every 5 epochs). ``centred``: the same
network trained and evaluated on f(x) − f_0(x) (Lee et al.'s centring); ``ens``: the
mean output of the seeds' networks. Kernels: NNGP (the same for both parameterisations),
NTK in NTK parameterisation, and the standard-parameterisation NTK at width 65536 (its
wide limit up to scale; a meta-device module, no memory).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ntk import (  # noqa: E402
    analytic_kernels,
    finite_infinite_gap,
    kernel_distance,
    kernel_regression_scores,
    kernel_regression_sweep,
)
from lightning_ntk.probe import stratified_indices  # noqa: E402

EPS_GRID = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# ----------------------------------------------------------------------------- data and models
def digits() -> Dict[str, torch.Tensor]:
    data = load_digits()
    x = data.data.astype(np.float64) / 16.0
    y = data.target.astype(np.int64)
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, train_size=1000, stratify=y, random_state=0)
    val, test = train_test_split(rest, train_size=200, stratify=y[rest], random_state=0)
    # Centred per pixel, scaled by one global standard deviation: per-pixel scaling would
    # blow the rarely-lit border pixels up to 30-80 standard units and let them dominate.
    x = (x - x[train].mean(0)) / x[train].std()
    out = {}
    for name, part in (("train", train), ("val", val), ("test", test)):
        out[f"x_{name}"] = torch.tensor(x[part])
        out[f"y_{name}"] = torch.tensor(y[part])
    return out


def mlp(n: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(), nn.Linear(n, 10))


def cnn_gap(n: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(n, 10))


def cnn_vec(n: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64 * n, 10))


ARCHS = {"MLP-2": (mlp, False), "CNN-GAP": (cnn_gap, True), "CNN-VEC": (cnn_vec, True)}


def as_input(x: torch.Tensor, image: bool) -> torch.Tensor:
    return x.reshape(-1, 1, 8, 8) if image else x


def gaussian_(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Gaussian weights and biases with PyTorch's default variances (1/(3 fan_in) each)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                std = math.sqrt(1.0 / (3.0 * m.weight[0].numel()))
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * std)
    return model


def slope(widths: Sequence[int], values: Sequence[float]) -> float:
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


# ----------------------------------------------------------------------------- part 1
def part_distance(data: Dict[str, torch.Tensor], quick: bool) -> None:
    cases = [("MLP-2", (64, 256, 1024) if quick else (64, 128, 256, 512, 1024, 2048, 4096), 100, 2 if quick else 3),
             ("CNN-GAP", (8, 32) if quick else (8, 16, 32, 64, 128), 64, 2 if quick else 4)]
    y = data["y_train"].numpy()
    print("Part 1: eNTK at initialisation vs the analytic NTK (standard parameterisation), float64")
    for arch, widths, n_probe, seeds in cases:
        make, image = ARCHS[arch]
        idx = stratified_indices(y, n_probe, seed=0)
        x = as_input(data["x_train"][idx].float(), image)
        print(f"\n{arch}, probe of {n_probe} training images, {seeds} seeds per width")
        print(f"{'width':>6} {'init':>8} {'rel. error':>16} {'S(K, Θ)':>18} {'scale':>14} {'Θ s':>6} {'eNTK s':>7}")
        means: Dict[str, List[float]] = {"pytorch": [], "gaussian": []}
        dists: Dict[str, List[float]] = {"pytorch": [], "gaussian": []}
        for width in widths:
            t = time.perf_counter()
            theta = analytic_kernels(make(width), x, weight_var="pytorch", bias_var="pytorch")
            t_theta = time.perf_counter() - t
            for init in ("pytorch", "gaussian"):
                rel, dist, scale = [], [], []
                t = time.perf_counter()
                for seed in range(seeds):
                    torch.manual_seed(1000 * seed + width)
                    model = make(width)
                    if init == "gaussian":
                        gaussian_(model, torch.Generator().manual_seed(seed + 7919 * width))
                    gap = finite_infinite_gap(model.eval(), x, analytic=theta)
                    rel.append(gap.relative_error)
                    dist.append(gap.kernel_distance)
                    scale.append(gap.scale)
                t_entk = (time.perf_counter() - t) / seeds
                means[init].append(float(np.mean(rel)))
                dists[init].append(float(np.mean(dist)))
                print(f"{width:>6} {init:>8} {np.mean(rel):>8.4f}±{np.std(rel):<7.4f} {np.mean(dist):>9.2e}±"
                      f"{np.std(dist):<8.1e} {np.mean(scale):>7.4f}±{np.std(scale):<6.4f} {t_theta:>6.1f} "
                      f"{t_entk:>7.1f}")
        upper = len(widths) // 2  # the wider half: where the width-proportional terms dominate Θ
        for init in ("pytorch", "gaussian"):
            print(f"  slope of log(mean) vs log(width), {init}: relative error {slope(widths, means[init]):+.2f} "
                  f"(expected -0.5), S {slope(widths, dists[init]):+.2f} (expected -1); widths >= {widths[upper]}: "
                  f"{slope(widths[upper:], means[init][upper:]):+.2f}, "
                  f"{slope(widths[upper:], dists[init][upper:]):+.2f}")
        mean_of_draws(make, as_input(data["x_train"][idx[:16]].float(), image), widths[len(widths) // 2],
                      8 if quick else 32)


def mean_of_draws(make, x: torch.Tensor, width: int, draws: int) -> None:
    """Bias or fluctuation? The eNTK averaged over many Gaussian draws against Θ."""
    theta = analytic_kernels(make(width), x, weight_var="pytorch", bias_var="pytorch").ntk
    kernels = []
    for seed in range(draws):
        model = gaussian_(make(width), torch.Generator().manual_seed(10_000 + seed)).eval()
        kernels.append(finite_infinite_gap(model, x, analytic=theta).empirical)
    k = torch.stack(kernels)
    norm = torch.linalg.norm(theta)
    proj = (k * theta).sum((1, 2)) / norm ** 2
    one = float(torch.sqrt(((k - theta) ** 2).sum((1, 2)).mean()) / norm)
    mean_err = float(torch.linalg.norm(k.mean(0) - theta) / norm)
    s_mean = kernel_distance(k.mean(0).numpy(), theta.numpy())
    print(f"  mean of {draws} Gaussian draws at width {width} on {len(x)} images: scale {float(proj.mean()):.4f} ± "
          f"{float(proj.std()) / math.sqrt(draws):.4f} (s.e.), relative error {mean_err:.4f} (one draw's RMS "
          f"{one:.4f}, /√{draws} = {one / math.sqrt(draws):.4f}), S {s_mean:.1e}")


# ----------------------------------------------------------------------------- part 2
def targets(y: torch.Tensor) -> np.ndarray:
    return np.eye(10)[y.numpy()] - 0.1


def kernel_scores(make, image: bool, data: Dict[str, torch.Tensor], width: int, parameterization: str,
                  which: str, module=None) -> Tuple[float, float, float]:
    """(test accuracy at the ε best on validation, that ε, test accuracy at ε = 0)."""
    xs = {k: as_input(data[f"x_{k}"], image) for k in ("train", "val", "test")}
    model = module if module is not None else make(width)
    every = torch.cat([xs["train"], xs["val"], xs["test"]])
    k = analytic_kernels(model, every, xs["train"], parameterization=parameterization, weight_var="pytorch",
                         bias_var="pytorch")
    kernel = getattr(k, which).numpy()
    n_tr, n_val = len(xs["train"]), len(xs["val"])
    k_train, k_val, k_test = kernel[:n_tr], kernel[n_tr:n_tr + n_val], kernel[n_tr + n_val:]
    y_train = targets(data["y_train"])
    sweep = kernel_regression_sweep(k_train, y_train, k_val, data["y_val"].numpy(), EPS_GRID)
    best = int(np.nanargmax(sweep.accuracy))
    eps = float(sweep.eps[best])
    test = kernel_regression_scores(k_train, y_train, k_test, data["y_test"].numpy(), eps=eps).accuracy
    try:
        interp = kernel_regression_scores(k_train, y_train, k_test, data["y_test"].numpy(), eps=0.0).accuracy
    except ValueError:
        interp = float("nan")
    return test, eps, interp


def train(make, image: bool, width: int, data: Dict[str, torch.Tensor], seed: int, centred: bool, epochs: int,
          lr: float) -> Tuple[float, np.ndarray]:
    """(test accuracy at the best validation epoch, test outputs at that epoch)."""
    torch.manual_seed(seed)
    model = make(width)
    xs = {k: as_input(data[f"x_{k}"].float(), image) for k in ("train", "val", "test")}
    y_train = torch.tensor(targets(data["y_train"]), dtype=torch.float32)
    with torch.no_grad():
        f0 = {k: (model(v) if centred else torch.zeros(len(v), 10)) for k, v in xs.items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    n = len(xs["train"])
    best_val, best_test, best_out = -1.0, 0.0, None
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, 100):
            b = order[start:start + 100]
            out = model(xs["train"][b]) - f0["train"][b]
            loss = 0.5 * ((out - y_train[b]) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 0 or epoch == epochs:
            with torch.no_grad():
                val = (model(xs["val"]) - f0["val"]).argmax(1).eq(data["y_val"]).float().mean().item()
                out = model(xs["test"]) - f0["test"]
            if not math.isfinite(val):
                break
            if val > best_val:
                best_val, best_out = val, out.numpy()
                best_test = float((out.argmax(1) == data["y_test"]).float().mean())
    return best_test, best_out


def part_regression(data: Dict[str, torch.Tensor], quick: bool) -> None:
    print("\nPart 2: kernel regression with the analytic kernels vs trained networks (test accuracy, 597 images)")
    cases = [("MLP-2", (64, 256) if quick else (64, 256, 1024), 2), ("CNN-VEC", (16,) if quick else (16, 64), 1)]
    epochs = 40 if quick else 100
    for arch, widths, seeds in cases:
        make, image = ARCHS[arch]
        t = time.perf_counter()
        rows = []
        with torch.device("meta"):  # shapes only: the kernels of any width without its memory
            wide = make(65536)
        for label, param, which, module in (
                ("NNGP", "standard", "nngp", None), ("NTK (NTK param.)", "ntk", "ntk", None),
                ("NTK (standard, width 65536)", "standard", "ntk", wide)):
            rows.append((label,) + kernel_scores(make, image, data, 16, param, which, module))
        print(f"\n{arch}: kernels ({time.perf_counter() - t:.0f} s)")
        print(f"{'kernel':>28} {'test acc (ε on val)':>20} {'ε':>7} {'test acc (ε = 0)':>17}")
        for label, acc, eps, interp in rows:
            print(f"{label:>28} {acc:>20.4f} {eps:>7.0e} {interp:>17.4f}")
        print(f"{arch}: trained, {seeds} seed(s), {epochs} epochs")
        print(f"{'width':>6} {'lr':>9} {'net':>14} {'centred':>14} {'ens':>7} {'s/run':>6}")
        x_train = as_input(data["x_train"], image)
        for width in widths:
            theta = analytic_kernels(make(width), x_train, weight_var="pytorch", bias_var="pytorch").ntk
            lr = len(x_train) / float(torch.linalg.eigvalsh(theta)[-1])
            accs: Dict[bool, List[float]] = {False: [], True: []}
            outs = []
            t = time.perf_counter()
            for seed in range(seeds):
                for centred in (False, True):
                    acc, out = train(make, image, width, data, seed, centred, epochs, lr)
                    accs[centred].append(acc)
                    if not centred:
                        outs.append(out)
            per_run = (time.perf_counter() - t) / (2 * seeds)
            ens = float((np.mean(outs, 0).argmax(1) == data["y_test"].numpy()).mean()) if seeds > 1 else float("nan")
            print(f"{width:>6} {lr:>9.2e} {np.mean(accs[False]):>7.4f}±{np.std(accs[False]):<6.4f} "
                  f"{np.mean(accs[True]):>7.4f}±{np.std(accs[True]):<6.4f} {ens:>7.4f} {per_run:>6.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer widths, seeds and epochs")
    parser.add_argument("--parts", nargs="+", default=["distance", "regression"], choices=["distance", "regression"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a busy 2-core machine two threads wait at barriers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    data = digits()
    if "distance" in args.parts:
        part_distance(data, args.quick)
    if "regression" in args.parts:
        part_regression(data, args.quick)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
