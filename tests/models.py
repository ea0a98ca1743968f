"""Small models and data shared by the tests (both Lightning namespaces)."""
from __future__ import annotations

import importlib
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


def namespace(name: str) -> Any:
    return importlib.import_module(name)


def blob_data(n: int = 96, dim: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Gaussian blobs: a small, learnable classification set."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 2.0
    y = torch.arange(n) % classes
    x = centers[y] + 0.7 * torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


def tiny_net(dim: int = 6, classes: int = 3, hidden: int = 16, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    layers = [nn.Linear(dim, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


def make_module(L: Any, net: Optional[nn.Module] = None, lr: float = 0.1, momentum: float = 0.0):
    class TinyModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net if net is not None else tiny_net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum)

    return TinyModule()


def make_manual_module(L: Any, net: Optional[nn.Module] = None):
    """make_module's module with manual optimisation: training_step steps the optimiser
    itself, returns nothing, and counts its steps."""

    class Manual(type(make_module(L))):
        def __init__(self) -> None:
            super().__init__()
            if net is not None:
                self.net = net
            self.automatic_optimization = False
            self.steps = 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()
            self.steps += 1

    return Manual()


def loader(ds: TensorDataset, batch_size: int = 16, shuffle: bool = True, **kwargs: Any) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, **kwargs)


def trainer(L: Any, callbacks: list, max_epochs: int = 2, **kwargs: Any):
    defaults = dict(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1, deterministic=True)
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)
