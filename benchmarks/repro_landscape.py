"""Parent-child spawning on digits: do Frankle et al.'s and Fort et al.'s landscape claims show?

    .venv/bin/python benchmarks/repro_landscape.py                      # 3 seeds, 2 learning rates (~4-6 min)
    .venv/bin/python benchmarks/repro_landscape.py --seeds 0 --lr 0.2 --spawn 0 10 100

Claims checked (definitions as in docs/landscape.md):

* Frankle et al. 2020 (instability analysis), Fort et al. 2020 (Fig. "error barrier vs
  spawn time"): two children trained from the parent's state at step t with different SGD
  noise (data order) end in different basins when t = 0 (error barrier on the linear path
  between them about as large as between independently trained networks), and in one
  linearly connected basin once t is a small fraction of training (barrier ≈ 0).
* Fort et al. 2020: the kernel distance S between the children's final eNTKs falls with the
  spawn time (children spawned late share their kernel), as does the distance from each
  child's kernel to its parent's.
* Fort et al. 2020 (linearised training): the first-order Taylor model around θ(t), trained
  with the same optimiser, data and budget, falls far short of the network when t = 0 (the
  kernel regime is not where the network ends up) and matches it once t is past the early
  chaotic phase: the accuracy gap real − linearised shrinks towards 0 with t.

Setting: ``lightning_ntk.demo``'s DigitsCNN (two 3x3 conv layers, max-pool, two Linear;
SGD momentum 0.9, batch 64) on the seeded stratified digits split 1440/357, trained for
``--epochs`` epochs (23 steps each) with one ``ParentStateMonitor`` saving the spawn steps,
at the demo's learning rate 0.05 and at 0.2 (one table each: the instability at early
spawn times depends on it); then ``spawn_children`` trains 2 children from each state to
the parent's last step (Frankle et al.'s protocol: children finish the parent's budget),
the linearised network trained like child 0, and measures barriers on the 357 held-out
images (11 points per path) and eNTK distances (trace kernel) on a 128-image stratified
probe of them. Reference level: the barrier between two networks trained from different
initialisations with the same budget and data order.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ntk.callbacks import ParentStateMonitor, spawn_children  # noqa: E402
from lightning_ntk.callbacks._lightning import default_namespace  # noqa: E402
from lightning_ntk.demo import DigitsCNN, digits_split, make_lightning_module  # noqa: E402

TRAINER = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               accelerator="cpu", devices=1, limit_val_batches=0, num_sanity_val_steps=0)


def run_seed(seed: int, epochs: int, spawn: list, folder: str, lr: float, batch: int) -> dict:
    L = default_namespace()
    train_set, test_set = digits_split(seed=seed)
    train = DataLoader(train_set, batch_size=batch, shuffle=True)
    test = DataLoader(test_set, batch_size=512)
    total = epochs * -(-len(train_set) // batch)
    path = os.path.join(folder, f"seed{seed}.h5")
    torch.manual_seed(seed)
    module = make_lightning_module(DigitsCNN(), lr=lr, namespace=L)
    started = time.perf_counter()
    L.Trainer(max_steps=total, max_epochs=-1, callbacks=[ParentStateMonitor(path, schedule=spawn, overwrite=True)],
              **TRAINER).fit(module, train)
    parent_s = time.perf_counter() - started
    started = time.perf_counter()
    result = spawn_children(path, make_lightning_module(DigitsCNN(), lr=lr, namespace=L), train_dataloaders=train,
                            trainer_kwargs=TRAINER, children=2, until=total, spawn_steps=spawn, seed=seed,
                            eval_data=test, probe=128, points=11, linearized=True, progress=False)
    rows = {}
    for s in result.spawns:
        c, lin = s.comparison, s.linearized
        rows[s.step] = {"epoch": s.epoch, "barrier": float(c.error_barrier.mean()),
                        "loss_barrier": float(c.loss_barrier.mean()), "kd": float(c.kernel_distance.mean()),
                        "kd_parent": float(c.kernel_distance_to_parent.mean()),
                        "disagree": float(c.disagreement.mean()), "child_err": float(c.child_error.mean()),
                        "lin_acc": 1 - lin.linear_error, "real_acc": 1 - lin.real_error,
                        "parent_acc": 1 - lin.parent_error}
    print(f"seed {seed}: parent {total} steps {parent_s:.1f} s, spawning {time.perf_counter() - started:.1f} s "
          f"({len(spawn)} spawn steps x 2 children + the linearised network)", flush=True)
    return {"total": total, "rows": rows}


def independent_barrier(seed: int, total: int, lr: float, batch: int) -> float:
    """The error barrier between two networks trained from different initialisations (same
    data order seed), the level a barrier at t = 0 is compared with."""
    L = default_namespace()
    train_set, test_set = digits_split(seed=seed)
    test = DataLoader(test_set, batch_size=512)
    nets = []
    for init in (1000 + seed, 2000 + seed):
        torch.manual_seed(init)
        module = make_lightning_module(DigitsCNN(), lr=lr, namespace=L)
        torch.manual_seed(seed)
        L.Trainer(max_steps=total, max_epochs=-1, **TRAINER).fit(
            module, DataLoader(train_set, batch_size=batch, shuffle=True))
        nets.append(module)
    from lightning_ntk import linear_path

    path = linear_path(nets[0], nets[0].state_dict(), nets[1].state_dict(), test, points=11)
    return path.error_barrier


def table(lr: float, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        results = [run_seed(seed, args.epochs, args.spawn, folder, lr, args.batch) for seed in args.seeds]
    total = results[0]["total"]
    independent = np.array([independent_barrier(seed, total, lr, args.batch) for seed in args.seeds])
    steps = sorted(results[0]["rows"])
    per_epoch = total / args.epochs

    def stat(values: np.ndarray) -> str:
        return f"{values.mean():.3f}±{values.std():.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    def column(step: int, key: str) -> str:
        return stat(np.array([r["rows"][step][key] for r in results]))

    print(f"\nDigitsCNN, SGD lr {lr} momentum 0.9, batch {args.batch}, {args.epochs} epochs = {total} steps; 2 "
          f"children per spawn step trained to step {total}; mean±sd over seeds {args.seeds}; errors on the 357 "
          "held-out images")
    print(f"{'t':>5} {'epoch':>6} {'error barrier':>13} {'loss barrier':>13} {'S children':>13} {'S to parent':>13} "
          f"{'disagree':>13} {'acc real':>13} {'acc linear':>13} {'gap':>13}")
    for step in steps:
        gaps = np.array([r["rows"][step]["real_acc"] - r["rows"][step]["lin_acc"] for r in results])
        print(f"{step:>5} {step / per_epoch:>6.2f} {column(step, 'barrier'):>13} {column(step, 'loss_barrier'):>13} "
              f"{column(step, 'kd'):>13} {column(step, 'kd_parent'):>13} {column(step, 'disagree'):>13} "
              f"{column(step, 'real_acc'):>13} {column(step, 'lin_acc'):>13} {stat(gaps):>13}")
    print(f"independently initialised pairs (same budget and data order): error barrier {stat(independent)}")
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--spawn", type=int, nargs="+", default=[0, 1, 3, 10, 30, 100])
    parser.add_argument("--lr", type=float, nargs="+", default=[0.05, 0.2], help="one table per learning rate")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*validation_step.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    started = time.perf_counter()
    for lr in args.lr:
        table(lr, args)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
