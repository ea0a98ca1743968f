"""Run-level kernel dynamics (lightning_ntk.analysis.kernel_dynamics) against plain NumPy on the stored kernels."""
import numpy as np
import pytest
import torch

from lightning_ntk.analysis import eigenspace_tracking, kernel_dynamics
from lightning_ntk.callbacks import NTKMonitor
from lightning_ntk.probe import Probe
from lightning_ntk.schedule import EveryNEpochs
from lightning_ntk.store import open_run

from .models import blob_data, loader, make_module, tiny_net, trainer


def _train(L, path, epochs=3, poison_at=None, **kw):
    callbacks = []
    if poison_at is not None:
        class Poison(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == poison_at:
                    with torch.no_grad():
                        pl_module.net[0].weight[0, 0] = float("nan")

        callbacks.append(Poison())
    monitor = NTKMonitor(path, probe=Probe(size=30), k=6, on_error="raise", **kw)
    torch.manual_seed(0)
    trainer(L, callbacks + [monitor], max_epochs=epochs).fit(make_module(L, tiny_net()), loader(blob_data()))


def _cos(a, b):
    a, b = a.ravel(), b.ravel()
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def ntk_run(tmp_path_factory):
    from lightning import pytorch as L

    path = str(tmp_path_factory.mktemp("dyn") / "dyn.h5")
    _train(L, path, schedule=EveryNEpochs(1))
    return path


def test_dynamics_match_numpy_on_the_stored_kernels(ntk_run):
    dyn = kernel_dynamics(ntk_run, k=4, eps=1e-3, test_fraction=0.3, seed=1)
    with open_run(ntk_run) as run:
        view = run["ntk"]
        kernels = view["kernel"].astype(np.float64)
        epochs = view["epoch"].astype(np.float64)
        y = run.probe("train_30")["y"]
        np.testing.assert_array_equal(dyn.step, view["step"])
    T = len(kernels)
    assert T >= 3 and dyn.target_energy.shape == (T, 4) and dyn.k == 4
    np.testing.assert_allclose(dyn.distance_to_init, [1 - _cos(kernels[0], K) for K in kernels], atol=1e-12)
    assert np.isnan(dyn.distance_to_prev[0]) and np.isnan(dyn.velocity[0])
    for t in range(1, T):
        d = 1 - _cos(kernels[t - 1], kernels[t])
        np.testing.assert_allclose(dyn.distance_to_prev[t], d, atol=1e-12)
        np.testing.assert_allclose(dyn.velocity[t], d / (epochs[t] - epochs[t - 1]), rtol=1e-10, atol=1e-14)
    Y = np.eye(3)[y]
    H = np.eye(len(y)) - 1.0 / len(y)
    # the split: stratified, disjoint, covering the probe
    tr, te = dyn.train_index, dyn.test_index
    assert np.intersect1d(tr, te).size == 0 and np.union1d(tr, te).size == len(y)
    for c in range(3):
        assert np.sum(y[te] == c) == round(0.3 * np.sum(y == c))
    for t, K in enumerate(kernels):
        np.testing.assert_allclose(dyn.kernel_target_alignment[t], _cos(K, Y @ Y.T), rtol=1e-10)
        np.testing.assert_allclose(dyn.kernel_target_alignment_centered[t], _cos(H @ K @ H, H @ Y @ Y.T @ H),
                                   rtol=1e-10)
        lam, U = np.linalg.eigh(K)
        U = U[:, ::-1][:, :4]
        np.testing.assert_allclose(dyn.target_energy[t], np.cumsum(((U.T @ Y) ** 2).sum(1)) / len(y), rtol=1e-8)
        Ktr = K[np.ix_(tr, tr)]
        pred = K[np.ix_(te, tr)] @ np.linalg.solve(Ktr + 1e-3 * np.trace(Ktr) / len(tr) * np.eye(len(tr)), Y[tr])
        np.testing.assert_allclose(dyn.krr_accuracy[t], np.mean(pred.argmax(1) == y[te]))
        np.testing.assert_allclose(dyn.krr_mse[t], np.mean((pred - Y[te]) ** 2), rtol=1e-8)
    # recomputed distances equal what the monitor wrote online
    with open_run(ntk_run) as run:
        np.testing.assert_allclose(dyn.distance_to_init, run["ntk"]["distance_to_init"], atol=1e-6)


def test_energy_at_selected_k(ntk_run):
    full = kernel_dynamics(ntk_run, k=5)
    some = kernel_dynamics(ntk_run, k=5, ks=[1, 5])
    np.testing.assert_allclose(some.target_energy, full.target_energy[:, [0, 4]])
    assert np.all(np.diff(full.target_energy, axis=1) >= -1e-12)  # non-decreasing in k


def test_eigenspace_tracking_matches_stored_eigvecs(ntk_run):
    with open_run(ntk_run) as run:
        track = eigenspace_tracking(run, k=3)
        U = run["ntk"]["eigvecs"].astype(np.float64)
    assert track.k == 3 and np.isnan(track.overlap_to_prev[0])
    for t in range(len(U)):
        np.testing.assert_allclose(track.overlap_to_init[t], np.sum((U[0][:, :3].T @ U[t][:, :3]) ** 2) / 3,
                                   rtol=1e-10)
        if t:
            np.testing.assert_allclose(track.overlap_to_prev[t],
                                       np.sum((U[t - 1][:, :3].T @ U[t][:, :3]) ** 2) / 3, rtol=1e-10)
    # The stored eigenvectors are float32: a basis' overlap with itself is 1 to within float32
    # rounding, on either side of 1 depending on the CPU's kernels (1 - 1.5e-8 with AVX-512,
    # 1 + 3.4e-9 without SIMD).
    np.testing.assert_allclose(track.overlap_to_init[0], 1.0, rtol=0, atol=1e-6)
    assert np.all((track.overlap_to_init > -1e-12) & (track.overlap_to_init <= 1 + 1e-6))


def test_nonfinite_snapshots_are_skipped(L, tmp_path):
    path = str(tmp_path / "nan.h5")
    _train(L, path, epochs=2, poison_at=6, schedule=3)
    dyn = kernel_dynamics(path, k=3)
    track = eigenspace_tracking(path)
    assert list(dyn.step) == [0, 3] and list(track.step) == [0, 3]
    assert np.all(np.isfinite(dyn.distance_to_init))


def test_clear_errors(L, ntk_run, tmp_path):
    path = str(tmp_path / "nokernel.h5")
    _train(L, path, epochs=1, schedule=EveryNEpochs(1), store_kernel=False)
    with pytest.raises(ValueError, match="store_kernel=True"):
        kernel_dynamics(path)
    eigenspace_tracking(path)  # eigenvectors are always stored
    with pytest.raises(KeyError, match="no NTK table 'ntk_other'"):
        kernel_dynamics(ntk_run, group="ntk_other")
    with pytest.raises(ValueError, match="test_fraction"):
        kernel_dynamics(ntk_run, test_fraction=1.0)
    with pytest.raises(ValueError, match="k must"):
        eigenspace_tracking(ntk_run, k=0)
