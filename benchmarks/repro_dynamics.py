"""Kernel dynamics of the demo CNN on digits: do the seed papers' claims show at this scale?

    .venv/bin/python benchmarks/repro_dynamics.py              # 1 seed, 10 epochs (~1-3 min on 2 cores)
    .venv/bin/python benchmarks/repro_dynamics.py --seeds 0 1 2 --epochs 10

Claims checked (the papers' definitions, as in ../shared/DESIGN.md):

* Fort et al. 2020: the kernel moves fast early in training and slows later; kernel
  velocity v(t) = S(K_{t-1}, K_t) / Δepochs with S(K, K') = 1 − ⟨K, K'⟩_F / (‖K‖ ‖K'‖),
  and the distance S(K_0, K_t) to the initial kernel grows then saturates.
* Kopitkov & Indelman 2020: the top eigenvectors of the learned kernel align with the
  target: the energy of the one-hot targets in the top-10 eigenvectors,
  ‖U_10ᵀ Y‖² / ‖Y‖², rises during training; the network's outputs f(X) have most of their
  energy in the top eigenvectors.
* Lee et al. 2020 / Fort et al. 2020: regression with the learned (after-training) kernel
  beats the kernel at initialisation (kernel regression with ε·tr(K)/n ridge, ε = 1e-4,
  float64 Cholesky; Fort et al. train the linearised network instead: closed-form kernel
  regression is a proxy).

Setting: ``lightning_ntk.demo`` (DigitsCNN: two 3x3 conv layers, max-pool, two Linear;
SGD lr 0.05 momentum 0.9, batch 64, seeded stratified split 1440/357) trained with a
Lightning Trainer carrying one ``NTKMonitor(kind="trace")``: a probe of 256 stratified
training examples, log-spaced snapshots (8 per decade, plus every epoch's end from
``max_interval``), kernel regression trained on the probe and tested on 200 held-out
(validation) examples (``krr_accuracy``, online; the first row is the initial kernel).
After training the file is re-read with ``lightning_ntk.analysis.kernel_dynamics``
(distance and velocity recomputed from the stored kernels: must equal the online values)
and ``eigenspace_tracking`` (top-10 eigenspace overlap with the initial kernel's).
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
from lightning_ntk import open_run  # noqa: E402
from lightning_ntk.analysis import eigenspace_tracking, kernel_dynamics  # noqa: E402
from lightning_ntk.callbacks import NTKMonitor  # noqa: E402
from lightning_ntk.callbacks._lightning import default_namespace  # noqa: E402
from lightning_ntk.demo import DigitsCNN, digits_split, make_lightning_module  # noqa: E402
from lightning_ntk.probe import Probe  # noqa: E402
from lightning_ntk.schedule import LogSpacedSteps  # noqa: E402


def train(seed: int, epochs: int, path: str) -> float:
    L = default_namespace()
    torch.manual_seed(seed)
    train_set, val_set = digits_split(seed=seed)
    steps_per_epoch = -(-len(train_set) // 64)
    monitor = NTKMonitor(path, kind="trace", k=20, per_layer=False, probe=Probe(size=256, seed=seed),
                         heldout=Probe(size=200, source="val", seed=seed),
                         schedule=LogSpacedSteps(per_decade=8, max_interval=steps_per_epoch),
                         budget=False, overwrite=True)
    module = make_lightning_module(DigitsCNN(), namespace=L)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[monitor], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        deterministic=True)
    trainer.fit(module, DataLoader(train_set, batch_size=64, shuffle=True), DataLoader(val_set, batch_size=256))
    return float(trainer.callback_metrics.get("val_acc", float("nan")))


def report(seed: int, path: str, val_acc: float) -> dict:
    with open_run(path) as run:
        view = run["ntk"]
        online = {f: np.asarray(view[f], dtype=np.float64) for f in
                  ("step", "epoch", "velocity", "distance_to_init", "krr_accuracy")}
        online["target_e10"] = np.asarray(view["target_energy"])[:, 9]
        online["output_e10"] = np.asarray(view["output_energy"])[:, 9]
        dyn = kernel_dynamics(run, k=10)
        track = eigenspace_tracking(run, k=10)
    agree = max(float(np.nanmax(np.abs(dyn.distance_to_init - online["distance_to_init"]))),
                float(np.nanmax(np.abs(dyn.velocity - online["velocity"]))))
    print(f"\n=== seed {seed}: {len(online['step'])} snapshots, final validation accuracy of the network {val_acc:.3f}")
    print("online (NTKMonitor) | post hoc (kernel_dynamics / eigenspace_tracking, probe split 192/64)")
    head = (f"{'step':>5} {'epoch':>6} {'velocity':>9} {'dist_init':>9} {'E10(Y)':>7} {'E10(f)':>7} "
            f"{'KRR acc':>8} {'KRR acc K0':>10} | {'split acc':>9} {'overlap10 K0':>12}")
    print(head)
    print("-" * len(head))
    krr0 = online["krr_accuracy"][0]
    for t in range(len(online["step"])):
        print(f"{int(online['step'][t]):>5} {online['epoch'][t]:>6.2f} {online['velocity'][t]:>9.4f} "
              f"{online['distance_to_init'][t]:>9.4f} {online['target_e10'][t]:>7.3f} {online['output_e10'][t]:>7.3f} "
              f"{online['krr_accuracy'][t]:>8.3f} {krr0:>10.3f} | {dyn.krr_accuracy[t]:>9.3f} "
              f"{track.overlap_to_init[t]:>12.3f}")
    print(f"max |online - post hoc| over distance_to_init and velocity: {agree:.2e}")
    v = online["velocity"]
    ep = online["epoch"]
    early = np.nanmean(v[(ep > 0) & (ep <= 1)])
    late = np.nanmean(v[ep > ep.max() / 2])
    return {"early_velocity": early, "late_velocity": late,
            "target_e10_first": online["target_e10"][0], "target_e10_last": online["target_e10"][-1],
            "output_e10_last": online["output_e10"][-1],
            "krr_first": krr0, "krr_last": online["krr_accuracy"][-1],
            "split_first": dyn.krr_accuracy[0], "split_last": dyn.krr_accuracy[-1], "agree": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            started = time.perf_counter()
            path = os.path.join(tmp, f"dynamics_{seed}.h5")
            val_acc = train(seed, args.epochs, path)
            rows.append(report(seed, path, val_acc))
            print(f"(seed {seed}: {time.perf_counter() - started:.0f} s)")
    print("\n=== summary (each seed) ===")
    print(f"{'seed':>4} {'v epoch<=1':>10} {'v 2nd half':>10} {'E10(Y) K0':>9} {'E10(Y) end':>10} {'E10(f) end':>10} "
          f"{'KRR K0':>7} {'KRR end':>7} {'split K0':>8} {'split end':>9}")
    for seed, r in zip(args.seeds, rows):
        print(f"{seed:>4} {r['early_velocity']:>10.4f} {r['late_velocity']:>10.4f} {r['target_e10_first']:>9.3f} "
              f"{r['target_e10_last']:>10.3f} {r['output_e10_last']:>10.3f} {r['krr_first']:>7.3f} "
              f"{r['krr_last']:>7.3f} {r['split_first']:>8.3f} {r['split_last']:>9.3f}")


if __name__ == "__main__":
    main()
