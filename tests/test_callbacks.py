"""The base monitor and ProbeMetricsMonitor, with both Lightning namespaces."""
import csv
import glob
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ntk.callbacks import Monitor, ProbeMetricsMonitor
from lightning_ntk.probe import BatchLayoutError, Probe
from lightning_ntk.schedule import EveryNEpochs, EveryNSteps
from lightning_ntk.store import StoreError, open_run

from .models import blob_data, loader, make_module, tiny_net, trainer


def _fit(L, callbacks, *, seed=0, net_kwargs=None, epochs=2, data=None, **trainer_kwargs):
    torch.manual_seed(seed)
    module = make_module(L, tiny_net(**(net_kwargs or {})))
    data = data if data is not None else blob_data()
    t = trainer(L, callbacks, max_epochs=epochs, **trainer_kwargs)
    t.fit(module, loader(data))
    return module, t


def test_callback_is_accepted_by_both_trainers(L, run_path):
    monitor = ProbeMetricsMonitor(run_path, schedule=EveryNSteps(3), probe=Probe(size=30), on_error="raise")
    assert isinstance(monitor, L.Callback) and isinstance(monitor, Monitor)
    _, t = _fit(L, [monitor])
    assert t.global_step == 12
    with open_run(run_path) as run:
        view = run["probe_metrics"]
        np.testing.assert_array_equal(view["step"], [0, 3, 6, 9, 12])
        assert view["logits"].shape == (5, 30, 3) and view["example_loss"].shape == (5, 30)
        assert np.all(np.diff(view["epoch"]) > 0)
        assert view["loss"][-1] < view["loss"][0]
        probe = run.probe("train_30")
        assert probe["x"].shape == (30, 6) and len(np.unique(probe["index"])) == 30
        # Stratified: 96 examples in 3 equal classes -> 10 of each.
        assert np.bincount(probe["y"]).tolist() == [10, 10, 10]
        assert run.config["ProbeMetricsMonitor[probe_metrics]"]["schedule"]["n"] == 3
        assert run.model["trainable"] == sum(p.numel() for p in tiny_net().parameters())


def test_values_equal_an_independent_computation(L, run_path):
    """The stored loss, accuracy, logits and grad norm at the last step, recomputed by hand."""
    data = blob_data()
    x, y = data.tensors
    monitor = ProbeMetricsMonitor(run_path, schedule=EveryNEpochs(1), probe=(x[:20], y[:20]), on_error="raise")
    module, _ = _fit(L, [monitor])
    module.eval()
    net = module.net
    logits = net(x[:20])
    loss = nn.functional.cross_entropy(logits, y[:20])
    grads = torch.autograd.grad(loss, list(net.parameters()))
    with open_run(run_path) as run:
        view = run["probe_metrics"]
        np.testing.assert_allclose(view["logits"][-1], logits.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(view["loss"][-1], loss.item(), rtol=1e-5)
        np.testing.assert_allclose(view["accuracy"][-1], (logits.argmax(1) == y[:20]).float().mean().item())
        np.testing.assert_allclose(view["grad_norm"][-1], torch.sqrt(sum((g ** 2).sum() for g in grads)).item(),
                                   rtol=1e-5)
        np.testing.assert_array_equal(run.probe("given")["index"], np.arange(20))


def test_scalars_reach_the_users_logger(L, tmp_path):
    logger = L.loggers.CSVLogger(str(tmp_path), name="logs")
    path = str(tmp_path / "run.h5")
    _fit(L, [ProbeMetricsMonitor(path, schedule=4, on_error="raise", probe=Probe(size=30))], logger=logger,
         log_every_n_steps=1)
    (metrics,) = glob.glob(str(tmp_path / "logs" / "*" / "metrics.csv"))
    with open(metrics) as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("probe_metrics/loss")]
    with open_run(path) as run:
        stored = run.scalars("probe_metrics")
    logged = {int(r["step"]): float(r["probe_metrics/loss"]) for r in rows}
    assert sorted(logged) == list(stored.index)
    np.testing.assert_allclose([logged[s] for s in stored.index], stored["loss"].values, rtol=1e-6)


def test_existing_path_is_refused(L, run_path):
    open(run_path, "wb").close()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _fit(L, [ProbeMetricsMonitor(run_path, probe=Probe(size=10))])
    _fit(L, [ProbeMetricsMonitor(run_path, probe=Probe(size=10), overwrite=True, schedule=50)])
    with open_run(run_path) as run:
        assert len(run["probe_metrics"]) == 2  # step 0 and the final step


def test_unwritable_path_is_refused(L, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create the directory"):
        _fit(L, [ProbeMetricsMonitor(str(blocker / "run.h5"))])


def test_probe_larger_than_dataset_is_refused(L, run_path):
    with pytest.raises(ValueError, match="asks for 500 examples but the train dataset has only 96"):
        _fit(L, [ProbeMetricsMonitor(run_path, probe=Probe(size=500), on_error="raise")])
    # with on_error="warn" (the default) the refusal is a warning and a row of /errors; training goes on
    with pytest.warns(RuntimeWarning, match="asks for 500 examples"):
        _, t = _fit(L, [ProbeMetricsMonitor(str(run_path) + ".warn.h5", probe=Probe(size=500))])
    assert t.global_step == 12


def test_a_default_probe_fits_a_small_dataset(L, run_path):
    """The default probe (256 examples) takes the whole dataset when it is smaller (96 here)."""
    _fit(L, [ProbeMetricsMonitor(run_path, on_error="raise")])
    with open_run(run_path) as run:
        np.testing.assert_array_equal(run.probe("train_96")["index"], np.arange(96))


def test_unknown_batch_layout_is_refused(L, run_path):
    class Weird(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"pixels": torch.randn(6), "answer": i % 3}

    with pytest.raises(BatchLayoutError, match=r"keys \['answer', 'pixels'\]"):
        monitor = ProbeMetricsMonitor(run_path, probe=Probe(size=10), on_error="raise")
        t = trainer(L, [monitor], max_epochs=1)
        t.fit(make_module(L), torch.utils.data.DataLoader(Weird(), batch_size=8))


def test_two_monitors_of_one_kind_need_names(L, run_path):
    a = ProbeMetricsMonitor(run_path, probe=Probe(size=10))
    b = ProbeMetricsMonitor(run_path, probe=Probe(size=10))
    with pytest.raises(Exception, match="state_key|distinct"):
        _fit(L, [a, b])


# The arguments every monitor takes (path, name, on_error, batch_size, schedule, ...):
# tests/test_monitor_contract.py::test_bad_common_argument_names_the_monitor.
@pytest.mark.parametrize("kwargs, message", [
    (dict(path="r.h5", probe="train"), "probe must be"),
    (dict(path="r.h5", loss_fn=3), "loss_fn must be None or a callable"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        ProbeMetricsMonitor(**kwargs)


def test_accumulation_snapshots_once_per_optimizer_step(L, run_path):
    _, t = _fit(L, [ProbeMetricsMonitor(run_path, schedule=1, on_error="raise", probe=Probe(size=10))],
                accumulate_grad_batches=2)
    with open_run(run_path) as run:
        np.testing.assert_array_equal(run["probe_metrics"]["step"], np.arange(t.global_step + 1))


def test_lightning_cli_yaml_config(L, tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse")
    monkeypatch.chdir(tmp_path)  # the CLI saves its config.yaml in the working directory
    monkeypatch.setattr("sys.argv", ["lightning-cli-test"])
    path = tmp_path / "cli.h5"
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""
        trainer:
          max_epochs: 1
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          accelerator: cpu
          callbacks:
            - class_path: lightning_ntk.callbacks.ProbeMetricsMonitor
              init_args:
                path: {path}
                schedule:
                  class_path: lightning_ntk.schedule.EveryNSteps
                  init_args:
                    n: 2
                probe:
                  class_path: lightning_ntk.probe.Probe
                  init_args:
                    size: 12
    """))
    from .cli_models import cli_datamodule_class, cli_module_class

    cli_module = L.cli if hasattr(L, "cli") else __import__(f"{L.__name__}.cli", fromlist=["LightningCLI"])
    cli_module.LightningCLI(cli_module_class(L), cli_datamodule_class(L), args=["fit", "--config", str(config)],
                            save_config_kwargs={"overwrite": True}, seed_everything_default=0)
    with open_run(path) as run:
        np.testing.assert_array_equal(run["probe_metrics"]["step"], [0, 2, 4, 6])
        assert len(run.probe("train_12")["index"]) == 12


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_writer_thread_error_reaches_the_training_process(L, run_path, monkeypatch, on_error):
    """A write that fails in the store's writer thread is raised in the training thread
    (on_error='raise' stops training with it; 'warn' warns, disables the monitor, trains on)."""
    import errno
    import threading

    from lightning_ntk.store import RunStore

    original = RunStore._flush_now
    failed_in = []

    def failing_in_writer(self):
        if threading.current_thread().name.startswith("lightning_ntk writer"):
            failed_in.append(threading.current_thread().name)
            raise StoreError(f"writing run file {self.path} failed: "
                             f"{OSError(errno.EIO, 'Input/output error').strerror} (EIO)")
        return original(self)

    monkeypatch.setattr(RunStore, "_flush_now", failing_in_writer)
    monitor = ProbeMetricsMonitor(run_path, schedule=2, probe=Probe(size=20), on_error=on_error, budget=False)
    if on_error == "raise":
        with pytest.raises(StoreError, match="Input/output error"):
            _fit(L, [monitor], epochs=2)
    else:
        with pytest.warns(RuntimeWarning, match="disabled for the rest of this run: StoreError: .*Input/output"):
            _, t = _fit(L, [monitor], epochs=2)
        assert t.global_step == 12  # training went on
    assert failed_in and failed_in[0].startswith("lightning_ntk writer")


def test_a_subclass_hook_is_called_on_every_batch(L, run_path):
    """A subclass that implements a per-batch hook (and calls super()) is called on every batch."""
    calls = []

    class CountingMonitor(ProbeMetricsMonitor):
        def on_after_backward(self, trainer, pl_module):
            super().on_after_backward(trainer, pl_module)
            calls.append(trainer.global_step)

    counting = CountingMonitor(run_path, probe=Probe(size=16), schedule=EveryNEpochs(1), budget=False)
    _, trainer = _fit(L, [counting], epochs=2)
    steps = trainer.global_step
    assert steps > 0 and calls == list(range(steps))
    with open_run(run_path) as run:
        assert list(run["probe_metrics"]["step"]) == [0, steps // 2, steps]  # initial + two epoch ends


def test_monitors_of_a_trainer_share_one_fit_session(L, run_path):
    """One FitSession per fit: every monitor of the Trainer is a member, the first one's
    batch-end call checks all of them, each still snapshots on its own schedule, and the
    session closes when the fit ends; a second fit gets a new session."""
    from lightning_ntk.callbacks import FitSession

    sessions, members = [], []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                sessions.append({m.name: m._session for m in monitors})
                members.extend(monitors[0]._session.monitors)

    monitors = [ProbeMetricsMonitor(run_path, name=name, probe=Probe(size=16), schedule=EveryNSteps(n), budget=False,
                                    overwrite=True) for name, n in (("a", 2), ("b", 3), ("c", 5))]
    module, trainer = _fit(L, monitors + [Spy()], epochs=2)
    steps = trainer.global_step
    first = sessions[0]
    assert isinstance(first["a"], FitSession) and first["a"] is first["b"] is first["c"]
    assert members == monitors and first["a"].collectives is not None
    assert first["a"].closed and all(m._session is None or m._session.closed for m in monitors)
    with open_run(run_path) as run:
        for name, n in (("a", 2), ("b", 3), ("c", 5)):
            expected = sorted(set(range(0, steps + 1, n)) | {steps})
            assert list(run[f"probe_metrics_{name}"]["step"]) == expected, name


def test_grouped_monitors_skip_no_due_step_of_any_schedule(L, run_path):
    """The group leader skips the batches before every member's next due step; each monitor
    still snapshots at exactly the steps its schedule makes due (brute force over
    due_at_step), for built-in rules and for a rule the skipping does not know."""
    from lightning_ntk.schedule import LogSpacedSteps, StepList

    class OddSteps(EveryNSteps):  # a custom rule: checked at every step
        def _due_at_step(self, step):
            return step % 2 == 1

    schedules = {"a": LogSpacedSteps(4), "b": StepList([5, 7, 30]), "c": OddSteps(1), "d": EveryNSteps(4)}
    monitors = [ProbeMetricsMonitor(run_path, name=name, probe=Probe(size=16), schedule=schedule, budget=False)
                for name, schedule in schedules.items()]
    _, trainer = _fit(L, monitors, epochs=2)
    steps = trainer.global_step
    with open_run(run_path) as run:
        for name, schedule in schedules.items():
            expected = sorted({s for s in range(steps + 1) if schedule.due_at_step(s)} | {steps})
            assert list(run[f"probe_metrics_{name}"]["step"]) == expected, name




def test_every_train_start_refusal_comes_before_any_snapshot(L, run_path):
    """A monitor refused at train start (here: its table schema cannot be worked out) is
    recorded and warned about before any monitor's first snapshot, whatever the callback
    order; the others, and training, go on."""
    order = []

    class Measuring(ProbeMetricsMonitor):
        def measure(self, trainer, pl_module, probe):
            order.append(("measure", trainer.global_step))
            return super().measure(trainer, pl_module, probe)

    class Refused(ProbeMetricsMonitor):
        def fields(self, probe, pl_module):
            order.append(("refused", 0))
            raise ValueError("Refused: the probe's outputs are (N, 7), expected (N, 3); pass forward_fn=")

    monitors = [Measuring(run_path, name="a", probe=Probe(size=16), schedule=EveryNEpochs(1), budget=False),
                Refused(run_path, name="b", probe=Probe(size=16), schedule=EveryNEpochs(1), budget=False)]
    with pytest.warns(RuntimeWarning, match=r"Refused \(probe_metrics_b\) failed at step 0.*pass forward_fn="):
        _, t = _fit(L, monitors, epochs=2)
    assert order[0] == ("refused", 0) and order[1] == ("measure", 0)
    with open_run(run_path) as run:
        assert list(run["probe_metrics_a"]["step"]) == [0, t.global_step // 2, t.global_step]
        assert "probe_metrics_b" not in run.tables
        assert run["errors"]["monitor"][0] == b"probe_metrics_b"


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharding_strategies_are_refused_at_setup(L, run_path, strategy):
    """FSDP and DeepSpeed shard the parameters (they cannot run on this CPU machine: an
    uninitialised strategy object stands in); every monitor refuses at setup with the fix."""
    class FakeTrainer:  # a stand-in Trainer (weak-referenceable, like Lightning's)
        def __init__(self, cls):
            self.is_global_zero, self.strategy = True, object.__new__(cls)

    fake = FakeTrainer(getattr(L.strategies, strategy))
    with pytest.raises(RuntimeError, match=f"ProbeMetricsMonitor: the Trainer's strategy is {strategy}, which shards "
                                           "the model's parameters.*strategy='ddp'"):
        ProbeMetricsMonitor(run_path, on_error="raise").setup(fake, None, "fit")
    monitor = ProbeMetricsMonitor(run_path)
    with pytest.warns(RuntimeWarning, match=f"failed at step 0 .*{strategy}"):
        monitor.setup(fake, None, "fit")
    assert monitor.disabled
    monitor.teardown(fake, None, "fit")
    ddp = FakeTrainer(L.strategies.DDPStrategy)
    other = ProbeMetricsMonitor(run_path, on_error="raise")
    other.setup(ddp, None, "fit")
    assert not other.disabled
    other.teardown(ddp, None, "fit")


def test_probe_metrics_use_the_tasks_standard_loss(L, run_path):
    """Regression: the probe loss is F.mse_loss (what the module logs), not ½‖f − y‖²;
    accuracy is NaN (there is none). One binary logit: BCE with logits, accuracy by sign."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    cases = {"regression": (x[:, :1] * 2.0, nn.functional.mse_loss),
             "binary": ((x[:, 0] > 0).long(), lambda z, y: nn.functional.binary_cross_entropy_with_logits(
                 z.squeeze(1), y.float()))}
    for name, (y, loss_fn) in cases.items():
        path = str(run_path) + f".{name}.h5"
        monitor = ProbeMetricsMonitor(path, probe=Probe(size=32), schedule=EveryNEpochs(1), on_error="raise",
                                      budget=False)
        class Module(type(make_module(L))):
            def training_step(self, batch, batch_idx, loss_fn=loss_fn):
                return loss_fn(self(batch[0]), batch[1])

        torch.manual_seed(0)
        module = Module()
        module.net = tiny_net(classes=1)
        trainer(L, [monitor], max_epochs=1).fit(module, loader(torch.utils.data.TensorDataset(x, y)))
        module.eval()
        with open_run(path) as run:
            probe = run.probe("train_32")
            px, py = torch.as_tensor(probe["x"]), torch.as_tensor(probe["y"])
            with torch.no_grad():
                z = module(px)
            np.testing.assert_allclose(run["probe_metrics"]["loss"][-1], float(loss_fn(z, py)), rtol=1e-5)
            accuracy = run["probe_metrics"]["accuracy"][-1]
            if name == "regression":
                assert np.isnan(accuracy)
            else:
                assert accuracy == pytest.approx(float(((z.squeeze(1) > 0).long() == py).double().mean()))
