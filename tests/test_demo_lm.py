"""The LM demo: text, vocabulary, datasets, the causal transformer, and a tiny run of it."""
import math
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_ntk import demo_lm, open_run
from lightning_ntk.cli import main
from lightning_ntk.demo_lm import (
    IGNORE_INDEX,
    CharTransformerLM,
    causal_lm_loss,
    char_vocab,
    lm_datasets,
    lm_monitors,
    next_token_accuracy,
    pydoc_text,
    run_lm_demo,
)

#: The tiny run: 4 steps of 32 windows; the monitors' probes (128 training windows, the
#: held-out ones from 256 validation windows, a sharpness set of 32) fit in it.
TINY = dict(epochs=1, n_train=128, n_val=256, batch_size=32, quiet=True)


def test_text_and_vocabulary_round_trip():
    text = pydoc_text()
    assert text == pydoc_text() and len(text) > 100_000  # deterministic, ~460 000 characters
    vocab = char_vocab()
    assert 50 <= len(vocab) <= 200 and list(vocab.chars) == sorted(set(text))
    ids = vocab.encode(text[:5000])
    assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < len(vocab)
    assert vocab.decode(ids) == text[:5000]


def test_datasets_deterministic_disjoint_and_hf_convention():
    train, val = lm_datasets(seq_len=32, n_train=300, n_val=50, seed=3)
    again, again_val = lm_datasets(seq_len=32, n_train=300, n_val=50, seed=3)
    assert torch.equal(train.ids, again.ids) and torch.equal(val.ids, again_val.ids)
    assert not torch.equal(lm_datasets(seq_len=32, n_train=300, n_val=50, seed=4)[0].starts, train.starts)
    assert len(train) == 300 and len(val) == 50 and train.seq_len == 32
    text = pydoc_text()
    for ds in (train, val):
        starts = ds.starts.tolist()
        assert len(set(starts)) == len(starts) and all(s % 32 == 0 for s in starts)  # non-overlapping windows
        for i in (0, len(ds) // 2, len(ds) - 1):
            assert ds.vocab.decode(ds.ids[i]) == text[starts[i]:starts[i] + 32]
    assert int(train.starts.max()) + 32 <= int(val.starts.min())  # disjoint parts of the text
    item = train[5]
    assert set(item) == {"input_ids", "labels"} and torch.equal(item["labels"], item["input_ids"])
    assert item["labels"].data_ptr() != item["input_ids"].data_ptr()  # a copy
    batch = next(iter(DataLoader(train, batch_size=8)))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (8, 32)
    with pytest.raises(ValueError, match="validation windows"):
        lm_datasets(seq_len=64, n_train=10, n_val=10**6)


def test_model_shape_tied_head_and_causality():
    torch.manual_seed(0)
    v, t = 50, 16
    model = CharTransformerLM(v, max_len=t)
    assert model.head.weight is model.emb.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in set(model.parameters()))
    x = torch.randint(0, v, (3, t))
    assert model(x).shape == (3, t, v) and type(model(x)) is torch.Tensor
    # Independent check of the mask: changing token s changes no logit before s, and the
    # logits at s. Eval mode under no_grad takes PyTorch's fused encoder path, train mode the
    # plain one (dropout off, attention dropout included, so that two passes agree).
    model = CharTransformerLM(v, max_len=t, dropout=0.0)
    for mode in ("eval", "train"):
        model.train(mode == "train")
        with torch.no_grad():
            base = model(x)
            for s in (0, 5, t - 1):
                y = x.clone()
                y[:, s] = (y[:, s] + 1) % v
                out = model(y)
                torch.testing.assert_close(out[:, :s], base[:, :s], rtol=1e-5, atol=1e-5)
                assert not torch.allclose(out[:, s], base[:, s])


def test_loss_shifts_and_ignores():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 6, 7), torch.randint(0, 7, (2, 6))
    labels[0, 3] = IGNORE_INDEX
    keep = [(b, i) for b in range(2) for i in range(5) if labels[b, i + 1] != IGNORE_INDEX]
    want = torch.stack([torch.nn.functional.cross_entropy(logits[b, i], labels[b, i + 1]) for b, i in keep]).mean()
    torch.testing.assert_close(causal_lm_loss(logits, labels), want)
    hits = [bool(logits[b, i].argmax() == labels[b, i + 1]) for b, i in keep]
    assert float(next_token_accuracy(logits, labels)) == pytest.approx(sum(hits) / len(hits))


def test_tiny_run_completes_and_writes_a_run_file(tmp_path):
    # Two cheap monitors (a snapshot one, a per-batch one): every monitor is the slow test below.
    summary = run_lm_demo(str(tmp_path / "demo_lm.h5"), monitors=("probe_metrics", "forgetting"), **TINY)
    assert summary["steps"] == 4 and os.path.isfile(summary["path"])
    assert math.isfinite(summary["val_loss"]) and 0 <= summary["val_acc"] <= 1
    assert summary["uniform_loss"] == pytest.approx(math.log(summary["vocab_size"]))
    with open_run(summary["path"]) as run:
        assert "CharLanguageModel" in str(run.model)
        assert run.probes and "probe_metrics" in run.tables  # the monitors opened the file
    with pytest.raises(ValueError, match="groups"):
        run_lm_demo(str(tmp_path / "x.h5"), monitors=("no_such_monitor",), **TINY)


def test_cli_lm_defaults(monkeypatch):
    calls = []
    monkeypatch.setattr(demo_lm, "run_lm_demo", lambda out, **kw: calls.append((out, kw)))
    assert main(["demo", "--model", "lm", "--epochs", "2"]) == 0
    assert calls[-1] == ("runs/demo_lm.h5", dict(epochs=2, seed=0, quiet=False,
                                                 report=os.path.join("runs", "demo_lm_report")))
    assert main(["demo", "--model", "lm", "--out", "x/y.h5", "--no-report"]) == 0
    assert calls[-1] == ("x/y.h5", dict(epochs=demo_lm.LM_DEMO_EPOCHS, seed=0, quiet=False, report=None))


def _finite_row(view):
    """True when some row has every floating field finite; a field that is NaN in every row is
    left out (not applicable), but at least one field must be measured."""
    n = len(view)
    columns = [view[f].reshape(n, -1) for f in view.fields if f != "wall_time" and view[f].dtype.kind == "f"]
    columns = [c for c in columns if c.size and not np.isnan(c).all()]
    if not n or not columns:
        return False
    return bool(np.logical_and.reduce([np.isfinite(c).all(axis=1) for c in columns]).any())


@pytest.mark.slow  # every monitor on per-token outputs (~20-40 s on 2 busy cores)
def test_lm_demo_every_monitor_records(tmp_path):
    summary = run_lm_demo(str(tmp_path / "demo_lm.h5"), **TINY)
    groups = [m.group for m in lm_monitors(summary["path"])]
    assert len(groups) == 6
    with open_run(summary["path"]) as run:
        assert run.errors() == []
        for group in groups:
            tables = [t for t in run.tables if t == group or t.startswith(group + "/")]
            assert tables, (group, run.tables)
            for table in tables:
                assert _finite_row(run[table]), table
