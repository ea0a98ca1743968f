"""NTKMonitor: every stored quantity against an independent computation on the trained model."""
import numpy as np
import pytest
import torch

from lightning_ntk.callbacks import NTKMonitor
from lightning_ntk.ntk import empirical_ntk_reference
from lightning_ntk.probe import Probe
from lightning_ntk.schedule import EveryNEpochs
from lightning_ntk.store import open_run

from .models import blob_data, loader, make_module, tiny_net, trainer


def _fit(L, monitor, epochs=2, net=None, seed=0):
    torch.manual_seed(seed)
    module = make_module(L, net or tiny_net(batchnorm=True, dropout=0.2))
    t = trainer(L, [monitor], max_epochs=epochs)
    t.fit(module, loader(blob_data()))
    return module


def _cos(a, b):
    a, b = a.ravel(), b.ravel()
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_kernel_and_spectrum_match_brute_force(L, run_path):
    x_held, y_held = blob_data(n=30, seed=1).tensors
    monitor = NTKMonitor(run_path, probe=Probe(size=24), schedule=EveryNEpochs(1), k=5, on_error="raise",
                         heldout=(x_held, y_held))
    module = _fit(L, monitor)
    module.eval()
    with open_run(run_path) as run:
        view = run["ntk"]
        probe = run.probe("train_24")
        x = torch.as_tensor(probe["x"])
        y = probe["y"]
        ref = empirical_ntk_reference(module, x, kind="trace").numpy()
        kernel = view["kernel"][-1]
        np.testing.assert_allclose(kernel, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        # Eigenpairs of the stored kernel, largest first; eigvecs orthonormal eigenvectors.
        lam, vec = np.linalg.eigh(ref)
        np.testing.assert_allclose(view["eigvals"][-1], lam[::-1][:5], rtol=1e-4)
        U = view["eigvecs"][-1].astype(np.float64)
        np.testing.assert_allclose(np.abs(np.sum(U * vec[:, ::-1][:, :5], axis=0)), 1.0, atol=1e-4)
        # Scalars from their definitions.
        np.testing.assert_allclose(view["trace"][-1], np.trace(ref), rtol=1e-5)
        np.testing.assert_allclose(view["frobenius"][-1], np.linalg.norm(ref), rtol=1e-5)
        p = np.clip(lam, 0, None) / np.clip(lam, 0, None).sum()
        p = p[p > 0]
        np.testing.assert_allclose(view["effective_rank"][-1], np.exp(-(p * np.log(p)).sum()), rtol=1e-4)
        kernels = view["kernel"].astype(np.float64)
        np.testing.assert_allclose(view["distance_to_init"], [1 - _cos(kernels[0], k) for k in kernels], atol=1e-6)
        epochs = view["epoch"]
        assert np.isnan(view["velocity"][0])
        np.testing.assert_allclose(view["velocity"][1:], [(1 - _cos(kernels[i - 1], kernels[i])) / (epochs[i] - epochs[i - 1])
                                                          for i in range(1, len(kernels))], rtol=1e-4, atol=1e-9)
        Y = np.eye(3)[y]
        T = Y @ Y.T
        np.testing.assert_allclose(view["kernel_target_alignment"][-1], _cos(ref, T), rtol=1e-5)
        H = np.eye(len(y)) - 1.0 / len(y)
        np.testing.assert_allclose(view["kernel_target_alignment_centered"][-1], _cos(H @ ref @ H, H @ T @ H),
                                   rtol=1e-5)
        # Energy of the one-hot targets in the top-k eigenvectors (Kopitkov & Indelman).
        proj = (U.T @ Y) ** 2
        np.testing.assert_allclose(view["target_energy"][-1], np.cumsum(proj.sum(axis=1)) / (Y ** 2).sum(),
                                   rtol=1e-4)
        # its baseline: the one-hot targets' share in the constant direction, sum of squared class fractions
        fractions = np.bincount(y, minlength=3) / len(y)
        np.testing.assert_allclose(view.attrs["target_energy_constant"], (fractions ** 2).sum(), rtol=1e-12)
        with torch.no_grad():
            out = module(x).double().numpy()
        np.testing.assert_allclose(view["output_energy"][-1],
                                   np.cumsum(((U.T @ out) ** 2).sum(axis=1)) / (out ** 2).sum(), rtol=1e-4)
        # Per-layer traces sum to the trace.
        np.testing.assert_allclose(view["layer_trace"][-1].sum(), view["trace"][-1], rtol=1e-5)
        assert len(view.attrs["layers"]) == view["layer_trace"].shape[1]
        # Kernel regression on the held-out probe (Lee et al.): K + eps tr(K)/n I, one-hot targets.
        cross = empirical_ntk_reference(module, x_held, x, kind="trace").numpy()
        reg = ref + 1e-4 * np.trace(ref) / len(y) * np.eye(len(y))
        pred = cross @ np.linalg.solve(reg, Y)
        np.testing.assert_allclose(view["krr_accuracy"][-1], np.mean(pred.argmax(1) == y_held.numpy()))
        np.testing.assert_allclose(view["krr_mse"][-1], np.mean((pred - np.eye(3)[y_held.numpy()]) ** 2), rtol=1e-3)


def test_kernel_regression_kernel_is_float64_by_default(L, run_path):
    """Lee et al. (2020) compute kernels for regression in float64: with a held-out probe and
    dtype=None the kernel (and the stored one) is float64, equal to the float64 brute force
    to rounding; without kernel regression it stays in the parameters' float32."""
    x_held, y_held = blob_data(n=12, seed=1).tensors
    krr = NTKMonitor(run_path, probe=Probe(size=12), schedule=EveryNEpochs(1), k=3, on_error="raise",
                     per_layer=False, heldout=(x_held, y_held), name="krr")
    plain = NTKMonitor(run_path, probe=Probe(size=12), schedule=EveryNEpochs(1), k=3, on_error="raise",
                       per_layer=False, name="plain")
    torch.manual_seed(0)
    module = make_module(L, tiny_net())
    trainer(L, [krr, plain], max_epochs=1).fit(module, loader(blob_data()))
    module.eval()
    with open_run(run_path) as run:
        x = torch.as_tensor(run.probe("train_12")["x"])
        y = run.probe("train_12")["y"]
        ref = empirical_ntk_reference(module, x, kind="trace").numpy()
        kernel = run["ntk_krr"]["kernel"][-1]
        assert kernel.dtype == np.float64 and run["ntk_plain"]["kernel"][-1].dtype == np.float32
        np.testing.assert_allclose(kernel, ref, rtol=1e-11, atol=1e-13 * np.abs(ref).max())
        cross = empirical_ntk_reference(module, x_held, x, kind="trace").numpy()
        pred = cross @ np.linalg.solve(ref + 1e-4 * np.trace(ref) / len(y) * np.eye(len(y)), np.eye(3)[y])
        np.testing.assert_allclose(run["ntk_krr"]["krr_mse"][-1], np.mean((pred - np.eye(3)[y_held.numpy()]) ** 2),
                                   rtol=1e-9)
        configs = {c["group"]: c for c in run.config.values() if isinstance(c, dict) and "group" in c}
        assert configs["ntk_krr"]["kernel_dtype"] == "float64"


def test_full_kind_eigvecs_are_example_major(L, run_path):
    monitor = NTKMonitor(run_path, probe=Probe(size=9), kind="full", k=4, schedule=EveryNEpochs(1),
                         on_error="raise", per_layer=False)
    module = _fit(L, monitor, epochs=1, net=tiny_net())
    module.eval()
    with open_run(run_path) as run:
        view = run["ntk"]
        assert "kernel" not in view  # off by default for the full kind
        x = torch.as_tensor(run.probe("train_9")["x"])
        ref = empirical_ntk_reference(module, x, kind="full").numpy()  # (N, N, C, C)
        matrix = ref.transpose(0, 2, 1, 3).reshape(27, 27)  # row n*C + c
        lam = np.linalg.eigvalsh(matrix)[::-1][:4]
        np.testing.assert_allclose(view["eigvals"][-1], lam, rtol=1e-4)
        U = view["eigvecs"][-1].astype(np.float64)
        np.testing.assert_allclose(matrix @ U, U * lam, atol=1e-3 * lam[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="sum"), "kind must be one of"), (dict(k=0), "k must be a positive integer, got 0; the number of eigenpairs kept"),
    (dict(method="magic"), "method must be one of"), (dict(krr_eps=-1), "krr_eps"),
    (dict(dtype=torch.int32), "dtype must be"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NTKMonitor("x.h5", **kwargs)


def test_nonfinite_kernel_is_recorded_and_flagged(L, run_path):
    """Weights turned to NaN mid-training: the row is NaN with finite=False; training goes on."""
    net = tiny_net()

    class Poison(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 6:
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = float("nan")

    monitor = NTKMonitor(run_path, probe=Probe(size=6), schedule=3, k=2, on_error="raise")
    torch.manual_seed(0)
    t = trainer(L, [Poison(), monitor], max_epochs=2)
    t.fit(make_module(L, net), loader(blob_data()))
    with open_run(run_path) as run:
        view = run["ntk"]
        assert list(view["step"]) == [0, 3, 6, 9, 12]
        assert list(view["finite"]) == [True, True, False, False, False]
        assert np.all(np.isnan(view["eigvals"][2:])) and np.all(np.isfinite(view["eigvals"][:2]))
        assert np.isnan(view["kernel"][2]).any()
        assert run.errors() == []


def test_the_heldout_probe_is_written_and_checked_on_resume(L, tmp_path):
    """NTKMonitor's held-out probe is stored as /probe/<name> like the training probe, and a
    resume that would draw other held-out examples is refused."""
    x_held, y_held = blob_data(n=30, seed=1).tensors
    path, ckpt = str(tmp_path / "run.h5"), str(tmp_path / "ckpt")

    def monitor(held):
        return NTKMonitor(path, probe=Probe(size=24), schedule=EveryNEpochs(1), k=3, on_error="raise",
                          heldout=held)

    torch.manual_seed(0)
    module = make_module(L, tiny_net())
    saver = L.callbacks.ModelCheckpoint(dirpath=ckpt, save_last=True)
    trainer(L, [monitor((x_held, y_held)), saver], max_epochs=1, enable_checkpointing=True).fit(
        module, loader(blob_data()))
    with open_run(path) as run:
        held = run.probe("heldout")
        np.testing.assert_array_equal(held["index"], np.arange(30))
        np.testing.assert_array_equal(held["y"], y_held.numpy())
        np.testing.assert_array_equal(held["x"], x_held.numpy())
    with pytest.raises(RuntimeError, match="held-out probe drawn on resume differs"):
        trainer(L, [monitor((x_held[:20], y_held[:20])), L.callbacks.ModelCheckpoint(dirpath=ckpt)], max_epochs=2,
                enable_checkpointing=True).fit(make_module(L, tiny_net()), loader(blob_data()),
                                               ckpt_path=f"{ckpt}/last.ckpt")


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_targets_follow_the_task(L, run_path, task):
    """One binary logit and a real-valued output: the alignment and energies use the labels
    or values themselves (not a one-hot of C = 1 columns, which would fail), KRR's accuracy
    thresholds at 0.5 for binary and is NaN for regression."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long() if task == "binary" else x[:, :1] * 2.0 + 0.1 * torch.randn(64, 1, generator=g)
    data = torch.utils.data.TensorDataset(x, y)

    class Module(type(make_module(L))):
        def training_step(self, batch, batch_idx):
            xb, yb = batch
            z = self(xb)
            if task == "binary":
                return torch.nn.functional.binary_cross_entropy_with_logits(z.squeeze(1), yb.float())
            return torch.nn.functional.mse_loss(z, yb)

    torch.manual_seed(0)
    module = Module()
    module.net = tiny_net(classes=1)
    monitor = NTKMonitor(run_path, probe=Probe(size=32), schedule=EveryNEpochs(1), k=3, store_kernel=True,
                         heldout=(x[:16], y[:16]), on_error="raise")
    trainer(L, [monitor], max_epochs=1).fit(module, loader(data))
    with open_run(run_path) as run:
        view = run["ntk"]
        probe_y = np.asarray(run.probe("train_32")["y"], dtype=np.float64).reshape(32, 1)
        kernel = view["kernel"][-1].astype(np.float64)
        yy = probe_y @ probe_y.T
        expected = np.sum(kernel * yy) / np.linalg.norm(kernel) / np.linalg.norm(yy)
        np.testing.assert_allclose(view["kernel_target_alignment"][-1], expected, rtol=1e-5)
        u = view["eigvecs"][-1].astype(np.float64)
        np.testing.assert_allclose(view["target_energy"][-1], np.cumsum((u.T @ probe_y[:, 0]) ** 2)
                                   / np.sum(probe_y ** 2), rtol=1e-4, atol=1e-6)
        accuracy = view["krr_accuracy"][-1]
        assert (0 <= accuracy <= 1) if task == "binary" else np.isnan(accuracy)
        assert np.isfinite(view["krr_mse"][-1])


def _many_outputs_net(outputs: int):
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, outputs))


@pytest.mark.parametrize("outputs,kind", [(3, "trace"), (100, "sketch")])
def test_auto_kind_sketches_large_output_spaces(L, run_path, outputs, kind):
    """kind='auto': the exact trace for a few outputs; for many (> 2 x projections) the sketch,
    an unbiased estimate whose stored standard error covers its error against the exact
    float64 trace kernel, and whose layers sum to it."""
    monitor = NTKMonitor(run_path, probe=Probe(size=16), schedule=[0], on_error="raise", projections=32)
    x, y = blob_data().tensors
    torch.manual_seed(0)
    module = make_module(L, _many_outputs_net(outputs), lr=0.0)
    trainer(L, [monitor], max_epochs=1).fit(module, loader(blob_data()))
    with open_run(run_path) as run:
        view = run["ntk"]
        assert view.attrs["kind"] == kind
        probe_x = torch.as_tensor(run.probe("train_16")["x"])
        exact = empirical_ntk_reference(module.eval(), probe_x, kind="trace").numpy()
        kernel = view["kernel"][-1].astype(np.float64)
        np.testing.assert_allclose(view["layer_trace"][-1].sum(), np.trace(kernel), rtol=1e-4)
        if kind == "trace":
            np.testing.assert_allclose(kernel, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())
            assert "kernel_stderr" not in view.fields
            return
        stderr = view["kernel_stderr"][-1].astype(np.float64)
        assert view.attrs["projections"] == 32
        covered = np.abs(kernel - exact) <= 3 * stderr + 1e-6 * np.abs(exact).max()
        assert covered.mean() >= 0.9
        relative = np.linalg.norm(kernel - exact) / np.linalg.norm(exact)
        assert 0 < relative < 3 * view["relative_stderr"][-1]


class _TurningKernel(NTKMonitor):
    """The kernel is K(s) = cos φ(s) A + sin φ(s) B (A = uuᵀ, B = vvᵀ, u ⊥ v unit vectors):
    a great circle in Frobenius space turned through φ(s) by optimizer step s, at an angular
    speed dφ/ds = ω0 / (1 + 9 s / S) that falls 10x from step 0 to step S."""

    S, OMEGA0 = 184, 0.012

    def phi(self, step):
        return self.OMEGA0 * self.S / 9 * np.log1p(9 * np.asarray(step, dtype=np.float64) / self.S)

    def _kernel(self, model, x1, x2=None, per_layer=False):
        n = x1.shape[0]
        basis, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((n, 2)))
        u, v = basis[:, 0], basis[:, 1]
        phi = float(self.phi(self.snapshot_step))
        return torch.as_tensor(np.cos(phi) * np.outer(u, u) + np.sin(phi) * np.outer(v, v))


def test_constant_dt_velocity_follows_a_synthetic_kernel_of_known_speed(L, run_path):
    """The issue's example: the true speed falls ~10x over a log-spaced run. The angular
    velocity at a constant Δt falls as the speed does, without jumps where the schedule's
    spacing changes; S/Δt at the schedule's spacing does not follow it."""
    from lightning_ntk.schedule import LogSpacedSteps
    delta, batches = 6, 6  # 96 examples in batches of 16: Δt = 1 epoch
    monitor = _TurningKernel(run_path, probe=Probe(size=12), schedule=LogSpacedSteps(per_decade=4), k=2,
                             per_layer=False, velocity_dt=delta, on_error="raise")
    _fit(L, monitor, epochs=31, net=tiny_net())
    with open_run(run_path) as run:
        view = run["ntk"]
        assert view.attrs["velocity_dt_steps"] == delta
        step, epoch, base = view["step"], view["epoch"], view["velocity_base_step"]
        np.testing.assert_allclose(epoch, step / batches, rtol=0, atol=1e-12)
        pairs = base >= 0
        expected_bases = [0, 1, 2, 3, 6, 10, 18, 32, 56, 100, 178]  # LogSpacedSteps(4) up to 186 steps, and step 0
        assert list(base[pairs]) == expected_bases and list(step[pairs]) == [s + delta for s in expected_bases]
        assert set(expected_bases) <= set(step)  # the scheduled snapshots are all there too
        np.testing.assert_allclose(view["constant_dt_epochs"][pairs], delta / batches, rtol=1e-12)
        np.testing.assert_array_equal(np.isnan(view["angular_velocity_constant_dt"]), ~pairs)
        turned = monitor.phi(step[pairs]) - monitor.phi(base[pairs])  # the truth, from the closed form
        angular = view["angular_velocity_constant_dt"][pairs]
        np.testing.assert_allclose(angular, turned / (delta / batches), rtol=1e-5)
        assert np.all(np.diff(angular) < 0)  # falls smoothly: no jump where the spacing changes
        assert angular[0] / angular[-1] > 8  # ~10x, as the speed
        # Fort et al.'s S / Δt at the same constant Δt: right too, but quadratic in the speed.
        np.testing.assert_allclose(view["distance_constant_dt"][pairs], 1 - np.cos(turned), rtol=1e-4)
        np.testing.assert_allclose(view["velocity_constant_dt"][pairs], (1 - np.cos(turned)) / (delta / batches),
                                   rtol=1e-4)
        # Between consecutive snapshots: the angle is exact on a great circle, S/Δt is not comparable.
        dt, dphi = np.diff(epoch), np.diff(monitor.phi(step))
        np.testing.assert_allclose(view["angular_velocity"][1:], dphi / dt, rtol=1e-5)
        velocity = view["velocity"][1:]
        np.testing.assert_allclose(velocity, (1 - np.cos(dphi)) / dt, rtol=1e-4)
        scheduled = [np.flatnonzero(step == s)[0] - 1 for s in (3, 178)]  # rows ending at steps 3 and 178
        assert velocity[scheduled[0]] / velocity[scheduled[1]] < 3  # the speed fell 7x, this says < 3x


def test_velocity_dt_refuses_a_bad_value(run_path):
    with pytest.raises(ValueError, match="velocity_dt must be"):
        NTKMonitor(run_path, velocity_dt=0)
