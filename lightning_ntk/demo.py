"""The demo: a small CNN trained on scikit-learn's digits with every monitor on.

``lightning-ntk demo`` (or ``./dev demo``) trains it, writes ``runs/demo.h5`` and prints a
summary. The data ships inside scikit-learn (1797 real 8×8 images, 10 classes): nothing is
downloaded. The pieces (data, model) are reused by the tests and benchmarks.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .callbacks._lightning import default_namespace


def digits_tensors(dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 8, 8) images scaled to [0, 1] and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=dtype).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.int64)
    return x, y


def digits_split(n_train: int = 1440, seed: int = 0) -> Tuple[TensorDataset, TensorDataset]:
    """A seeded, stratified train/validation split of the digits."""
    from .probe import stratified_indices

    x, y = digits_tensors()
    train_idx = stratified_indices(y.numpy(), n_train, seed=seed)
    val_idx = np.setdiff1d(np.arange(len(y)), train_idx)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])


class DigitsCNN(nn.Module):
    """Two 3×3 conv layers (padding 1, ReLU, 2×2 max-pool after the second) and two Linear."""

    def __init__(self, width: int = 16, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_lightning_module(model: nn.Module, lr: float = 0.05, momentum: float = 0.9, namespace: Any = None):
    """Wrap ``model`` in a LightningModule (cross-entropy, SGD) of the given Lightning namespace."""
    L = namespace or default_namespace()

    class DigitsClassifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.lr = lr
            self.momentum = momentum

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    DigitsClassifier.__qualname__ = "DigitsClassifier"
    return DigitsClassifier()


#: Epochs of the demo training (2,300 steps of ~2.5 ms on 2 CPU cores, ~6 s): long enough
#: for the late phase (kernel velocity decaying, sharpness settling, forgetting counts)
#: and for per-training fixed costs (opening the run file, the final durable write) to be
#: small next to the training, as they are in real trainings.
DEMO_EPOCHS = 100


#: The demo's budget (``set_default_budget`` during its fit), shared by its monitors:
#: instrumentation at most 10% of training time (the library's default is 5%), the first and
#: last snapshot of each monitor sized to fit half of it (:mod:`lightning_ntk.sizing`).
DEMO_BUDGET = 0.10


def demo_monitors(path: str, overwrite: bool = True) -> List[Any]:
    """Every monitor the package has, configured for the demo, sharing ``path`` and the
    default budget (:data:`DEMO_BUDGET` in :func:`run_demo`): sizes (probes, sharpness set)
    are chosen at train start so that the monitors' snapshots stay within it, and the
    governor thins the snapshots in between (skipped ones are in ``/skipped``)."""
    from . import callbacks
    from .probe import Probe
    from .schedule import EveryNEpochs, LogSpacedSteps

    common = dict(path=path, overwrite=overwrite)
    monitors: List[Any] = [
        callbacks.ProbeMetricsMonitor(schedule=EveryNEpochs(1), **common),
        callbacks.NTKMonitor(schedule=LogSpacedSteps(per_decade=4), heldout=Probe(size=100, source="val"), **common),
        # the trace's 20 Hutch++ products beside Lanczos' ~40; the SLQ density (another Lanczos
        # run per snapshot) would double a snapshot: a monitor of its own where wanted
        callbacks.SharpnessMonitor(schedule=EveryNEpochs(4), trace=True, trace_queries=20, **common),
        callbacks.ForgettingMonitor(**common),
        callbacks.ActivationCodeMonitor(schedule=EveryNEpochs(10), **common),
        callbacks.RepresentationMonitor(schedule=EveryNEpochs(10), **common),
    ]
    return monitors


def run_demo(path: str = "runs/demo.h5", epochs: int = DEMO_EPOCHS, seed: int = 0, batch_size: int = 64,
             report: Optional[str] = None, quiet: bool = False) -> Dict[str, Any]:
    """Train the demo and write ``path`` (and an HTML report into the directory ``report``,
    if given); returns a summary dict (also printed)."""
    L = default_namespace()
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    train, val = digits_split(seed=seed)
    module = make_lightning_module(DigitsCNN(), namespace=L)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    monitors = demo_monitors(path)
    trainer = L.Trainer(max_epochs=epochs, callbacks=monitors, logger=False, enable_checkpointing=False,
                        enable_progress_bar=not quiet, enable_model_summary=False, accelerator="cpu",
                        devices=1, deterministic=True)
    from .callbacks import set_default_budget

    previous = set_default_budget(DEMO_BUDGET)
    started = time.perf_counter()
    try:
        trainer.fit(module, DataLoader(train, batch_size=batch_size, shuffle=True),
                    DataLoader(val, batch_size=256))
    finally:
        set_default_budget(previous)
    elapsed = time.perf_counter() - started
    from .store import open_run

    with open_run(path) as run:
        summary = {"path": os.path.abspath(path), "seconds": elapsed, "tables": {t: len(run[t]) for t in run.tables},
                   "val_acc": float(trainer.callback_metrics.get("val_acc", float("nan")))}
        if not quiet:
            print(run.summary())
            print(f"\ntrained {epochs} epochs in {elapsed:.1f}s; validation accuracy {summary['val_acc']:.3f}")
    if report:
        from .analysis import write_report

        summary["report"] = os.path.abspath(write_report([path], report, progress=not quiet))
    if not quiet:
        print(f"run file: {summary['path']}")
        if report:
            print(f"report:   {summary['report']}")
    return summary
