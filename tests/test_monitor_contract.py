"""What every monitor must satisfy, written once and parametrised over the six monitors
(each in a small configuration whose schedule fires a few times in a 12-18 step training)
and, where a Trainer runs, over both Lightning namespaces (the ``L`` fixture).

Contracts:
  trajectory   final weights with the monitor equal the weights without it
  resume       crash after a checkpoint, resume into the same file: every dataset of the
               file (timing fields aside) equals the file of an uninterrupted run
  ddp          2-process DDP equals one process (one pair of subprocess runs with every
               monitor, shared with tests/test_ddp.py: see ``ddp_runs`` in conftest.py)
  pickling     pickle / deepcopy before and after fit; each copy fits again, same tables
  arguments    a bad common argument is refused with a message naming the monitor class
  errors       a failing measurement: on_error="warn" warns, writes one /errors row naming
               the monitor and trains to the end (a second monitor in the file unaffected);
               on_error="raise" stops fit with the error

Only the public API is used (the monitors' constructors, ``open_run``, h5py), so the
tests hold across refactors of the monitors' internals.
"""
from __future__ import annotations

import copy
import pickle

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from lightning_ntk import callbacks
from lightning_ntk.probe import Probe
from lightning_ntk.store import open_run

from .models import NAMESPACES, blob_data, loader, make_module, namespace, tiny_net, trainer
from .test_resume import ResumableLoader

CLASSES = {
    "probe_metrics": "ProbeMetricsMonitor",
    "ntk": "NTKMonitor",
    "sharpness": "SharpnessMonitor",
    "forgetting": "ForgettingMonitor",
    "codes": "ActivationCodeMonitor",
    "representations": "RepresentationMonitor",
}
MONITORS = list(CLASSES)
SNAPSHOT_MONITORS = [m for m in MONITORS if m != "forgetting"]  # measure on a schedule, through forward_fn


def make_monitor(kind: str, path: str, **kwargs):
    """A small, fast configuration of each monitor; ``kwargs`` override or add arguments."""
    settings = dict(on_error="raise", budget=False)
    if kind == "probe_metrics":
        settings.update(schedule=3, probe=Probe(size=24))
    elif kind == "ntk":
        settings.update(schedule=3, probe=Probe(size=12), k=3, heldout=Probe(size=9, seed=5))
    elif kind == "sharpness":
        settings.update(schedule=3, sharpness_set=32, k=2, trace=True, trace_queries=6)
    elif kind == "forgetting":
        settings.update(flush_every=2)  # rows reach the file between checkpoints
    elif kind == "codes":
        settings.update(schedule=3, probe=Probe(size=30), heldout=Probe(size=15, seed=3), kmeans_n_init=1)
    elif kind == "representations":
        settings.update(schedule=3, probe=Probe(size=60), heldout=None, few_shot=((3, 2),), n_query=4,
                        episodes=10)
    settings.update(kwargs)
    return getattr(callbacks, CLASSES[kind])(path, **settings)


def groups_of(run, group: str):
    """The tables a monitor writes: its group and the subgroups under it (forgetting/events)."""
    return [t for t in run.tables if t == group or t.startswith(group + "/")]


def _fit(L, callbacks_, *, net_kwargs=None):
    """12 steps (2 epochs of 6 shuffled batches), seeded."""
    torch.manual_seed(0)
    module = make_module(L, tiny_net(**(net_kwargs or {})))
    t = trainer(L, callbacks_, max_epochs=2)
    t.fit(module, loader(blob_data()))
    return module, t


TIMING = ("wall_time", "snapshot_seconds")  # fields that hold clock readings, not measurements


def datasets(path):
    """Every dataset of the file (path -> array), timing fields aside."""
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1] not in TIMING:
            out[name] = obj[()]

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def assert_same_datasets(got, expected, what=""):
    assert sorted(got) == sorted(expected), what
    for name, want in expected.items():
        have = got[name]
        assert have.shape == want.shape and have.dtype == want.dtype, (what, name, have.shape, want.shape)
        if want.dtype.kind == "f":
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=f"{what} {name}")
        else:
            np.testing.assert_array_equal(have, want, err_msg=f"{what} {name}")


# --------------------------------------------------------------------------------------
# trajectory
# --------------------------------------------------------------------------------------
_plain_weights = {}


def _trajectory_fit(L, callbacks_):
    """Dropout + BatchNorm + a shuffled loader: every source of RNG use and state change."""
    module, t = _fit(L, callbacks_, net_kwargs=dict(dropout=0.3, batchnorm=True))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, t


@pytest.mark.parametrize("kind", MONITORS)
def test_training_trajectory_unchanged(L, tmp_path, kind):
    if L.__name__ not in _plain_weights:
        _plain_weights[L.__name__] = _trajectory_fit(L, [])[0]
    plain = _plain_weights[L.__name__]
    path = str(tmp_path / "run.h5")
    monitored, t = _trajectory_fit(L, [make_monitor(kind, path)])
    assert list(monitored) == list(plain)
    for name in plain:
        assert torch.equal(monitored[name], plain[name]), name
    with open_run(path) as run:  # the monitor did measure
        tables = groups_of(run, kind)
        assert tables and all(len(run[g]) > 0 for g in tables)
        assert run.errors() == []


# --------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------
class Crash(Exception):
    pass


RESUME_EPOCHS = 3  # 6 batches of 16 per epoch: 18 steps
CHECKPOINT_EVERY = 8  # mid-epoch (epoch 1, batch 2), no snapshot due there
CRASH_AT = 11  # after the snapshot at step 9: rows past the checkpoint are in the file


def _resume_fit(L, kind, path, ckpt_dir, crash_at=None, ckpt_path=None):
    callbacks_ = [make_monitor(kind, path),
                  L.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=1,
                                              every_n_train_steps=CHECKPOINT_EVERY)]
    if crash_at is not None:
        class CrashAt(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == crash_at:
                    raise Crash(f"simulated crash at step {crash_at}")

        callbacks_.append(CrashAt())
    # The resumed fit starts from another RNG state: what it writes must come from the checkpoint.
    torch.manual_seed(0 if ckpt_path is None else 123)
    module = make_module(L, tiny_net(), momentum=0.9)
    t = trainer(L, callbacks_, max_epochs=RESUME_EPOCHS, enable_checkpointing=True, num_sanity_val_steps=0)
    t.fit(module, ResumableLoader(blob_data()), ckpt_path=ckpt_path)


@pytest.mark.parametrize("kind", MONITORS)
def test_resume_equals_uninterrupted(L, tmp_path, kind):
    reference = str(tmp_path / "reference.h5")
    _resume_fit(L, kind, reference, tmp_path / "ckpt_reference")

    path = str(tmp_path / "run.h5")
    with pytest.raises(Crash):
        _resume_fit(L, kind, path, tmp_path / "ckpt", crash_at=CRASH_AT)
    with open_run(path) as run:  # the crashed file holds rows written after the checkpoint
        assert max(int(np.max(run[g]["step"], initial=-1)) for g in groups_of(run, kind)
                   if "step" in run[g].fields) > CHECKPOINT_EVERY
    _resume_fit(L, kind, path, tmp_path / "ckpt", ckpt_path="last")
    with open_run(path) as run:
        assert [h["event"] for h in run.history] == ["created", "resumed"]
        assert run.errors() == []
    assert_same_datasets(datasets(path), datasets(reference), kind)


# --------------------------------------------------------------------------------------
# DDP: the runs are ``ddp_runs`` (conftest.py), one single-process and one 2-process
# training with every monitor in one file (a pair of subprocess trainings per monitor would
# cost ~10 s each); the final weights are compared in tests/test_ddp.py
# --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", MONITORS)
def test_ddp_equals_single_process(ddp_runs, kind):
    with open_run(ddp_runs[1]) as single, open_run(ddp_runs[2]) as ddp:
        assert single.tables == ddp.tables
        assert single.errors() == ddp.errors() == []
        tables = groups_of(single, kind)
        assert tables, single.tables
        for table in tables:
            a, b = single[table], ddp[table]
            assert a.fields == b.fields and len(a) == len(b) > 0, table
            for field in a.fields:
                if field in TIMING:
                    continue
                x, y = a[field], b[field]
                if x.dtype.kind in "biu":
                    np.testing.assert_array_equal(x, y, err_msg=f"{table}/{field}")
                else:
                    scale = np.nanmax(np.abs(x)) if np.isfinite(x).any() else 1.0
                    if field == "residuals":  # error bounds at rounding level: compare on the eigenvalues' scale
                        scale = np.nanmax(np.abs(a["eigvals"]))
                    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * scale, equal_nan=True,
                                               err_msg=f"{table}/{field}")


# --------------------------------------------------------------------------------------
# pickling
# --------------------------------------------------------------------------------------
@pytest.fixture
def shared_governor():
    """A default budget, as users have it (conftest turns it off for the other tests): the
    monitors (budget=None) run under the fit's shared governor, whose state (a lock) is then
    part of what a copy must handle. It is generous (1e9 x the training time): no snapshot
    is thinned, so the files of two fits can be compared."""
    previous = callbacks.set_default_budget(1e9)
    yield
    callbacks.set_default_budget(previous)


# One namespace: a monitor is one class for both Trainers, and pickling does not involve the
# Trainer; the contracts above run each monitor under both.
PICKLE_NAMESPACE = NAMESPACES[0]


def _roundtrip(monitor):
    return pickle.loads(pickle.dumps(monitor))


def _fits_like(L, copied, original, path, expected, what):
    """``copied`` is a working monitor: fitted again onto the same file (overwrite=True), it
    writes the datasets the original wrote."""
    assert type(copied) is type(original) and isinstance(copied, L.Callback), what
    _fit(L, [copied])
    with open_run(path) as run:
        assert run.errors() == [], what
    assert_same_datasets(datasets(path), expected, what)


@pytest.mark.usefixtures("shared_governor")
@pytest.mark.parametrize("kind", MONITORS)
def test_pickle_and_deepcopy_before_fit(tmp_path, kind):
    L = namespace(PICKLE_NAMESPACE)
    path = str(tmp_path / "run.h5")
    monitor = make_monitor(kind, path, overwrite=True, budget=None)
    copies = {"pickled": _roundtrip(monitor), "deep-copied": copy.deepcopy(monitor)}
    _fit(L, [monitor])
    expected = datasets(path)
    for how, copied in copies.items():
        _fits_like(L, copied, monitor, path, expected, f"{kind} {how} before fit")


def _after_fit_cases():
    for how in ("deepcopy", "pickle"):
        for kind in MONITORS:
            yield pytest.param(how, kind, id=f"{how}-{kind}")


@pytest.mark.usefixtures("shared_governor")
@pytest.mark.parametrize("how, kind", list(_after_fit_cases()))
def test_pickle_and_deepcopy_after_fit(tmp_path, how, kind):
    L = namespace(PICKLE_NAMESPACE)
    path = str(tmp_path / "run.h5")
    monitor = make_monitor(kind, path, overwrite=True, budget=None)
    _fit(L, [monitor])
    expected = datasets(path)
    copied = copy.deepcopy(monitor) if how == "deepcopy" else _roundtrip(monitor)
    _fits_like(L, copied, monitor, path, expected, f"{kind} {how} after fit")


# --------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------
BAD_ARGUMENTS = {
    "path empty": (dict(path=""), "path"),
    "path number": (dict(path=3), "path"),
    "name with slash": (dict(name="a/b"), "name"),
    "on_error": (dict(on_error="nope"), "on_error"),
    "batch_size zero": (dict(batch_size=0), "batch_size"),
    "batch_size float": (dict(batch_size=2.5), "batch_size"),
    "collective_timeout": (dict(collective_timeout=0), "collective_timeout"),
    "forward_fn": (dict(forward_fn=3), "forward_fn"),
    "budget": (dict(budget="5%"), "budget"),
    "schedule": (dict(schedule="often"), "schedule"),
}
def _argument_cases():
    for kind in MONITORS:
        for case in BAD_ARGUMENTS:
            yield pytest.param(kind, case, id=f"{kind}-{case}")


@pytest.mark.parametrize("kind, case", list(_argument_cases()))
def test_bad_common_argument_names_the_monitor(kind, case):
    kwargs, argument = BAD_ARGUMENTS[case]
    kwargs = dict(kwargs)
    path = kwargs.pop("path", "run.h5")
    cls = getattr(callbacks, CLASSES[kind])
    with pytest.raises((TypeError, ValueError)) as info:
        cls(path, **kwargs)
    message = str(info.value)
    assert cls.__name__ in message and argument in message, message


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


FAIL_FROM = 3  # the first snapshot (step 0) succeeds, the second fails


def failing_forward(pl_module, x):
    """A forward_fn that fails from step FAIL_FROM on (module level: picklable)."""
    if pl_module.trainer.global_step >= FAIL_FROM:
        raise Boom(f"injected failure at step {pl_module.trainer.global_step}")
    return pl_module(x)


def _no_logits_module(L):
    """training_step calls the inner network, not the module: the forgetting monitor finds
    no per-example logits of the batch."""

    class NoLogits(type(make_module(L))):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

    torch.manual_seed(0)
    return NoLogits()


def per_example_cross_entropy(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


# How each case fails: monitor kind and extra arguments. SharpnessMonitor measures the
# module's training_step loss unless given loss_fn=, and refuses forward_fn= without it
# (tests/test_sharpness_monitor.py): with loss_fn= it measures forward_fn's outputs.
FAILURES = {kind: (kind, {}) for kind in MONITORS if kind != "sharpness"}
FAILURES["sharpness+loss_fn"] = ("sharpness", dict(loss_fn=per_example_cross_entropy))


def _failure_cases():
    for case in FAILURES:
        yield pytest.param(case, id=case)


def _failing_fit(L, case, path, on_error):
    kind, extra = FAILURES[case]
    witness = callbacks.ProbeMetricsMonitor(path, name="witness", schedule=3, probe=Probe(size=16), budget=False,
                                            on_error="raise")
    if kind == "forgetting":
        monitor, module, expected = make_monitor(kind, path, on_error=on_error), _no_logits_module(L), \
            callbacks.ForgettingCaptureError
    else:
        monitor = make_monitor(kind, path, on_error=on_error, forward_fn=failing_forward, **extra)
        torch.manual_seed(0)
        module, expected = make_module(L, tiny_net()), Boom
    t = trainer(L, [monitor, witness], max_epochs=2)
    return kind, t, (lambda: t.fit(module, loader(blob_data()))), expected


@pytest.mark.parametrize("case", list(_failure_cases()))
def test_failure_warns_is_recorded_and_training_goes_on(L, tmp_path, case):
    path = str(tmp_path / "run.h5")
    kind, t, fit, error = _failing_fit(L, case, path, "warn")
    with pytest.warns(RuntimeWarning, match=f"{CLASSES[kind]}.*{error.__name__}.*on_error='raise'"):
        fit()
    assert t.global_step == 12  # trained to the end
    with open_run(path) as run:
        errors = run.errors()
        assert len(errors) == 1, errors  # recorded once, then the monitor is off
        assert errors[0]["monitor"] == kind and errors[0]["message"].startswith(f"{error.__name__}: ")
        if kind != "forgetting":
            assert errors[0] == {"step": FAIL_FROM, "monitor": kind,
                                 "message": f"Boom: injected failure at step {FAIL_FROM}"}
            assert list(run[kind]["step"]) == [0]  # the snapshot before the failure is kept
        assert list(run["probe_metrics_witness"]["step"]) == [0, 3, 6, 9, 12]  # the other monitor: unaffected


@pytest.mark.parametrize("case", list(_failure_cases()))
def test_failure_raises_with_on_error_raise(L, tmp_path, case):
    _, t, fit, error = _failing_fit(L, case, str(tmp_path / "run.h5"), "raise")
    with pytest.raises(error):
        fit()
    assert t.global_step < 12
