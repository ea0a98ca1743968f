"""Module and datamodule classes for the LightningCLI test, one per Lightning namespace."""
import functools

import torch
from torch import nn

from .models import blob_data, loader, tiny_net


@functools.lru_cache(maxsize=None)
def cli_module_class(L):
    class CliModule(L.LightningModule):
        def __init__(self, lr: float = 0.1):
            super().__init__()
            self.lr = lr
            self.net = tiny_net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return CliModule


@functools.lru_cache(maxsize=None)
def cli_datamodule_class(L):
    class CliData(L.LightningDataModule):
        def __init__(self, batch_size: int = 16):
            super().__init__()
            self.batch_size = batch_size

        def train_dataloader(self):
            return loader(blob_data(), batch_size=self.batch_size)

    return CliData
