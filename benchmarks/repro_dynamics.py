"""Kernel dynamics of the demo CNN on digits: do the seed papers' claims show at this scale?

    .venv/bin/python benchmarks/repro_dynamics.py                 # noisy digits, cross-entropy, 3 seeds, ~9 min
    .venv/bin/python benchmarks/repro_dynamics.py --loss mse --no-krr   # squared loss (Kopitkov & Indelman), ~4 min
    .venv/bin/python benchmarks/repro_dynamics.py --no-krr --epochs 40  # the late phase (Fort et al.), ~8 min
    .venv/bin/python benchmarks/repro_dynamics.py --section kernels     # NNGP vs NTK (Lee et al.), ~2 min
    .venv/bin/python benchmarks/repro_dynamics.py --task digits --seeds 0 --epochs 10

Claims checked (the papers' definitions, as in ../shared/DESIGN.md):

* Fort et al. 2020: the kernel moves fast early in training and slows later. Velocity
  compared at a constant Δt (``NTKMonitor(velocity_dt=Δ)``: after every snapshot another
  one Δ steps later): the kernel distance S(K_s, K_{s+Δ}) = 1 − ⟨K, K'⟩ / (‖K‖ ‖K'‖) per
  epoch, and the angular velocity arccos(⟨K, K'⟩ / (‖K‖ ‖K'‖)) / Δt, which is linear in the
  kernel's speed (S is quadratic in it, so S/Δt between unevenly spaced snapshots is not
  comparable over a run).
* Kopitkov & Indelman 2020: the top eigenvectors of the learned kernel align with the
  target: the energy of the one-hot targets in the top-10 eigenvectors, ‖U_10ᵀ Y‖² / ‖Y‖²,
  rises during training, while the residual f(X) − Y leaves them (the top eigendirections
  are learned first). f − Y is the residual of the squared loss they train with
  (``--loss mse``: ½‖f − y‖² summed over outputs, one-hot targets); under cross-entropy
  the logits grow past the one-hot targets and f − Y is no residual of the loss. Read against the baselines of ``spectral.energy_baselines``: 10/N
  for a random 10-dimensional subspace, and the targets' share in the constant direction
  (Σ p_c² = 0.1 for 10 balanced classes), which a kernel with a nearly constant top
  eigenvector holds in E_1 without any alignment.
* Lee et al. 2020 / Fort et al. 2020: regression with the learned (after-training) kernel
  beats the kernel at initialisation (kernel regression with ε·tr(K)/n ridge, ε = 1e-4,
  float64 kernel and Cholesky, Lee et al.'s centring: the default; Fort et al. train the
  linearised network instead: closed-form kernel regression is a proxy).
* Lee et al. 2020, NNGP vs NTK (``--section kernels``): kernel regression with the
  infinite-width NNGP and NTK of the same architecture (``lightning_ntk.analytic``,
  standard parameterisation, PyTorch's default initialisation variances) on the whole
  training set; Lee et al. find the NNGP at least as good as the NTK for most
  architectures. ε·tr(K)/n swept over 1e-6..1 and chosen on a stratified 25% validation
  split of the training set (one split per seed), then refitted on the rest and tested on
  the 357 test images. Architectures: FC (64-512-512-10, ReLU) and CNN-VEC (two 3x3 conv
  layers 16, 32 with ReLU, flattened into a Linear readout; no pooling, which the analytic
  kernels of a max-pool network would need).

Task (``--task``): ``noisy`` (default): the digits with fixed Gaussian pixel noise
(sigma = 0.4, ``benchmarks/_tasks.py``), where the network reaches ~0.8 test accuracy;
``digits``: the clean digits, where the initial kernel already classifies at 0.96-1.00.

Setting: ``lightning_ntk.demo.DigitsCNN`` (two 3x3 conv layers, max-pool, two Linear;
SGD lr 0.05 momentum 0.9, batch 64, seeded stratified split 1440/357) trained with a
Lightning Trainer carrying one ``NTKMonitor(kind="trace", velocity_dt=Δ)``: a probe of
192 stratified training examples, log-spaced snapshots (3 per decade, plus one at least
every 4 epochs), each followed by its partner Δ = 4 steps later; kernel regression trained
on the probe and tested on 160 held-out (validation) examples (``krr_accuracy``, online;
the first row is the initial kernel). Every number is per seed, then mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tasks import task_split  # noqa: E402

from lightning_ntk import kernel_regression_scores, kernel_regression_sweep, open_run  # noqa: E402
from lightning_ntk.analysis import eigenspace_tracking  # noqa: E402
from lightning_ntk.analytic import analytic_kernels  # noqa: E402
from lightning_ntk.callbacks import NTKMonitor  # noqa: E402
from lightning_ntk.callbacks._lightning import default_namespace  # noqa: E402
from lightning_ntk.demo import DigitsCNN, make_lightning_module  # noqa: E402
from lightning_ntk.probe import Probe, stratified_indices  # noqa: E402
from lightning_ntk.schedule import LogSpacedSteps  # noqa: E402

PROBE, HELDOUT, K = 192, 160, 10


def squared_loss_module(L):
    """The demo's module trained on Kopitkov & Indelman's (and Cohen et al.'s) squared loss,
    mean over examples of ½‖f(x) − onehot(y)‖² (summed over the 10 outputs)."""
    base = type(make_lightning_module(DigitsCNN(), namespace=L))

    class SquaredLossDigits(base):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = 0.5 * ((self(x) - torch.nn.functional.one_hot(y, 10).float()) ** 2).sum(1).mean()
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

    return SquaredLossDigits()


def train(task: str, seed: int, epochs: int, velocity_dt: int, path: str, loss: str, krr: bool) -> float:
    L = default_namespace()
    torch.manual_seed(seed)
    train_set, val_set = task_split(task, seed=0)  # one dataset; the seed varies the training
    steps_per_epoch = -(-len(train_set) // 64)
    monitor = NTKMonitor(path, kind="trace", k=20, per_layer=False, probe=Probe(size=PROBE, seed=seed),
                         heldout=Probe(size=HELDOUT, source="val", seed=seed) if krr else None,
                         velocity_dt=velocity_dt,
                         schedule=LogSpacedSteps(per_decade=3, max_interval=4 * steps_per_epoch),
                         budget=False, overwrite=True)
    module = make_lightning_module(DigitsCNN(), namespace=L) if loss == "ce" else squared_loss_module(L)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[monitor], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        deterministic=True)
    trainer.fit(module, DataLoader(train_set, batch_size=64, shuffle=True), DataLoader(val_set, batch_size=256))
    return float(trainer.callback_metrics.get("val_acc", float("nan")))


def report(seed: int, path: str, val_acc: float, epochs: int) -> dict:
    with open_run(path) as run:
        view = run["ntk"]
        f = {name: np.asarray(view[name], dtype=np.float64) for name in (
            "step", "epoch", "distance_to_init", "velocity_base_step", "constant_dt_epochs",
            "velocity_constant_dt", "angular_velocity_constant_dt")}
        f["krr_accuracy"] = (np.asarray(view["krr_accuracy"], dtype=np.float64) if "krr_accuracy" in view
                             else np.full(len(f["step"]), np.nan))
        target, residual = np.asarray(view["target_energy"]), np.asarray(view["residual_energy"])
        constant = float(view.attrs["target_energy_constant"])
        dt_steps = int(view.attrs["velocity_dt_steps"])
        rows_m = view.group["eigvecs"].shape[1]
        track = eigenspace_tracking(run, k=K)
    partner = f["velocity_base_step"] >= 0
    print(f"\n=== seed {seed}: {len(f['step'])} snapshots ({int(partner.sum())} of them {dt_steps}"
          f" steps after another), network validation accuracy {val_acc:.3f}")
    head = (f"{'step':>5} {'epoch':>6} {'ang.vel dt':>10} {'S/dt dt':>9} {'dist_init':>9} {'E1(Y)':>6} "
            f"{'E10(Y)':>6} {'E10(r)':>6} {'KRR acc':>7} {'ovl10 K0':>8}")
    print("partner rows (constant dt) and the first/last rows:")
    print(head)
    print("-" * len(head))
    last = len(f["step"]) - 1
    for t in range(len(f["step"])):
        if not (partner[t] or t in (0, last)):
            continue
        print(f"{int(f['step'][t]):>5} {f['epoch'][t]:>6.2f} {f['angular_velocity_constant_dt'][t]:>10.4f} "
              f"{f['velocity_constant_dt'][t]:>9.5f} {f['distance_to_init'][t]:>9.4f} {target[t, 0]:>6.3f} "
              f"{target[t, K - 1]:>6.3f} {residual[t, K - 1]:>6.3f} {f['krr_accuracy'][t]:>7.3f} "
              f"{track.overlap_to_init[t]:>8.3f}")
    ep, ang = f["epoch"], f["angular_velocity_constant_dt"]

    def mean_between(lo: float, hi: float) -> float:
        sel = partner & (ep > lo) & (ep <= hi)
        return float(np.mean(ang[sel])) if sel.any() else float("nan")

    return {"ang_first": mean_between(0.0, 1.0), "ang_mid": mean_between(1.0, epochs / 2),
            "ang_late": mean_between(epochs / 2, epochs + 1),
            "ang_max_epoch": float(ep[partner][np.argmax(ang[partner])]),
            "e1_first": target[0, 0], "e1_last": target[-1, 0],
            "e10_first": target[0, K - 1], "e10_last": target[-1, K - 1],
            "r10_first": residual[0, K - 1], "r10_last": residual[-1, K - 1],
            "random10": K / rows_m, "constant": constant, "overlap_last": float(track.overlap_to_init[-1]),
            "krr_first": f["krr_accuracy"][0], "krr_last": f["krr_accuracy"][-1],
            "krr_best": float(np.nanmax(f["krr_accuracy"])) if np.isfinite(f["krr_accuracy"]).any() else np.nan,
            "net": val_acc}


EPS_GRID = 10.0 ** np.arange(-6, 0.5, 1.0)


def nngp_vs_ntk(task: str, seeds) -> None:
    """Section 2: kernel regression with the analytic NNGP and NTK (Lee et al. 2020)."""
    train_set, test_set = task_split(task, seed=0)
    xtr, ytr = train_set.tensors
    xte, yte = test_set.tensors
    x = torch.cat([xtr, xte])
    n = len(xtr)
    nets = {
        "FC 64-512-512-10": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 512), torch.nn.ReLU(),
                                                torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)),
        "CNN-VEC 16-32": torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                                             torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                                             torch.nn.Flatten(), torch.nn.Linear(2048, 10)),
    }
    print(f"\n=== NNGP vs NTK (Lee et al. 2020): analytic kernels, task {task}, {n} training / {len(xte)} test "
          f"images; eps chosen on a 25% validation split per seed {list(seeds)} ===")
    print(f"{'architecture':>18} {'kernel':>6} " + " ".join(f"{'seed ' + str(s):>16}" for s in seeds)
          + f" {'mean':>7} {'std':>6}")
    for name, net in nets.items():
        started = time.perf_counter()
        kernels = analytic_kernels(net, x)
        for kind in ("nngp", "ntk"):
            K = getattr(kernels, kind).numpy()
            cells, accs = [], []
            for seed in seeds:
                val = np.sort(stratified_indices(ytr.numpy(), n // 4, seed=seed))
                fit = np.setdiff1d(np.arange(n), val)
                sweep = kernel_regression_sweep(K[np.ix_(fit, fit)], ytr[fit], K[np.ix_(val, fit)], ytr[val], EPS_GRID,
                                                num_classes=10)
                eps = float(sweep.eps[np.nanargmax(sweep.accuracy)])
                acc = kernel_regression_scores(K[np.ix_(fit, fit)], ytr[fit], K[n:][:, fit], yte, eps=eps,
                                               num_classes=10).accuracy
                accs.append(acc)
                cells.append(f"{acc:.3f} (e={eps:.0e})")
            print(f"{name:>18} {kind:>6} " + " ".join(f"{c:>16}" for c in cells)
                  + f" {np.mean(accs):>7.3f} {np.std(accs):>6.3f}")
        print(f"{'':>18} (kernels in {time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["noisy", "digits"], default="noisy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--loss", choices=["ce", "mse"], default="ce")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--velocity-dt", type=int, default=4, help="steps between a snapshot and its partner")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--section", choices=["all", "dynamics", "kernels"], default="dynamics")
    parser.add_argument("--no-krr", action="store_true",
                        help="no held-out probe: no kernel regression, float32 kernels (cheaper snapshots)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.section in ("all", "kernels"):
        nngp_vs_ntk(args.task, args.seeds)
    if args.section == "kernels":
        return
    print(f"task {args.task}, loss {args.loss}, {args.epochs} epochs, seeds {args.seeds}, probe {PROBE}, held-out {HELDOUT}, "
          f"velocity_dt {args.velocity_dt} steps; torch threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            started = time.perf_counter()
            path = os.path.join(tmp, f"dynamics_{seed}.h5")
            val_acc = train(args.task, seed, args.epochs, args.velocity_dt, path, args.loss, not args.no_krr)
            rows.append(report(seed, path, val_acc, args.epochs))
            print(f"(seed {seed}: {time.perf_counter() - started:.0f} s)")
    keys = [("ang_first", "ang.vel ep<=1"), ("ang_mid", f"ang.vel 1-{args.epochs // 2}"),
            ("ang_late", "ang.vel 2nd half"), ("ang_max_epoch", "peak at ep"),
            ("e1_first", "E1(Y) K0"), ("e1_last", "E1(Y) end"), ("e10_first", "E10(Y) K0"), ("e10_last", "E10(Y) end"),
            ("r10_first", "E10(r) K0"), ("r10_last", "E10(r) end"), ("overlap_last", "ovl10 K0-end"),
            ("krr_first", "KRR K0"), ("krr_last", "KRR end"), ("krr_best", "KRR best"), ("net", "net acc")]
    print(f"\n=== summary (each seed; baselines: random 10-subspace {rows[0]['random10']:.3f}, targets' constant "
          f"share {rows[0]['constant']:.3f}) ===")
    print(f"{'seed':>4} " + " ".join(f"{label:>14}" for _, label in keys))
    for seed, r in zip(args.seeds, rows):
        print(f"{seed:>4} " + " ".join(f"{r[key]:>14.4f}" for key, _ in keys))
    print(f"{'mean':>4} " + " ".join(f"{np.mean([r[key] for r in rows]):>14.4f}" for key, _ in keys))
    print(f"{'std':>4} " + " ".join(f"{np.std([r[key] for r in rows]):>14.4f}" for key, _ in keys))


if __name__ == "__main__":
    main()
