"""Toneva et al. (2019) at digits scale, and ForgettingMonitor's overhead on the demo training.

    .venv/bin/python benchmarks/repro_forgetting.py --skip overhead   # sections 1-2: ~6-9 min on 2 shared cores
    .venv/bin/python benchmarks/repro_forgetting.py --task digits --seeds 3 --skip overhead   # the clean digits
    .venv/bin/python benchmarks/repro_forgetting.py --skip repro --threads 1 --repeats 15   # overhead only

Setting: ``--task noisy`` (default): the digits with fixed Gaussian pixel noise (sigma = 0.4,
``benchmarks/_tasks.py``), a task the demo CNN learns to ~0.8 test accuracy with many
forgetting events; ``--task digits``: the clean digits, where ~80% of the examples are
never forgotten in 20 epochs and the counts are mostly ties at 0. The demo's stratified
split (1440 train / 357 test), the demo's DigitsCNN and LightningModule (cross-entropy, SGD
lr 0.05, momentum 0.9, batch 64, shuffled); one dataset, the seed varies the training.

1. Forgetting statistics: one Lightning training per seed with ``ForgettingMonitor``
   (default mode: correctness from the training forward pass of each batch, before the
   update). Printed per seed: fraction unforgettable (learned, never forgotten), never
   learned, forgotten at least once; Spearman rho between an example's forgetting count
   and the presentation at which it was first learned (examples learned at least once).
   Stability (Toneva et al. report that the ordering is stable across seeds): the Spearman
   rho between the counts of two seeds, and between one seed's counts and the mean of the
   other seeds' (the more seeds averaged, the closer to the "true" ordering).
2. Pruning (Toneva et al., Sec. 5): ``lightning_ntk.forgetting.rank(run_files, seed=0)``
   sums the counts over the seeds (a run in which an example was never learned counts as
   its number of presentations, as in Toneva et al.'s code; seeded random tie-breaking);
   the least forgotten 20/40% (``--fractions``) are removed and the network is retrained
   from scratch (plain PyTorch loop, same optimiser, same number of epochs) on the rest;
   the same numbers of examples removed at random for comparison. Test accuracy: mean
   and standard deviation over retraining seeds (and, for random removal, over random
   subsets: one per retraining seed).
3. Overhead on the demo training (``DEMO_EPOCHS`` = 100 epochs, with its validation loader),
   ``--repeats`` alternating runs without and with the monitor: (a) accounted in each run
   with the monitor (``benchmarks/_accounting.py``): the time of Lightning's dispatches
   of the monitor's hooks and of the hooks themselves (less what the same dispatches
   cost without it, from the runs without), the forward hook, and the CPU time of the
   run file's writer thread, as a share of the same run's time without them, which stays
   meaningful when the machine's speed drifts; (b) A/B: ratios of median (and minimum)
   wall and process CPU times, which need an otherwise idle machine to resolve 2%.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ntk import callbacks  # noqa: E402
from lightning_ntk.callbacks._lightning import default_namespace  # noqa: E402
from lightning_ntk.demo import DEMO_EPOCHS, DigitsCNN, digits_split, make_lightning_module  # noqa: E402
from lightning_ntk.forgetting import rank, read_examples  # noqa: E402
from lightning_ntk.store import RunStore  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _accounting import HookClock, accounted_seconds, overhead_share, per_call_baseline, per_hook, share_of_run  # noqa: E402
from _tasks import task_split  # noqa: E402

ForgettingMonitor = callbacks.ForgettingMonitor
L = default_namespace()
BATCH, LR, MOMENTUM = 64, 0.05, 0.9


def lightning_trainer(epochs: int, monitors: list):
    return L.Trainer(max_epochs=epochs, callbacks=monitors, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                     deterministic=True)


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data.tensors
    return float((model(x).argmax(1) == y).float().mean())


def retrain(train, keep: np.ndarray, test, epochs: int, seed: int) -> float:
    """Train a fresh DigitsCNN on train[keep] (plain loop, the demo's optimiser); test accuracy."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loader = DataLoader(Subset(train, keep.tolist()), batch_size=BATCH, shuffle=True)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return accuracy(model, test)


def forgetting_runs(train, test, seeds, epochs, workdir):
    paths = []
    print(f"1. forgetting statistics: {len(train)} training examples, {epochs} epochs, seeds {list(seeds)}")
    print(f"{'seed':>5} {'unforgettable':>14} {'never learned':>14} {'forgotten>=1':>13} {'mean count':>11} "
          f"{'rho(count, first learned)':>26} {'test acc':>9}")
    tables = []
    for seed in seeds:
        path = os.path.join(workdir, f"seed{seed}.h5")
        torch.manual_seed(seed)
        module = make_lightning_module(DigitsCNN(), lr=LR, momentum=MOMENTUM, namespace=L)
        lightning_trainer(epochs, [ForgettingMonitor(path, overwrite=True, on_error="raise")]).fit(
            module, DataLoader(train, batch_size=BATCH, shuffle=True))
        t = read_examples(path)
        tables.append(t)
        paths.append(path)
        learned = ~t["never_learned"]
        rho = spearmanr(t["forgetting_count"][learned], t["first_learned_presentation"][learned]).statistic
        print(f"{seed:>5} {t['unforgettable'].mean():>14.3f} {t['never_learned'].mean():>14.3f} "
              f"{(t['forgetting_count'] > 0).mean():>13.3f} {t['forgetting_count'].mean():>11.3f} "
              f"{rho:>26.3f} {accuracy(module.model, test):>9.3f}")
    pairs = [(a, b) for i, a in enumerate(range(len(tables))) for b in range(i + 1, len(tables))]
    if pairs:
        counts = np.stack([t["forgetting_count"] for t in tables]).astype(float)
        rhos = [spearmanr(counts[a], counts[b]).statistic for a, b in pairs]
        print(f"Spearman rho of forgetting counts between two seeds ({len(pairs)} pairs): "
              + ", ".join(f"{r:.3f}" for r in rhos) + f"; mean {np.mean(rhos):.3f}")
        loo = [spearmanr(counts[i], np.delete(counts, i, axis=0).mean(0)).statistic for i in range(len(tables))]
        print(f"Spearman rho of one seed's counts with the mean of the other {len(tables) - 1}: "
              + ", ".join(f"{r:.3f}" for r in loo) + f"; mean {np.mean(loo):.3f}")
        ties = float(np.mean(counts == 0))
        print(f"share of (example, seed) counts at 0 (ties): {ties:.3f}")
    return paths


def pruning(train, test, paths, epochs, retrain_seeds, fractions=(0.2, 0.4)):
    n = len(train)
    ranking = rank(paths, seed=0)
    print(f"\n2. pruning: retrain from scratch on the kept examples, {epochs} epochs, retraining seeds "
          f"{list(retrain_seeds)}; test accuracy mean (std)")
    full = [retrain(train, np.arange(n), test, epochs, s) for s in retrain_seeds]
    print(f"{'removed':>8} {'kept':>5} {'by forgetting (least forgotten out)':>36} {'at random':>18} "
          f"{'removed: unforgettable in every seed':>37}")
    print(f"{'0%':>8} {n:>5} {np.mean(full):>28.4f} ({np.std(full):.4f}) {np.mean(full):>10.4f} ({np.std(full):.4f})")
    for f in fractions:
        keep = np.sort(ranking.indices_to_keep(f))
        removed = ranking.indices_to_prune(f)
        by_rank = [retrain(train, keep, test, epochs, s) for s in retrain_seeds]
        at_random = []
        for s in retrain_seeds:
            random_keep = np.sort(np.random.default_rng(1000 + s).choice(n, size=keep.shape[0], replace=False))
            at_random.append(retrain(train, random_keep, test, epochs, s))
        share = float(np.mean(ranking.forgetting_count[: removed.shape[0]] == 0))
        print(f"{f:>8.0%} {keep.shape[0]:>5} {np.mean(by_rank):>28.4f} ({np.std(by_rank):.4f}) "
              f"{np.mean(at_random):>10.4f} ({np.std(at_random):.4f}) {share:>37.3f}")


def overhead(repeats: int, epochs: int = DEMO_EPOCHS, seed: int = 0):
    """Section 3: the monitor's cost on the demo training, accounted in each run, and A/B."""
    train, val = digits_split(seed=seed)
    wall = {"without": [], "with": []}
    cpu = {"without": [], "with": []}
    runs = {"without": [], "with": []}
    writer_cpu = []
    workdir = tempfile.mkdtemp(prefix="forgetting_overhead_")
    path = os.path.join(workdir, "demo.h5")
    load_before = os.getloadavg()[0]
    clock = HookClock().install()

    def one(with_monitor: bool) -> tuple:
        torch.manual_seed(seed)
        module = make_lightning_module(DigitsCNN(), namespace=L)
        monitors = [ForgettingMonitor(path, overwrite=True)] if with_monitor else []
        trainer = lightning_trainer(epochs, monitors)
        clock.reset()
        started, started_cpu = time.perf_counter(), time.process_time()
        trainer.fit(module, DataLoader(train, batch_size=BATCH, shuffle=True), DataLoader(val, batch_size=256))
        elapsed = time.perf_counter() - started
        run = dict(clock.snapshot(), wall=elapsed)
        if with_monitor:
            writer_cpu.append(RunStore.closed_stats[os.path.realpath(path)]["background_cpu_s"])
        return elapsed, time.process_time() - started_cpu, run

    try:
        one(False), one(True)  # warm-up (imports, allocator)
        writer_cpu.clear()
        for r in range(repeats):
            order = (False, True) if r % 2 == 0 else (True, False)
            for with_monitor in order:
                key = "with" if with_monitor else "without"
                w, c, run = one(with_monitor)
                wall[key].append(w)
                cpu[key].append(c)
                runs[key].append(run)
    finally:
        clock.remove()
    baseline = per_call_baseline(runs["without"])
    accounted = [accounted_seconds(run, baseline) for run in runs["with"]]
    thread = [overhead_share(a, run["wall"]) for a, run in zip(accounted, runs["with"])]
    writer = [share_of_run(w, run["wall"], a) for w, a, run in zip(writer_cpu, accounted, runs["with"])]
    capture = [share_of_run(run["capture_s"], run["wall"], a) for a, run in zip(accounted, runs["with"])]
    total = [t + w for t, w in zip(thread, writer)]
    print(f"\n3. overhead on the demo training ({epochs} epochs, batch {BATCH}, validation each epoch, "
          f"{torch.get_num_threads()} threads), {repeats} alternating repeats each; load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("   accounted in each run with the monitor (benchmarks/_accounting.py), as a share of the same run's "
          "time without it:")
    print(f"     training thread (Lightning's dispatch of its hooks, the hooks, the forward hook): median "
          f"{100 * statistics.median(thread):.2f}% (all: {', '.join(f'{100 * x:.2f}%' for x in thread)}); "
          f"of which the forward hook {100 * statistics.median(capture):.2f}%")
    print("     by hook (median): " + ", ".join(f"{hook} {100 * share:+.2f}%"
                                          for hook, share in per_hook(runs["with"], baseline).items()))
    print(f"     writer thread CPU (HDF5 writes, gzip, fsync; beside the training thread): median "
          f"{100 * statistics.median(writer):.2f}%")
    print(f"     both: median {100 * statistics.median(total):.2f}%, max {100 * max(total):.2f}%")
    batches = [max(1, run["calls"].get("on_train_batch_end", 0)) for run in runs["with"]]
    per_batch = [1e6 * a / b for a, b in zip(accounted, batches)]
    per_batch_writer = [1e6 * w / b for w, b in zip(writer_cpu, batches)]
    step_ms = [1e3 * (run["wall"] - a) / b for run, a, b in zip(runs["with"], accounted, batches)]
    print(f"     per training batch ({batches[0]} batches a run): training thread median "
          f"{statistics.median(per_batch):.1f} µs, writer CPU {statistics.median(per_batch_writer):.1f} µs; "
          f"the demo's step without the monitor {statistics.median(step_ms):.2f} ms (wall time per batch, "
          "validation included)")
    for label, times in (("wall time", wall), ("process CPU time", cpu)):
        a, b = statistics.median(times["without"]), statistics.median(times["with"])
        pairs = [w / wo for w, wo in zip(times["with"], times["without"])]
        print(f"   A/B {label}: without {a:.3f} s, with {b:.3f} s (medians; minima {min(times['without']):.3f} s, "
              f"{min(times['with']):.3f} s); ratio of medians {b / a:.4f}, of minima "
              f"{min(times['with']) / min(times['without']):.4f}; per-pair ratios "
              f"{', '.join(f'{p:.3f}' for p in pairs)} (median {statistics.median(pairs):.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["noisy", "digits"], default="noisy")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--retrain-seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", choices=["none", "repro", "overhead"], default="none")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {L.__name__} {L.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    if args.skip != "repro":
        train, test = task_split(args.task, seed=0)
        print(f"task {args.task}: {len(train)} training / {len(test)} test images")
        with tempfile.TemporaryDirectory(prefix="repro_forgetting_") as workdir:
            started = time.perf_counter()
            paths = forgetting_runs(train, test, range(args.seeds), args.epochs, workdir)
            pruning(train, test, paths, args.epochs, range(args.retrain_seeds), tuple(args.fractions))
            print(f"(sections 1-2 took {time.perf_counter() - started:.0f} s)")
    if args.skip != "overhead":
        overhead(args.repeats)


if __name__ == "__main__":
    main()
