"""ForgettingMonitor with both Lightning namespaces, against what the LightningModule itself saw.

The reference: the test's own LightningModule records, in ``training_step``, the dataset
index of each example (carried by the batch, which the monitor is not told about), the
correctness of its own logits, p(gold), loss and margin, and ``trainer.global_step``.
Counts and cartography are then recomputed here with plain loops and NumPy.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_ntk import callbacks
from lightning_ntk.callbacks.forgetting import ForgettingCaptureError
from lightning_ntk.forgetting import WithIndex, rank, read_examples
from lightning_ntk.schedule import EveryNEpochs
from lightning_ntk.store import open_run

from .models import tiny_net, trainer

ForgettingMonitor = callbacks.ForgettingMonitor


# --------------------------------------------------------------------------------------
# Data, a module that records what it saw, and the reference
# --------------------------------------------------------------------------------------
def noisy_blobs(n: int = 96, seed: int = 0) -> TensorDataset:
    """Overlapping 3-class blobs: examples near the boundaries get forgotten."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 6, generator=g)
    y = torch.arange(n) % 3
    return TensorDataset(centers[y] + torch.randn(n, 6, generator=g), y)


def recording_module(L, *, lr=0.5, dropout=0.0, call_self=True, return_dict=False, loader_fn=None, extra_calls=0):
    """A LightningModule that records, per training batch, what its own forward pass gave."""

    class Recording(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_net(dropout=dropout)
            self.seen = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y, index = batch
            for k in range(1, extra_calls + 1):  # other outputs of self(...) before the logits
                self(x[:k])
            logits = self(x) if call_self else self.net(x)
            z = logits.detach().double()
            log_p = torch.log_softmax(z, 1)[torch.arange(len(y)), y]
            others = z.clone()
            others[torch.arange(len(y)), y] = -np.inf
            self.seen.append({
                "step": self.trainer.global_step, "epoch": self.trainer.current_epoch,
                "index": index.numpy().copy(), "correct": (z.argmax(1) == y).numpy(),
                "p_true": log_p.exp().numpy(), "loss": (-log_p).numpy(),
                "margin": (z[torch.arange(len(y)), y] - others.max(1).values).numpy(),
                "largest_logit": z.abs().amax(1).numpy()})
            loss = nn.functional.cross_entropy(logits, y)
            if return_dict:
                return {"loss": loss, "logits": logits, "index": index}
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

        if loader_fn is not None:
            def train_dataloader(self):
                return loader_fn()

    return Recording()


def concat(seen, key):
    return np.concatenate([np.broadcast_to(np.asarray(b[key]), b["index"].shape) for b in seen])


def reference(seen, n):
    """Counts and cartography per example, from the recorded presentations (plain loops)."""
    index, correct, step, epoch, p = (concat(seen, k) for k in ("index", "correct", "step", "epoch", "p_true"))
    out = {k: np.zeros(n, dtype=np.int64) for k in ("presentations", "forgetting_count", "learning_count")}
    out["first_learned_step"] = np.full(n, -1)
    out["first_learned_presentation"] = np.full(n, -1)
    for name in ("confidence", "variability", "correctness"):
        out[name] = np.full(n, np.nan)
    for i in range(n):
        rows = np.flatnonzero(index == i)
        prev = 0
        for t, r in enumerate(rows):
            c = int(correct[r])
            out["forgetting_count"][i] += prev == 1 and c == 0
            out["learning_count"][i] += prev == 0 and c == 1
            if c and out["first_learned_step"][i] < 0:
                out["first_learned_step"][i], out["first_learned_presentation"][i] = step[r], t
            prev = c
        out["presentations"][i] = len(rows)
        epochs = np.unique(epoch[rows])
        if len(epochs):
            per_epoch_p = np.array([p[rows][epoch[rows] == e].mean() for e in epochs])
            per_epoch_c = np.array([correct[rows][epoch[rows] == e].mean() for e in epochs])
            out["confidence"][i], out["variability"][i] = per_epoch_p.mean(), np.std(per_epoch_p)
            out["correctness"][i] = per_epoch_c.mean()
    out["never_learned"] = out["learning_count"] == 0
    out["unforgettable"] = (out["learning_count"] > 0) & (out["forgetting_count"] == 0)
    return out


def assert_file_matches(path, seen, n, group="forgetting"):
    """Events in the file = the module's presentations, in order; summary = the reference."""
    ref = reference(seen, n)
    with open_run(path) as run:
        events, examples = run[f"{group}/events"], run[f"{group}/examples"]
        np.testing.assert_array_equal(events["index"], concat(seen, "index"))
        np.testing.assert_array_equal(events["correct"], concat(seen, "correct"))
        np.testing.assert_array_equal(events["step"], concat(seen, "step"))
        np.testing.assert_array_equal(events["epoch"], concat(seen, "epoch"))
        # The monitor computes in float32, the reference in float64 from the same logits: a
        # small loss (z_y - logsumexp z, cancelling) is off by up to ~half a float32 step of
        # the largest logit, however the CPU's kernels round.
        tolerance = 1e-6 + 4 * np.finfo(np.float32).eps * concat(seen, "largest_logit")
        for key in ("p_true", "loss", "margin"):
            expected = concat(seen, key)
            off = np.abs(np.asarray(events[key], dtype=np.float64) - expected)
            assert np.all(off <= 1e-5 * np.abs(expected) + tolerance), (key, float(np.max(off - tolerance)))
        np.testing.assert_array_equal(examples["index"], np.arange(n))
        for key in ("presentations", "forgetting_count", "learning_count", "first_learned_step",
                    "first_learned_presentation", "never_learned", "unforgettable"):
            np.testing.assert_array_equal(examples[key], ref[key], err_msg=key)
        for key in ("confidence", "variability", "correctness"):
            np.testing.assert_allclose(examples[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
        assert np.all(examples["forgetting_count"] <= examples["presentations"] // 2)
    return ref


def fit(L, monitors, module, data=None, *, epochs=3, batch_size=10, seed=0, loader_kwargs=None, **trainer_kwargs):
    torch.manual_seed(seed)
    t = trainer(L, monitors, max_epochs=epochs, **trainer_kwargs)
    if data is None:
        t.fit(module)
    else:
        t.fit(module, DataLoader(data, batch_size=batch_size, shuffle=True, **(loader_kwargs or {})))
    return t


# --------------------------------------------------------------------------------------
# Paper-faithful recording
# --------------------------------------------------------------------------------------
def test_records_keyed_by_index_under_shuffle_drop_last_and_accumulation(L, run_path):
    module = recording_module(L)
    monitor = ForgettingMonitor(run_path, on_error="raise", flush_every=4)
    t = fit(L, [monitor], module, WithIndex(noisy_blobs()), epochs=4, loader_kwargs={"drop_last": True},
            accumulate_grad_batches=2)
    assert t.global_step == 4 * 5  # 9 micro-batches per epoch (drop_last), an optimizer step every 2
    ref = assert_file_matches(run_path, module.seen, 96)
    assert ref["forgetting_count"].sum() > 0 and ref["never_learned"].any() and ref["unforgettable"].any()
    # drop_last: 6 examples sit out each (shuffled) epoch
    assert ref["presentations"].sum() == 4 * 90 and ref["presentations"].min() < 4
    # micro-batches of one accumulation window share the step of their optimizer update
    steps = concat(module.seen, "step")
    assert np.sum(steps == 0) == 20
    metrics = t.callback_metrics
    np.testing.assert_allclose(float(metrics["forgetting/unforgettable_fraction"]), ref["unforgettable"].mean())
    np.testing.assert_allclose(float(metrics["forgetting/forgotten_fraction"]),
                               np.mean(ref["forgetting_count"] > 0))
    np.testing.assert_allclose(float(metrics["forgetting/mean_forgetting_count"]), ref["forgetting_count"].mean())
    with open_run(run_path) as run:
        config = run.config["ForgettingMonitor[forgetting]"]
        assert config["mode"] == "train" and "Toneva" in config["definition"]
        assert run["forgetting/examples"].written_step == t.global_step


@pytest.mark.parametrize("persistent", [False, True])
def test_num_workers_and_stale_prefetched_index_batches(L, run_path, persistent):
    """Workers prefetch index batches; limit_train_batches leaves some unconsumed each epoch."""
    module = recording_module(L)
    fit(L, [ForgettingMonitor(run_path, on_error="raise")], module, WithIndex(noisy_blobs()), epochs=3,
        loader_kwargs={"num_workers": 2, "persistent_workers": persistent}, limit_train_batches=4)
    assert len(module.seen) == 12
    assert_file_matches(run_path, module.seen, 96)


def test_resume_from_a_mid_epoch_checkpoint(L, tmp_path):
    path = str(tmp_path / "run.h5")
    data = WithIndex(noisy_blobs())
    ckpt_dir = tmp_path / "ckpt"
    first = recording_module(L)
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=4, save_top_k=-1,
                                             filename="{step}")
    fit(L, [ForgettingMonitor(path, on_error="raise", flush_every=3), checkpoint], first, data, epochs=3,
        loader_kwargs={"drop_last": True}, enable_checkpointing=True)
    # Resume from step 12: mid-epoch 1 (9 batches per epoch). The file holds rows written after it.
    second = recording_module(L)
    torch.manual_seed(7)
    t = trainer(L, [ForgettingMonitor(path, on_error="raise", flush_every=3)], max_epochs=3)
    t.fit(second, DataLoader(data, batch_size=10, shuffle=True, drop_last=True), ckpt_path=str(ckpt_dir / "step=12.ckpt"))
    before = [b for b in first.seen if b["step"] < 12]
    assert len(before) == 12 and second.seen and second.seen[0]["epoch"] == 1
    ref = assert_file_matches(path, before + second.seen, 96)
    assert ref["forgetting_count"].sum() > 0
    with open_run(path) as run:
        assert [h["event"] for h in run.history] == ["created", "resumed"]


def test_reloaded_dataloaders_are_recorded_from_their_first_batch(L, run_path):
    data = WithIndex(noisy_blobs())
    module = recording_module(L, loader_fn=lambda: DataLoader(data, batch_size=12, shuffle=True))
    fit(L, [ForgettingMonitor(run_path, on_error="raise")], module, epochs=3, reload_dataloaders_every_n_epochs=1)
    assert len(module.seen) == 24
    assert_file_matches(run_path, module.seen, 96)


def test_two_monitors_share_the_loader_and_everything_is_restored(L, run_path):
    from torch.utils.data import BatchSampler

    module = recording_module(L)
    data = DataLoader(WithIndex(noisy_blobs()), batch_size=10, shuffle=True)
    monitors = [ForgettingMonitor(run_path, name="a", on_error="raise"),
                ForgettingMonitor(run_path, name="b", on_error="raise", flush_every=1)]
    torch.manual_seed(0)
    t = trainer(L, monitors, max_epochs=2)
    t.fit(module, data)
    assert_file_matches(run_path, module.seen, 96, group="forgetting_a")
    assert_file_matches(run_path, module.seen, 96, group="forgetting_b")
    assert type(data.batch_sampler) is BatchSampler
    assert "process_dataloader" not in vars(t.strategy)


@pytest.mark.parametrize("write_interval", [0, 3600])
def test_write_interval_decides_when_the_file_is_written(L, run_path, write_interval):
    monitor = ForgettingMonitor(run_path, on_error="raise", write_interval=write_interval)
    written = []

    class Watch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            writer = monitor._store._background
            if writer is not None:  # let the writer thread finish what it was handed (forces nothing)
                writer.wait_idle()
            examples = monitor._tables["forgetting/examples"]
            written.append((trainer.global_step, examples.written_step,
                            monitor._tables["forgetting/events"].n_committed))

    module = recording_module(L)
    fit(L, [monitor, Watch()], module, WithIndex(noisy_blobs()), epochs=3)
    if write_interval == 0:  # every epoch end: the summary and every event row so far
        assert written == [(10, 10, 96), (20, 20, 192), (30, 30, 288)]
    else:  # nothing until the end of training
        assert written == [(10, -1, 0), (20, -1, 0), (30, -1, 0)]
    assert_file_matches(run_path, module.seen, 96)
    # flush_every=None: 256 batches, as 256 batches of these logits (10 x 3 float32) fit 16 MiB
    assert monitor.flush_every is None and monitor._flush_every == 256


def test_epoch_ends_process_every_write_interval_whatever_the_flush_points(L, run_path):
    """Writes at flush points (every batch here) do not postpone the epoch-end processing:
    it has its own write_interval clock (a fake one: one second per batch)."""
    monitor = ForgettingMonitor(run_path, on_error="raise", flush_every=1, write_interval=4.5)
    clock = [0.0]
    monitor._clock = lambda: clock[0]
    logged = []

    class Tick(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock[0] += 1.0

        def on_train_epoch_end(self, trainer, pl_module):
            if monitor._store._background is not None:  # what was handed over is in the file
                monitor._store._background.wait_idle()
            logged.append((trainer.global_step, "forgetting/unforgettable_fraction" in trainer.callback_metrics,
                           monitor._tables["forgetting/examples"].written_step))

    module = recording_module(L)
    fit(L, [monitor, Tick()], module, WithIndex(noisy_blobs()), epochs=3)
    # epochs of 10 batches (10 s): every epoch end is 10 s after the previous processing
    assert logged == [(10, True, 10), (20, True, 20), (30, True, 30)]
    assert_file_matches(run_path, module.seen, 96)


def test_logits_found_after_many_other_forward_calls(L, run_path):
    """Outputs of other row counts made before the logits in training_step are passed over."""
    module = recording_module(L, extra_calls=6)
    fit(L, [ForgettingMonitor(run_path, on_error="raise")], module, WithIndex(noisy_blobs()), epochs=2)
    assert_file_matches(run_path, module.seen, 96)


def test_a_subclass_batch_start_hook_is_still_called(L, run_path):
    calls = []

    class Counting(ForgettingMonitor):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            calls.append(batch_idx)

    module = recording_module(L)
    t = fit(L, [Counting(run_path, on_error="raise")], module, WithIndex(noisy_blobs()), epochs=2)
    assert len(calls) == t.global_step == 20
    assert_file_matches(run_path, module.seen, 96)


# --------------------------------------------------------------------------------------
# Fallbacks and errors
# --------------------------------------------------------------------------------------
class IndexedStream(IterableDataset):
    """An iterable dataset: no sampler, so the batch must carry the index."""

    def __init__(self, data: TensorDataset, batch_size: int = 16):
        self.x, self.y = data.tensors
        self.batch_size = batch_size

    def __iter__(self):
        order = torch.randperm(len(self.y))
        for start in range(0, len(order), self.batch_size):
            i = order[start:start + self.batch_size]
            yield self.x[i], self.y[i], i


def test_index_key_for_an_iterable_dataset(L, run_path):
    module = recording_module(L)
    monitor = ForgettingMonitor(run_path, index_key=-1, num_examples=96, on_error="raise")
    torch.manual_seed(0)
    trainer(L, [monitor], max_epochs=2).fit(module, DataLoader(IndexedStream(noisy_blobs()), batch_size=None))
    assert len(module.seen) == 12
    assert_file_matches(run_path, module.seen, 96)
    with open_run(run_path) as run:  # no first example before training: the task is told at the first batch
        assert run["forgetting/events"].attrs["task"] == ""


def test_a_given_task_is_recorded_even_when_it_cannot_be_seen_before_training(L, run_path):
    monitor = ForgettingMonitor(run_path, index_key=-1, num_examples=96, task="multiclass", on_error="raise")
    torch.manual_seed(0)
    trainer(L, [monitor], max_epochs=1).fit(recording_module(L), DataLoader(IndexedStream(noisy_blobs()),
                                                                            batch_size=None))
    with open_run(run_path) as run:
        assert run["forgetting/events"].attrs["task"] == "multiclass"
        assert run.config["ForgettingMonitor[forgetting]"]["task"] == "multiclass"


def test_logits_and_index_returned_by_training_step(L, run_path):
    """training_step does not call the module itself and returns {'loss', 'logits', 'index'}."""
    module = recording_module(L, call_self=False, return_dict=True)
    fit(L, [ForgettingMonitor(run_path, on_error="raise")], module, WithIndex(noisy_blobs()), epochs=2)
    assert_file_matches(run_path, module.seen, 96)


def test_nothing_to_capture_is_a_clear_error_or_a_warning(L, tmp_path):
    with pytest.raises(ForgettingCaptureError, match="found no logits.*return \\{'loss': loss, 'logits': logits\\}"):
        fit(L, [ForgettingMonitor(str(tmp_path / "a.h5"), on_error="raise")], recording_module(L, call_self=False),
            WithIndex(noisy_blobs()), epochs=1)
    with pytest.raises(ForgettingCaptureError, match="IterableDataset.*WithIndex.*index_key"):
        trainer(L, [ForgettingMonitor(str(tmp_path / "b.h5"), num_examples=96, on_error="raise")], max_epochs=1).fit(
            recording_module(L), DataLoader(IndexedStream(noisy_blobs()), batch_size=None))
    module = recording_module(L, call_self=False)
    with pytest.warns(RuntimeWarning, match="disabled for the rest of this run.*found no logits"):
        t = fit(L, [ForgettingMonitor(str(tmp_path / "c.h5"))], module, WithIndex(noisy_blobs()), epochs=2)
    assert t.global_step == 20


@pytest.mark.parametrize("dataset", ["tensor", "with_index"])
def test_another_consumer_of_the_training_loader_is_detected(L, run_path, dataset):
    """Iterating the training loader mid-epoch would shift the recorded queue: a clear error instead."""

    class Peek(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                next(iter(trainer.train_dataloader))

    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = noisy_blobs() if dataset == "tensor" else WithIndex(noisy_blobs())
    with pytest.raises(ForgettingCaptureError, match="second pass over the training DataLoader's sampler"):
        fit(L, [ForgettingMonitor(run_path, on_error="raise"), Peek()], Plain(), data, epochs=1, batch_size=16)


def indexed_blobs(n: int = 96) -> TensorDataset:
    """noisy_blobs whose third tensor is the index: the labels check of a TensorDataset applies,
    and the recording module sees the index (the monitor is not told about it)."""
    blobs = noisy_blobs(n)
    return TensorDataset(*blobs.tensors, torch.arange(n))


@pytest.mark.parametrize("flush_every, through, workers, when", [
    (None, "torch", 0, "between and within"), (3, "torch", 0, "between and within"),
    (3, "numpy", 0, "between and within"), (3, "torch", 2, "between and within"),
    (3, "torch", "persistent", "between and within"), (1000, "numpy", 0, "changed and undone")])
def test_labels_changed_in_place_during_training_are_no_capture_error(L, run_path, flush_every, through, workers,
                                                                      when):
    """Relabelling the TensorDataset in place (label noise, pseudo-labels) between and within
    epochs, through torch or a NumPy view, with or without DataLoader workers (which keep
    their own copy of the dataset: the old labels until they restart, or for good when
    persistent), or a change undone an epoch later: batches carry the labels of their time,
    and the check of the recorded indices against the dataset's labels must not mistake
    that for a broken pairing."""
    data = indexed_blobs()
    labels = data.tensors[1]
    flipped = torch.arange(0, 96, 7)

    def relabel(step=1):
        if through == "torch":
            labels[flipped] = (labels[flipped] + step) % 3
        else:  # through a NumPy view of the same memory
            view = labels.numpy()
            view[flipped.numpy()] = (view[flipped.numpy()] + step) % 3

    class Relabelling(type(recording_module(L))):
        def on_train_epoch_start(self):  # after the callbacks' epoch start hooks
            if when == "changed and undone":
                if self.current_epoch in (1, 2):
                    relabel(1 if self.current_epoch == 1 else -1)
            elif self.current_epoch in (1, 3):
                relabel()

        def training_step(self, batch, batch_idx):
            if when != "changed and undone" and self.current_epoch == 2 and batch_idx == 4:  # mid-epoch
                relabel()
            return super().training_step(batch, batch_idx)

    module = Relabelling()
    loader_kwargs = ({} if not workers else
                     {"num_workers": 2, "persistent_workers": workers == "persistent"})
    monitor = ForgettingMonitor(run_path, on_error="raise", flush_every=flush_every,
                                write_interval=1e9 if flush_every == 1000 else 5.0)
    fit(L, [monitor], module, data, epochs=5, loader_kwargs=loader_kwargs)
    assert len(module.seen) == 50
    assert_file_matches(run_path, module.seen, 96)
    assert monitor._labels.dataset is None  # the dataset is not kept alive after fit
    assert "_labels" not in monitor.__getstate__()


def nested_subset(data: TensorDataset):
    """Subset(Subset(data, a), b): labels reach the check through two index maps."""
    from torch.utils.data import Subset

    g = torch.Generator().manual_seed(3)
    outer = Subset(data, torch.randperm(len(data), generator=g)[:80].tolist())
    return Subset(outer, torch.randperm(80, generator=g)[:64].tolist())


@pytest.mark.parametrize("dataset", ["tensor", "nested subset"])
def test_labels_check_catches_indices_that_do_not_follow_the_batch(L, run_path, dataset):
    """A collate_fn that reorders the examples of a batch: the sampler's index batch no longer
    pairs with the rows trained on, which only the TensorDataset labels check can see; the
    same training with the plain collate passes the check (the labels of a Subset of a
    Subset are looked up through both index maps)."""
    from torch.utils.data import default_collate

    def reversed_collate(samples):
        return default_collate(samples[::-1])

    data = indexed_blobs() if dataset == "tensor" else nested_subset(indexed_blobs())
    with pytest.raises(ForgettingCaptureError, match="do not match the targets of the batches trained on"):
        fit(L, [ForgettingMonitor(run_path, on_error="raise")], recording_module(L), data, epochs=1,
            batch_size=16, loader_kwargs={"collate_fn": reversed_collate})
    module = recording_module(L)
    fit(L, [ForgettingMonitor(str(run_path) + ".plain.h5", on_error="raise")], module, data, epochs=2,
        batch_size=16)
    # the recording module saw the TensorDataset's own index (third tensor); the monitor keys by
    # the Subset's index: map one to the other before comparing
    if dataset == "nested subset":
        base_of = np.array([int(data[i][2]) for i in range(len(data))])
        position = {int(b): i for i, b in enumerate(base_of)}
        for batch in module.seen:
            batch["index"] = np.array([position[int(b)] for b in batch["index"]])
    assert_file_matches(str(run_path) + ".plain.h5", module.seen, len(data))


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="eval"), "mode must be one of 'train'"),
    (dict(mode="probe"), "use ProbeForgettingMonitor"),
    (dict(budget=0.1), "budget= does not apply"),
    (dict(schedule=5), "schedule= does not apply"),
    (dict(forward_fn=lambda m, x: m(x)), "forward_fn= does not apply"),
    (dict(probe=(torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))), "probe= does not apply"),
    (dict(index_key=1.5), "index_key must be"),
    (dict(outputs_key=""), "outputs_key must be"),
    (dict(flush_every=0), "flush_every must be"),
    (dict(write_interval=-1), "write_interval must be"),
    (dict(num_examples=0), "num_examples must be"),
    (dict(batch_format="xy"), "batch_format must be"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ForgettingMonitor("run.h5", **kwargs)


# --------------------------------------------------------------------------------------
# Probe mode and the file-level ranking
# --------------------------------------------------------------------------------------
def test_probe_mode_is_an_eval_pass_on_the_probe(L, run_path):
    data = noisy_blobs()
    x, y = data.tensors
    module = recording_module(L, dropout=0.5)
    monitor = callbacks.ProbeForgettingMonitor(run_path, probe=(x[:30], y[:30]), schedule=EveryNEpochs(1),
                                               on_error="raise", budget=False)  # every scheduled snapshot
    fit(L, [monitor], module, WithIndex(data), epochs=3)
    module.eval()
    with torch.no_grad():
        final_correct = (module(x[:30]).argmax(1) == y[:30]).numpy()
    with open_run(run_path) as run:
        events, examples = run["forgetting/events"], run["forgetting/examples"]
        np.testing.assert_array_equal(np.unique(events["step"]), [0, 10, 20, 30])  # step 0 and each epoch end
        assert len(events) == 4 * 30
        np.testing.assert_array_equal(events["index"][-30:], np.arange(30))
        np.testing.assert_array_equal(events["correct"][-30:], final_correct)
        correct = events["correct"].reshape(4, 30)
        forgotten = ((correct[:-1] == 1) & (correct[1:] == 0)).sum(0)
        np.testing.assert_array_equal(examples["forgetting_count"], forgotten)
        np.testing.assert_array_equal(examples["presentations"], np.full(30, 4))
        assert run.config["ProbeForgettingMonitor[forgetting]"]["mode"] == "probe"
        assert "NOT Toneva" in run.config["ProbeForgettingMonitor[forgetting]"]["definition"]
        assert "NOT Toneva" in events.attrs["definition"]


def test_rank_from_one_and_several_run_files(L, tmp_path):
    paths, refs = [], []
    for seed in (0, 1):
        path = str(tmp_path / f"seed{seed}.h5")
        module = recording_module(L)
        fit(L, [ForgettingMonitor(path, on_error="raise", fsync=False)], module, WithIndex(noisy_blobs()), epochs=2,
            seed=seed)
        paths.append(path)
        refs.append(reference(module.seen, 96))
    counts = [r["forgetting_count"] for r in refs]
    never = [r["never_learned"] for r in refs]
    shown = [r["presentations"] for r in refs]
    one = rank(paths[0], seed=3)
    np.testing.assert_array_equal(one.order, rank(counts[0], never[0], 3, presentations=shown[0]).order)
    both = rank(paths, seed=3)
    np.testing.assert_array_equal(both.order, rank(counts, never, 3, presentations=shown).order)
    np.testing.assert_array_equal(both.indices_to_prune(0.25), rank(counts, never, 3, presentations=2).order[:24])
    np.testing.assert_array_equal(rank(paths, seed=3, never_learned_value="inf").order,
                                  rank(counts, never, 3, never_learned_value="inf").order)
    with open_run(paths[1]) as run:  # an open Run works too
        np.testing.assert_array_equal(rank([paths[0], run], seed=3).order, both.order)
    # A summary that a crash left mid-rewrite: the event log is replayed.
    with h5py.File(paths[0], "r+") as f:
        f["forgetting/examples/written_step"][0] = -1
    replayed = read_examples(paths[0])
    for key in ("presentations", "forgetting_count", "learning_count", "first_learned_step", "never_learned"):
        np.testing.assert_array_equal(replayed[key], refs[0][key], err_msg=key)
    np.testing.assert_allclose(replayed["confidence"], refs[0]["confidence"], rtol=1e-5)
    np.testing.assert_array_equal(rank(paths, seed=3).order, both.order)
    with pytest.raises(ValueError, match="replay=None"):
        read_examples(paths[0], replay=False)
    with pytest.raises(TypeError, match="seed= by keyword"):
        rank(paths[0], 3)


def test_tracker_update_with_per_example_steps_equals_the_reference():
    """What the monitor does at each flush: several batches (with repeats) in one update call."""
    from lightning_ntk.forgetting import ForgettingTracker

    rng = np.random.default_rng(0)
    seen = []
    for step in range(30):
        epoch = step // 10
        index = rng.integers(0, 12, size=5)  # sampling with replacement: repeats within and across batches
        seen.append({"step": step, "epoch": epoch, "index": index, "correct": rng.random(5) < 0.6,
                     "p_true": rng.random(5)})
    tracker = ForgettingTracker(12)
    for epoch in range(3):
        block = [b for b in seen if b["epoch"] == epoch]
        tracker.update(concat(block, "index"), concat(block, "correct"), concat(block, "p_true"),
                       step=concat(block, "step"))
        tracker.end_epoch()
    ref = reference(seen, 12)
    summary = tracker.summary()
    for key in ("presentations", "forgetting_count", "learning_count", "first_learned_step",
                "first_learned_presentation", "never_learned", "unforgettable"):
        np.testing.assert_array_equal(summary[key], ref[key], err_msg=key)
    for key in ("confidence", "variability", "correctness"):
        np.testing.assert_allclose(summary[key], ref[key], rtol=1e-12, err_msg=key)
    assert ref["forgetting_count"].sum() > 0


def test_recorded_logits_are_those_of_the_forward_pass(L, run_path, tmp_path):
    """A module that changes its output in place after the step (in its own
    on_train_batch_end, which runs after the callbacks') and whose forward returns a view
    of a larger tensor: the events equal those of the same training with neither, and the
    buffered logits hold no more memory than themselves."""
    from .models import blob_data, loader

    held = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            held.extend(p.logits.untyped_storage().nbytes() == p.logits.numel() * p.logits.element_size()
                        for p in monitor._pending)

    events = {}
    for mess, path in ((False, run_path), (True, str(tmp_path / "mess.h5"))):
        torch.manual_seed(1)
        monitor = callbacks.ForgettingMonitor(path, on_error="raise")
        module = _mutating_module(L, zero_from=-1 if mess else NEVER, view=mess)
        trainer(L, [monitor, Spy()], max_epochs=2).fit(module, loader(blob_data(n=48), batch_size=16))
        events[mess] = _events(path)
    assert held and all(held)
    for key in ("index", "correct", "margin", "p_true"):
        np.testing.assert_array_equal(events[True][key], events[False][key], err_msg=key)
    assert np.any(events[False]["margin"] != 0)


NEVER = 10 ** 9


def _mutating_module(L, zero_from: int, view: bool = False, how: str = "detach"):
    """A module whose own on_train_batch_end zeroes its logits in place once the global step
    exceeds ``zero_from`` (``NEVER``: never), through ``how``: ``"detach"`` (an in-place op
    on a detached alias, which autograd's version counter sees), ``"data"`` or ``"numpy"``
    (writes the version counter does not see). ``view``: its forward returns the logits as
    a view of a 51x larger tensor."""
    from torch.nn import functional as F

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = tiny_net()

        def forward(self, x):
            z = self.net(x)
            if not view:
                return z
            wide = torch.cat([torch.zeros(z.shape[0], 50, z.shape[1]), z[:, None, :]], dim=1)
            return wide[:, -1, :]  # the same values, as a view of a 51x larger tensor

        def training_step(self, batch, batch_idx):
            self.last_logits = self(batch[0])
            return F.cross_entropy(self.last_logits, batch[1])

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.trainer.global_step > zero_from:  # the step has been taken: global_step counts it
                if how == "detach":
                    self.last_logits.detach().zero_()
                elif how == "data":
                    self.last_logits.data.zero_()
                else:
                    self.last_logits.detach().numpy()[...] = 0.0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return M()


def _events(path):
    with open_run(path) as run:
        return {k: np.asarray(run["forgetting/events"][k]) for k in ("index", "correct", "margin", "p_true")}


@pytest.mark.parametrize("how", ["detach", "data", "numpy"])
def test_logits_changed_in_place_after_a_later_batch_are_recorded_as_computed(L, run_path, tmp_path, how):
    """A module that starts zeroing its own (non-view) logits in place from the third step
    on, including through ``.data`` and NumPy, writes autograd's version counter does not
    count (so a monitor that kept the output and checked its version would record wrong
    values silently): the events equal those of the same training without the change."""
    from .models import blob_data, loader

    events = {}
    for zero_from, path in ((NEVER, run_path), (2, str(tmp_path / "zeroed.h5"))):
        torch.manual_seed(1)
        trainer(L, [callbacks.ForgettingMonitor(path, on_error="raise")], max_epochs=2).fit(
            _mutating_module(L, zero_from, how=how), loader(blob_data(n=48), batch_size=16))
        events[zero_from] = _events(path)
    for key in ("index", "correct", "margin", "p_true"):
        np.testing.assert_array_equal(events[2][key], events[NEVER][key], err_msg=key)
    assert np.any(events[NEVER]["margin"] != 0)


def test_the_forward_hook_leaves_autograd_as_it_found_it(L, run_path):
    """The hook copies the logits with autograd off: after it, grad mode is what it was
    (off inside the module's own no_grad block, on otherwise), the loss still has its graph,
    and the copies are not part of any graph."""
    from torch.nn import functional as F

    from .models import blob_data, loader, make_module

    modes, buffered = [], []

    class M(type(make_module(L))):
        def training_step(self, batch, batch_idx):
            x, y = batch
            with torch.no_grad():
                self(x[:1])  # not per-example logits of the batch: skipped by the monitor
                modes.append(torch.is_grad_enabled())
            logits = self(x)
            modes.append(torch.is_grad_enabled())
            assert logits.requires_grad and logits.grad_fn is not None
            return F.cross_entropy(logits, y)

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            buffered.extend((p.logits.requires_grad, p.logits.grad_fn) for p in monitor._pending)

    monitor = ForgettingMonitor(run_path, on_error="raise", flush_every=1000)
    trainer(L, [monitor, Spy()], max_epochs=1).fit(M(), loader(blob_data(n=48), batch_size=16))
    assert modes == [False, True] * 3
    assert buffered and all(flag is False and fn is None for flag, fn in buffered)
    with open_run(run_path) as run:
        assert len(run["forgetting/events"]) == 48


@pytest.mark.parametrize("fail", [False, True])
def test_the_last_rows_are_written_by_the_training_thread(L, run_path, monkeypatch, fail):
    """At the end of training the rows left are written in the training thread, which
    waits for them anyway (no hand-off to the writer thread); a failure of that write
    reaches fit with on_error='raise'."""
    import threading

    from lightning_ntk.store import RunStore, StoreError

    original = RunStore._flush_now
    ending, writes = [], []  # writes: (thread, event rows committed after the write)

    class Ending(L.Callback):  # runs before the monitor's on_train_end
        def on_train_end(self, trainer, pl_module):
            ending.append(True)

    def flush_now(self):
        if fail and ending:
            raise StoreError(f"writing run file {self.path} failed: Input/output error (EIO)")
        original(self)
        events = monitor._tables.get("forgetting/events")
        if events is not None:
            writes.append((threading.current_thread().name, events.n_committed))

    monkeypatch.setattr(RunStore, "_flush_now", flush_now)
    monitor = ForgettingMonitor(run_path, on_error="raise", write_interval=3600)
    fit_ = trainer(L, [Ending(), monitor], max_epochs=3).fit
    args = (recording_module(L), DataLoader(WithIndex(noisy_blobs(48)), batch_size=16, shuffle=True))
    if fail:
        with pytest.raises(StoreError, match="Input/output error"):
            fit_(*args)
        return
    fit_(*args)
    assert ending
    complete = [thread for thread, rows in writes if rows == 3 * 48]
    assert complete and complete[0] == threading.main_thread().name  # the write of the last rows
    with open_run(run_path) as run:
        assert len(run["forgetting/events"]) == 3 * 48


def test_a_loader_returning_batches_out_of_order_is_refused(L, run_path):
    """in_order=False: workers hand batches back as they finish, not in sampler order."""
    data = DataLoader(WithIndex(noisy_blobs()), batch_size=12, num_workers=2, in_order=False)
    with pytest.warns(RuntimeWarning, match="in_order=False"):
        trainer(L, [ForgettingMonitor(run_path)], max_epochs=1).fit(recording_module(L), data)


def test_a_probe_forgetting_monitor_starts_each_fit_afresh(L, tmp_path):
    x, y = noisy_blobs().tensors
    monitor = callbacks.ProbeForgettingMonitor(str(tmp_path / "a.h5"), probe=(x[:30], y[:30]),
                                               schedule=EveryNEpochs(1), on_error="raise", budget=False)
    for name in ("a", "b"):
        monitor.path = str(tmp_path / f"{name}.h5")
        fit(L, [monitor], recording_module(L), WithIndex(noisy_blobs()), epochs=2)
        with open_run(monitor.path) as run:
            np.testing.assert_array_equal(run["forgetting/examples"]["presentations"], np.full(30, 3))
