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


# ---------------------------------------------------------------- sequences
LM_VOCAB, LM_LENGTH = 7, 6


class TinyLM(nn.Module):
    """A one-block causal transformer LM with tied embeddings: ids (B, T) -> logits (B, T, V);
    ``hf_output=True`` returns an object with ``.logits`` (as Hugging Face models do)."""

    def __init__(self, vocab: int = LM_VOCAB, dim: int = 8, hf_output: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(LM_LENGTH, dim))
        self.block = nn.TransformerEncoderLayer(dim, 2, 16, batch_first=True, dropout=0.0)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.hf_output = hf_output

    def forward(self, ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> Any:
        t = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=self.head.weight.dtype)
        pad = None if attention_mask is None else attention_mask == 0
        logits = self.head(self.block(self.emb(ids) + self.pos[:t], src_mask=mask, is_causal=True,
                                      src_key_padding_mask=pad))
        if self.hf_output:
            from types import SimpleNamespace

            return SimpleNamespace(logits=logits, loss=None)
        return logits


class TokenData(torch.utils.data.Dataset):
    """Sequences of a repeating pattern with noise, as Hugging Face dict items: input_ids,
    labels (= input_ids, the model shifts; the last ``pad`` positions -100) and attention_mask."""

    def __init__(self, n: int = 48, seed: int = 0, pad: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, LM_VOCAB, (n, 1), generator=g)
        ids = (start + torch.arange(LM_LENGTH)) % LM_VOCAB
        flip = torch.rand(n, LM_LENGTH, generator=g) < 0.1
        self.ids = torch.where(flip, torch.randint(0, LM_VOCAB, (n, LM_LENGTH), generator=g), ids)
        self.labels = self.ids.clone()
        self.mask = torch.ones_like(self.ids)
        if pad:
            self.labels[::2, -pad:] = -100  # every other sequence padded at its end
            self.mask[::2, -pad:] = 0

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "attention_mask": self.mask[i]}


def make_lm_module(L: Any, net: Optional[nn.Module] = None, lr: float = 0.1):
    """A causal LM module in the Hugging Face convention: the loss shifts the labels."""

    class TinyLMModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net if net is not None else TinyLM()

        def forward(self, ids, attention_mask=None):
            return self.net(ids, attention_mask)

        def training_step(self, batch, batch_idx):
            out = self(batch["input_ids"], batch.get("attention_mask"))
            logits = getattr(out, "logits", out)
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    return TinyLMModule()
