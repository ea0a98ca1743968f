"""The language-model demo: a small character-level causal transformer with every monitor on.

``lightning-ntk demo --model lm`` (or ``./dev demo --model lm``) trains it, writes
``runs/demo_lm.h5`` and prints a summary. The text is the documentation that ships with every
Python install (``pydoc_data.topics``, ~460 000 characters of English and code): nothing is
downloaded. Batches follow the Hugging Face causal-LM convention: a dict with ``input_ids``
and ``labels`` equal to them, and the model's loss shifts (logits at position ``t`` predict the
label at ``t + 1``). The pieces (text, vocabulary, datasets, model) are reused by the tests
and benchmarks.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .callbacks._lightning import default_namespace

#: Targets equal to this are left out of the loss (PyTorch's and Hugging Face's convention).
IGNORE_INDEX = -100


def pydoc_text() -> str:
    """The documentation topics of ``pydoc_data.topics``, concatenated in sorted key order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


class CharVocab:
    """A character vocabulary: the sorted set of the characters of a text (~100 for the topics)."""

    def __init__(self, chars: Sequence[str]):
        self.chars: Tuple[str, ...] = tuple(chars)
        if len(set(self.chars)) != len(self.chars) or not all(isinstance(c, str) and len(c) == 1 for c in self.chars):
            raise ValueError("CharVocab: chars must be distinct single characters")
        self.index: Dict[str, int] = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as an int64 tensor of token ids (a character outside the vocabulary is a KeyError)."""
        return torch.tensor([self.index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: Union[torch.Tensor, Sequence[int]]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} characters)"


def char_vocab() -> CharVocab:
    """The vocabulary of :func:`pydoc_text` (depends on the Python version's documentation)."""
    return CharVocab.from_text(pydoc_text())


class CharLMDataset(Dataset):
    """Windows of ``seq_len`` tokens; item ``i`` is ``{"input_ids": ids[i], "labels": ids[i]}``.

    ``labels`` is a copy of ``input_ids`` (the Hugging Face causal-LM convention: the model's
    loss shifts). ``starts[i]`` is the window's offset (in characters) in :func:`pydoc_text`.
    The default collate function turns a list of items into a dict batch of (B, T) tensors.
    """

    def __init__(self, ids: torch.Tensor, starts: torch.Tensor, vocab: CharVocab):
        if ids.ndim != 2 or ids.dtype != torch.int64 or starts.shape != ids.shape[:1]:
            raise ValueError("CharLMDataset: ids must be an (N, T) int64 tensor and starts an (N,) tensor")
        self.ids, self.starts, self.vocab = ids, starts, vocab

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        x = self.ids[i]
        return {"input_ids": x, "labels": x.clone()}

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])


#: Fraction of the text (its end) that validation windows come from; training windows come
#: from the rest, so the two never share a character.
VAL_FRACTION = 0.1


def lm_datasets(seq_len: int = 64, n_train: int = 2048, n_val: int = 256, seed: int = 0,
                text: Optional[str] = None) -> Tuple[CharLMDataset, CharLMDataset]:
    """Seeded train / validation datasets of non-overlapping ``seq_len``-character windows.

    The text is cut into consecutive windows (offsets ``0, seq_len, 2 seq_len, ...``); the
    last :data:`VAL_FRACTION` of them is the validation part. ``n_train`` and ``n_val``
    windows are drawn without replacement (seeded) from each part and kept in text order.
    The vocabulary (``.vocab`` of both datasets) is that of the whole text.
    """
    for name, value in (("seq_len", seq_len), ("n_train", n_train), ("n_val", n_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"lm_datasets: {name} must be a positive integer, got {value!r}")
    if seq_len < 2:
        raise ValueError(f"lm_datasets: seq_len must be at least 2 (one prediction), got {seq_len}")
    text = pydoc_text() if text is None else text
    vocab = CharVocab.from_text(text)
    n_windows = len(text) // seq_len
    n_val_part = max(1, int(round(n_windows * VAL_FRACTION)))
    n_train_part = n_windows - n_val_part
    if n_train > n_train_part or n_val > n_val_part:
        raise ValueError(f"lm_datasets: the text has {n_train_part} training and {n_val_part} validation windows of "
                         f"{seq_len} characters; asked for {n_train} and {n_val}")
    all_ids = vocab.encode(text[: n_windows * seq_len]).view(n_windows, seq_len)
    generator = torch.Generator().manual_seed(seed)
    train_rows = torch.randperm(n_train_part, generator=generator)[:n_train].sort().values
    val_rows = n_train_part + torch.randperm(n_val_part, generator=generator)[:n_val].sort().values
    return tuple(CharLMDataset(all_ids[rows].clone(), rows * seq_len, vocab)  # type: ignore[return-value]
                 for rows in (train_rows, val_rows))


class CharTransformerLM(nn.Module):
    """A causal transformer language model over a small vocabulary.

    Token and learned positional embeddings, ``n_layers`` pre-LN ``nn.TransformerEncoderLayer``
    blocks under a causal mask, a final LayerNorm and an output head tied to the token
    embedding. ``forward(input_ids)`` returns the logits, (B, T, V).
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2, d_ff: int = 256,
                 max_len: int = 64, dropout: float = 0.1):
        super().__init__()
        self.max_len = max_len
        self.emb = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=d_ff, dropout=dropout, batch_first=True,
                                       norm_first=True)
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.emb.weight  # tied
        nn.init.normal_(self.emb.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[-1]
        if t > self.max_len:
            raise ValueError(f"CharTransformerLM: sequences of {t} tokens; the positional embedding has {self.max_len}")
        h = self.drop(self.emb(input_ids) + self.pos(torch.arange(t, device=input_ids.device)))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=input_ids.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits at ``t`` against labels at ``t + 1`` (``IGNORE_INDEX`` left out)."""
    v = logits.shape[-1]
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction=reduction)


def next_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    hits = (logits[:, :-1].argmax(-1) == target) & keep
    return hits.sum().float() / keep.sum().clamp(min=1)


def make_lm_module(model: nn.Module, lr: float = 3e-3, weight_decay: float = 0.01, namespace: Any = None):
    """Wrap ``model`` in a LightningModule (shifted causal-LM cross-entropy, AdamW) of the given
    Lightning namespace. Batches are dicts with ``input_ids`` and ``labels``."""
    L = namespace or default_namespace()

    class CharLanguageModel(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.lr = lr
            self.weight_decay = weight_decay

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids)

        def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = causal_lm_loss(self(batch["input_ids"]), batch["labels"])
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
            logits = self(batch["input_ids"])
            self.log("val_loss", causal_lm_loss(logits, batch["labels"]))
            self.log("val_acc", next_token_accuracy(logits, batch["labels"]))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    CharLanguageModel.__qualname__ = "CharLanguageModel"
    return CharLanguageModel()


@torch.no_grad()
def generate(model: nn.Module, vocab: CharVocab, prompt: str, n: int = 80) -> str:
    """Greedy continuation of ``prompt`` by ``n`` characters (eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        ids = vocab.encode(prompt).unsqueeze(0)
        for _ in range(n):
            logits = model(ids[:, -model.max_len:])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return vocab.decode(ids[0, len(prompt):])
    finally:
        model.train(was_training)


#: Epochs of the LM demo: 960 steps of 32 windows (~35 ms each on 2 CPU cores, ~37 s of
#: training with validation), to a validation loss of ~1.73 nats per character (uniform:
#: log V = 4.63).
LM_DEMO_EPOCHS = 15
LM_DEMO_SEQ_LEN = 64
LM_DEMO_N_TRAIN = 2048
LM_DEMO_N_VAL = 256
LM_DEMO_BATCH_SIZE = 32


def lm_monitors(path: str, overwrite: bool = True) -> List[Any]:
    """Every monitor the package has, sharing ``path``, with the demo's schedules and modest
    probe and kernel sizes; otherwise their defaults (no ``task=``, ``batch_format=``,
    ``forward_fn=`` or loss given: the monitors read the dict batches and the per-token
    outputs themselves).

    ``budget=False``: every scheduled snapshot is taken. The eNTK is the costly one on a
    language model (per-token outputs, a sketched kernel): it runs on 2 positions of 16
    training sequences (32 pairs, ~1 s a snapshot on 2 CPU cores) at log-spaced steps (0, 1,
    10, 100 and the end), without a held-out probe: kernel regression of 103-way next
    characters from 32 pairs says little, and 16 held-out pairs doubled the snapshot's cost.
    The probe metrics leave out the per-token logits (``store_logits=False``): 128 sequences ×
    64 positions × V floats per snapshot would be most of the file (51 MB instead of 6 MB).
    """
    from . import callbacks
    from .probe import Probe
    from .schedule import EveryNEpochs, LogSpacedSteps

    common = dict(path=path, overwrite=overwrite, budget=False)
    return [
        callbacks.ProbeMetricsMonitor(schedule=EveryNEpochs(1), probe=Probe(size=128), store_logits=False, **common),
        callbacks.NTKMonitor(schedule=LogSpacedSteps(per_decade=1), probe=Probe(size=16), token_positions=2,
                             **common),
        callbacks.SharpnessMonitor(schedule=EveryNEpochs(5), sharpness_set=32, **common),
        callbacks.ForgettingMonitor(**common),
        callbacks.ActivationCodeMonitor(schedule=EveryNEpochs(5), probe=Probe(size=128), **common),
        callbacks.RepresentationMonitor(schedule=EveryNEpochs(5), probe=Probe(size=128), **common),
    ]


def run_lm_demo(path: str = "runs/demo_lm.h5", epochs: int = LM_DEMO_EPOCHS, seed: int = 0,
                batch_size: int = LM_DEMO_BATCH_SIZE, report: Optional[str] = None, quiet: bool = False,
                monitors: Union[bool, Sequence[str]] = True, n_train: int = LM_DEMO_N_TRAIN, n_val: int = LM_DEMO_N_VAL,
                seq_len: int = LM_DEMO_SEQ_LEN) -> Dict[str, Any]:
    """Train the LM demo and write ``path`` (and an HTML report into the directory ``report``,
    if given); returns a summary dict (also printed).

    ``monitors``: True for every monitor of :func:`lm_monitors`, a sequence of their groups
    (``"ntk"``, ``"sharpness"``, ...) for some of them, False for none (to time the
    monitors' share: no run file is written and ``report`` must be None).
    """
    if report and not monitors:
        raise ValueError("run_lm_demo: a report needs the run file, which monitors=False does not write")
    if not isinstance(monitors, bool):
        groups = [m.group for m in lm_monitors(path)]
        unknown = [g for g in monitors if g not in groups]
        if isinstance(monitors, str) or unknown:
            raise ValueError(f"run_lm_demo: monitors must be a bool or a sequence of groups from {groups}; "
                             f"got {monitors!r}")
    L = default_namespace()
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    train, val = lm_datasets(seq_len=seq_len, n_train=n_train, n_val=n_val, seed=seed)
    net = CharTransformerLM(len(train.vocab), max_len=seq_len)
    module = make_lm_module(net, namespace=L)
    callbacks: List[Any] = []
    if monitors:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        callbacks = [m for m in lm_monitors(path) if monitors is True or m.group in monitors]
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=not quiet, enable_model_summary=False, accelerator="cpu",
                        devices=1, deterministic=True)
    started = time.perf_counter()
    trainer.fit(module, DataLoader(train, batch_size=batch_size, shuffle=True),
                DataLoader(val, batch_size=256))
    elapsed = time.perf_counter() - started
    metrics = trainer.callback_metrics
    summary: Dict[str, Any] = {
        "path": os.path.abspath(path) if monitors else None, "seconds": elapsed, "steps": int(trainer.global_step),
        "vocab_size": len(train.vocab), "uniform_loss": math.log(len(train.vocab)),
        "train_loss": float(metrics.get("train_loss", float("nan"))),
        "val_loss": float(metrics.get("val_loss", float("nan"))),
        "val_acc": float(metrics.get("val_acc", float("nan"))),
        "tables": {}, "errors": [],
    }
    if monitors:
        from .store import open_run

        with open_run(path) as run:
            summary["tables"] = {t: len(run[t]) for t in run.tables}
            summary["errors"] = run.errors()
            if not quiet:
                print(run.summary())
    if not quiet:
        prompt = "The "
        print(f"\ntrained {epochs} epochs ({summary['steps']} steps) in {elapsed:.1f}s; validation loss "
              f"{summary['val_loss']:.3f} nats/char (uniform: log {summary['vocab_size']} = "
              f"{summary['uniform_loss']:.3f}), next-character accuracy {summary['val_acc']:.3f}")
        print(f"greedy sample: {prompt!r} -> {generate(net, train.vocab, prompt, 60)!r}")
    if report:
        from .analysis import write_report

        summary["report"] = os.path.abspath(write_report([path], report, progress=not quiet))
    if not quiet:
        if monitors:
            print(f"run file: {summary['path']}")
        if report:
            print(f"report:   {summary['report']}")
    return summary
