"""ForgettingMonitor beyond multi-class classification: regression on scikit-learn's diabetes
data (refused without tolerance=, recorded with it), one binary logit, multi-label outputs,
a GAN's manual-optimisation step: what is recorded is checked against what the module
itself saw; every refusal names the monitor, what it found and the argument that fixes it,
is a row of /errors, and training goes on."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ntk import callbacks
from lightning_ntk.store import check_run, open_run

from .models import trainer


def diabetes() -> TensorDataset:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor((data.target - data.target.mean()) / data.target.std(), dtype=torch.float32)
    return TensorDataset(x[:160], y[:160].unsqueeze(1))


def module_for(L, net, loss_fn, *, manual_gan=False):
    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net
            self.seen = []
            if manual_gan:
                self.automatic_optimization = False
                self.critic = nn.Linear(64, 1)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self(x)
            self.seen.append((self.trainer.global_step, out.detach().double().clone(), y.clone()))
            if manual_gan:  # a generator's images: one manual step
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(self.critic(out.reshape(len(x), -1)).mean())
                opt.step()
                return None
            return loss_fn(out, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Module()


def fit(L, monitor, module, data, epochs=2):
    torch.manual_seed(0)
    trainer(L, [monitor], max_epochs=epochs).fit(module, DataLoader(data, batch_size=16, shuffle=True))


def errors(path):
    with open_run(path) as run:
        table = run["errors"]
        return [(m.decode(), e.decode()) for m, e in zip(table["monitor"], table["message"])]


def test_regression_is_refused_without_tolerance(L, run_path):
    torch.manual_seed(0)
    module = module_for(L, nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1)), nn.functional.mse_loss)
    with pytest.warns(RuntimeWarning, match="ForgettingMonitor.*regression.*pass tolerance="):
        fit(L, callbacks.ForgettingMonitor(run_path), module, diabetes())
    assert len(module.seen) == 2 * 10  # training went on
    [(monitor, message)] = errors(run_path)
    assert monitor == "forgetting" and "real predictions of real targets (regression, 1 output(s))" in message
    with open_run(run_path) as run:
        assert "forgetting/events" not in run.tables
    report = check_run(run_path)  # lightning-ntk check names the monitor that failed
    assert any(w.startswith("monitor forgetting failed at step 0: TaskError: ForgettingMonitor: the outputs are real")
               for w in report.warnings), report.warnings


def test_regression_with_tolerance_is_recorded_against_the_module(L, run_path):
    torch.manual_seed(0)
    module = module_for(L, nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1)), nn.functional.mse_loss)
    tolerance = 0.5
    fit(L, callbacks.ForgettingMonitor(run_path, tolerance=tolerance, on_error="raise"), module, diabetes(), epochs=3)
    error = np.concatenate([(f - y).abs().numpy().ravel() for _, f, y in module.seen])
    squared = np.concatenate([((f - y) ** 2).numpy().ravel() for _, f, y in module.seen])
    with open_run(run_path) as run:
        events = run["forgetting/events"]
        np.testing.assert_array_equal(events["correct"], error <= tolerance)
        np.testing.assert_allclose(events["loss"], squared, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(events["margin"], tolerance - error, rtol=1e-6, atol=1e-6)
        assert np.isnan(events["p_true"]).all()
        assert events.attrs["task"] == "regression" and events.attrs["tolerance"] == tolerance
        examples = run["forgetting/examples"]
        assert np.isnan(examples["confidence"]).all()  # no p(gold) for regression
        # forgetting counts from the definition, per example in presentation order
        index = np.asarray(events["index"])
        correct = np.asarray(events["correct"])
        expected = np.zeros(160, dtype=np.int64)
        for i in range(160):
            c = correct[index == i]
            expected[i] = np.sum(c[:-1] & ~c[1:])
        np.testing.assert_array_equal(examples["forgetting_count"], expected)
        assert run.config["ForgettingMonitor[forgetting]"]["detected_task"]["kind"] == "regression"


def binary_data(float_targets):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(96, generator=g) > 0).long()
    return TensorDataset(x, y.float().unsqueeze(1) if float_targets else y)


def test_one_binary_logit_with_integer_labels_is_binary(L, run_path):
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    module = module_for(L, net, lambda z, y: nn.functional.binary_cross_entropy_with_logits(z.squeeze(1), y.float()))
    fit(L, callbacks.ForgettingMonitor(run_path, on_error="raise"), module, binary_data(False))
    z = np.concatenate([f.numpy().ravel() for _, f, _ in module.seen])
    y = np.concatenate([t.numpy() for _, _, t in module.seen])
    with open_run(run_path) as run:
        events = run["forgetting/events"]
        np.testing.assert_array_equal(events["correct"], (z > 0) == (y == 1))
        np.testing.assert_allclose(events["p_true"], np.where(y == 1, 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(z))),
                                   rtol=1e-5)
        assert events.attrs["task"] == "binary"


def test_real_zero_one_targets_are_ambiguous_until_task_is_given(L, tmp_path):
    def make():
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
        return module_for(L, net, nn.functional.binary_cross_entropy_with_logits)

    path = str(tmp_path / "a.h5")
    with pytest.warns(RuntimeWarning, match="binary classification as often as regression; pass task='binary' or "
                                            "task='regression'"):
        fit(L, callbacks.ForgettingMonitor(path), make(), binary_data(True))
    assert len(errors(path)) == 1
    path = str(tmp_path / "b.h5")
    module = make()
    fit(L, callbacks.ForgettingMonitor(path, task="binary", on_error="raise"), module, binary_data(True))
    z = np.concatenate([f.numpy().ravel() for _, f, _ in module.seen])
    y = np.concatenate([t.numpy().ravel() for _, _, t in module.seen])
    with open_run(path) as run:
        np.testing.assert_array_equal(run["forgetting/events"]["correct"], (z > 0) == (y == 1))


def test_multilabel_outputs_are_refused(L, run_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    data = TensorDataset(x, (x[:, :3] > 0).long())
    module = module_for(L, nn.Linear(6, 3), lambda z, y: nn.functional.binary_cross_entropy_with_logits(z, y.float()))
    with pytest.warns(RuntimeWarning, match="ForgettingMonitor.*multi-label outputs"):
        fit(L, callbacks.ForgettingMonitor(run_path), module, data)
    assert len(module.seen) == 2 * 4


def test_a_generators_images_are_refused_and_no_event_is_recorded(L, run_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 8, generator=g), torch.randint(0, 10, (48,), generator=g))
    generator = nn.Sequential(nn.Linear(8, 64), nn.Unflatten(1, (1, 8, 8)))
    module = module_for(L, generator, None, manual_gan=True)
    with pytest.warns(RuntimeWarning, match="ForgettingMonitor.*not per-example predictions of the targets"):
        fit(L, callbacks.ForgettingMonitor(run_path), module, data)
    assert len(module.seen) == 2 * 3
    [(monitor, message)] = errors(run_path)
    assert "outputs of shape (1, 1, 8, 8)" in message and "outputs_key=" in message  # its own argument (it takes no forward_fn=)
    with open_run(run_path) as run:
        assert "forgetting/events" not in run.tables


@pytest.mark.parametrize("kwargs, message", [
    (dict(tolerance=0), "tolerance must be None or a finite number > 0, got 0"),
    (dict(tolerance=float("nan")), "tolerance must be"),
    (dict(task="classification"), "task must be one of 'multiclass'"),
])
def test_bad_task_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match="ForgettingMonitor: " + message):
        callbacks.ForgettingMonitor("run.h5", **kwargs)
