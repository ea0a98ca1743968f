"""Crash and resume with ckpt_path="last", every monitor in one file: the resumed file equals
the file of an uninterrupted run (steps strictly increasing, every value equal)."""
import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from lightning_ntk.callbacks import (
    ActivationCodeMonitor,
    ForgettingMonitor,
    NTKMonitor,
    ProbeMetricsMonitor,
    RepresentationMonitor,
    SharpnessMonitor,
)
from lightning_ntk.probe import Probe
from lightning_ntk.schedule import EveryNEpochs
from lightning_ntk.store import open_run

from .models import blob_data, make_module, tiny_net, trainer

BATCHES_PER_EPOCH = 6  # 96 examples, batch 16
EPOCHS = 3


class ResumableSampler(Sampler):
    """A shuffle seeded by (seed, epoch) (Lightning calls set_epoch before each epoch), which
    skips the batches a mid-epoch checkpoint had already served."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        start, self.skip = self.skip, 0
        return iter(order[start:])


class ResumableLoader(DataLoader):
    """A DataLoader with Lightning's state_dict / load_state_dict: its position within an
    epoch survives a checkpoint, so a resumed run sees the batches of an uninterrupted one."""

    def __init__(self, dataset, batch_size=16, seed=0):
        self.order = ResumableSampler(len(dataset), seed)
        super().__init__(dataset, batch_sampler=BatchSampler(self.order, batch_size, drop_last=False))
        self.batches_served = 0

    def __iter__(self):
        self.batches_served = self.order.skip // self.batch_sampler.batch_size
        for batch in super().__iter__():
            self.batches_served += 1
            yield batch

    def state_dict(self):
        return {"batches": self.batches_served}

    def load_state_dict(self, state):
        done = state["batches"] >= len(self.batch_sampler)
        self.order.skip = 0 if done else state["batches"] * self.batch_sampler.batch_size


def monitors(path):
    common = dict(on_error="raise", budget=False)
    return [
        ProbeMetricsMonitor(path, schedule=2, probe=Probe(size=24), **common),
        NTKMonitor(path, schedule=3, probe=Probe(size=12), k=3, heldout=Probe(size=9, seed=5), velocity_dt=2, **common),
        SharpnessMonitor(path, schedule=4, sharpness_set=32, k=2, trace=True, trace_queries=6, density=True,
                         density_steps=6, **common),
        ForgettingMonitor(path, **common),
        ActivationCodeMonitor(path, schedule=EveryNEpochs(1), probe=Probe(size=30), heldout=Probe(size=15, seed=3),
                              **common),
        RepresentationMonitor(path, schedule=EveryNEpochs(1), probe=Probe(size=60), few_shot=((3, 2),), n_query=4,
                              episodes=10, **common),
    ]


class Crash(Exception):
    pass


def _fit(L, path, ckpt_dir, checkpoint_kwargs, crash_at=None, ckpt_path=None):
    callbacks = monitors(path)
    callbacks.append(L.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=1,
                                                 **checkpoint_kwargs))
    if crash_at is not None:
        class CrashAt(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == crash_at:
                    raise Crash(f"simulated crash at step {crash_at}")

        callbacks.append(CrashAt())
    torch.manual_seed(0)
    module = make_module(L, tiny_net(), momentum=0.9)
    t = trainer(L, callbacks, max_epochs=EPOCHS, enable_checkpointing=True, num_sanity_val_steps=0)
    t.fit(module, ResumableLoader(blob_data()), ckpt_path=ckpt_path)


def _assert_same_file(path, ref_path):
    with open_run(path) as run, open_run(ref_path) as ref:
        assert sorted(run.tables) == sorted(ref.tables)
        assert run.errors() == []
        for group in ref.tables:
            a, b = run[group], ref[group]
            assert a.fields == b.fields, group
            if a.key == "step":  # one row per snapshot; detail tables (events) several per step
                steps = np.diff(a["step"])
                assert np.all(steps > 0) if "/" not in group else np.all(steps >= 0), group
            for field in b.fields:
                if field in ("wall_time", "snapshot_seconds"):
                    continue
                va, vb = np.asarray(a[field]), np.asarray(b[field])
                assert va.shape == vb.shape, (group, field)
                if va.dtype.kind == "f":
                    np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-6, equal_nan=True,
                                               err_msg=f"{group}/{field}")
                else:
                    np.testing.assert_array_equal(va, vb, err_msg=f"{group}/{field}")


CASES = {
    # checkpoint at a step where snapshots were taken (steps 12: probe metrics, NTK, sharpness)
    "step_boundary": (dict(every_n_train_steps=4), 14),
    # checkpoint at step 8 (epoch 1, batch 2): no snapshot due there, two steps run after it
    "mid_epoch": (dict(every_n_train_steps=8), 10),
    # checkpoint at the end of epoch 1 (step 12), crash three steps into epoch 2
    "epoch_end": (dict(every_n_epochs=1), 15),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_from_last_equals_an_uninterrupted_run(L, tmp_path, case):
    checkpoint_kwargs, crash_at = CASES[case]
    ref_path = str(tmp_path / "reference.h5")
    _fit(L, ref_path, tmp_path / "ckpt_ref", checkpoint_kwargs)

    path = str(tmp_path / "run.h5")
    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(Crash):
        _fit(L, path, ckpt_dir, checkpoint_kwargs, crash_at=crash_at)
    with open_run(path) as run:  # the crashed file holds rows written after the last checkpoint
        assert run["probe_metrics"]["step"][-1] >= crash_at - 2
    _fit(L, path, ckpt_dir, checkpoint_kwargs, ckpt_path="last")
    _assert_same_file(path, ref_path)
    with open_run(path) as run:
        assert [h["event"] for h in run.history] == ["created", "resumed"]
