"""lightning_ntk.landscape against independent references: barriers of identical and of
independently trained networks, BatchNorm statistics against a hand computation, loss and
error against a plain loop, slices against their definitions (Li et al. 2018), the
linearisation against a float64 explicit-Jacobian reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ntk import TaskError
from lightning_ntk.landscape import LinearPath, interpolate_state, linear_path, reestimate_batchnorm


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)


def _batches(x, y, size=256):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _mlp(seed, width=32, batchnorm=False):
    torch.manual_seed(seed)
    norm = [nn.BatchNorm1d(width)] if batchnorm else []
    return nn.Sequential(nn.Linear(64, width), *norm, nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def _train(model, data, steps=300, lr=0.01):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    done = 0
    while done < steps:
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            done += 1
    return model.eval()


@pytest.fixture(scope="module")
def two_trained(digits):
    """Two MLPs trained alike from independent initialisations (seeds 0 and 1)."""
    data = _batches(*digits)
    return _train(_mlp(0), data), _train(_mlp(1), data), data


# ----------------------------------------------------------------------------- linear path
def test_identical_networks_have_zero_barrier(two_trained):
    a, _, data = two_trained
    path = linear_path(a, a.state_dict(), a.state_dict(), data, points=5)
    assert np.all(path.error == path.error[0]) and np.all(path.loss == path.loss[0])
    assert path.error_barrier == 0.0 and path.loss_barrier == 0.0


def test_independent_mlps_on_digits_have_a_large_barrier(two_trained):
    a, b, data = two_trained
    path = linear_path(a, a.state_dict(), b.state_dict(), data, points=11)
    assert path.error[0] < 0.05 and path.error[-1] < 0.05  # both ends trained
    assert path.error_barrier > 0.15  # Frankle et al.: unstable, not linearly connected
    assert path.loss_barrier > 0.3
    assert path.task == "multiclass" and not path.batchnorm_reestimated


def test_path_values_equal_a_plain_loop_and_the_model_is_restored(two_trained):
    a, b, data = two_trained
    model = _mlp(5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    path = linear_path(model, a.state_dict(), b.state_dict(), data, points=4)
    assert torch.equal(torch.get_rng_state(), rng)
    np.testing.assert_array_equal(path.alpha, [0, 1 / 3, 2 / 3, 1])
    x = torch.cat([xb for xb, _ in data]).double()
    y = torch.cat([yb for _, yb in data])
    for i, alpha in enumerate(path.alpha):  # reference: float64 weights mixed by hand
        ref = _mlp(9).double()
        sa, sb = a.state_dict(), b.state_dict()
        ref.load_state_dict({k: (1 - alpha) * sa[k].double() + alpha * sb[k].double() for k in sa})
        with torch.no_grad():
            out = ref(x)
        assert path.loss[i] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
        assert path.error[i] == pytest.approx(float((out.argmax(1) != y).double().mean()), abs=1.5 / len(y))
    assert path.error_barrier == pytest.approx(path.error.max() - (path.error[0] + path.error[-1]) / 2)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_vectors_equal_state_dicts(two_trained):
    a, b, data = two_trained
    from torch.nn.utils import parameters_to_vector as p2v
    by_state = linear_path(a, a.state_dict(), b.state_dict(), data, points=3)
    by_vector = linear_path(a, p2v(a.parameters()), p2v(b.parameters()), data, points=3)
    np.testing.assert_allclose(by_vector.loss, by_state.loss, rtol=1e-6)


def test_interpolate_state_is_exact_at_the_ends():
    a = {"w": torch.randn(5), "n": torch.tensor(3)}
    b = {"w": torch.randn(5), "n": torch.tensor(7)}
    assert torch.equal(interpolate_state(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate_state(a, b, 1.0)["w"], b["w"])
    torch.testing.assert_close(interpolate_state(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert int(interpolate_state(a, b, 0.4)["n"]) == 3 and int(interpolate_state(a, b, 0.6)["n"]) == 7


def test_barrier_definition():
    path = LinearPath(alpha=np.linspace(0, 1, 3), loss=np.array([1.0, 3.0, 2.0]), error=np.array([0.1, 0.5, 0.3]),
                      task="multiclass", batchnorm_reestimated=False)
    assert path.loss_barrier == pytest.approx(3.0 - 1.5)
    assert path.error_barrier == pytest.approx(0.5 - 0.2)


def test_dataloader_dict_batches_and_batch_format(two_trained):
    a, _, data = two_trained
    x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    ref = linear_path(a, a.state_dict(), a.state_dict(), (x, y), points=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
    assert linear_path(a, a.state_dict(), a.state_dict(), loader, points=2).loss[0] == pytest.approx(ref.loss[0],
                                                                                                    rel=1e-6)
    dicts = [{"pixels": xb, "digit": yb} for xb, yb in data]
    got = linear_path(a, a.state_dict(), a.state_dict(), dicts, points=2, batch_format=("pixels", "digit"))
    assert got.loss[0] == pytest.approx(ref.loss[0], rel=1e-6)


def test_refusals(two_trained):
    a, _, data = two_trained
    with pytest.raises(TypeError, match="one-shot iterator"):
        linear_path(a, a.state_dict(), a.state_dict(), iter(data))
    with pytest.raises(ValueError, match="has shape"):
        linear_path(a, a.state_dict(), _mlp(0, width=8).state_dict(), data)
    with pytest.raises(ValueError, match="missing"):
        linear_path(a, a.state_dict(), _mlp(0, batchnorm=True).state_dict(), data)
    with pytest.raises(ValueError, match="points must be"):
        linear_path(a, a.state_dict(), a.state_dict(), data, points=1)
    reg = nn.Linear(3, 2)
    xy = (torch.randn(8, 3), torch.randn(8, 2))
    with pytest.raises(TaskError, match="task='regression'"):
        linear_path(reg, reg.state_dict(), reg.state_dict(), xy)
    path = linear_path(reg, reg.state_dict(), reg.state_dict(), xy, task="regression", points=2)
    with torch.no_grad():
        assert path.loss[0] == pytest.approx(float(F.mse_loss(reg(xy[0]), xy[1])), rel=1e-6)
    assert np.isnan(path.error).all() and np.isnan(path.error_barrier)
    bn = _mlp(0, width=8, batchnorm=True)
    from torch.nn.utils import parameters_to_vector as p2v
    with pytest.raises(ValueError, match="reestimate_batchnorm=True"):
        linear_path(bn, p2v(bn.parameters()), p2v(bn.parameters()), data, reestimate_batchnorm=False)


# ----------------------------------------------------------------------------- BatchNorm
def test_reestimate_batchnorm_against_a_hand_computation():
    torch.manual_seed(0)
    lin, bn, drop = nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.3), nn.Dropout(0.5)
    model = nn.Sequential(lin, drop, bn).eval()
    sizes = (5, 9, 2)  # unequal: each batch weighs the same in PyTorch's cumulative average
    data = [(torch.randn(n, 4), torch.zeros(n, dtype=torch.long)) for n in sizes]
    used = reestimate_batchnorm(model, data)
    assert used == 3
    means, variances = [], []
    for xb, _ in data:  # by hand, float64 numpy: dropout off, then each batch's statistics
        h = xb.double().numpy() @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
        means.append(h.mean(axis=0))
        variances.append(h.var(axis=0, ddof=1))
    np.testing.assert_allclose(bn.running_mean.numpy(), np.mean(means, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), np.mean(variances, axis=0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.3 and not model.training and not bn.training


def test_linear_path_reestimates_batchnorm_at_each_point(digits):
    data = _batches(*digits)
    a, b = _train(_mlp(0, 16, batchnorm=True), data, 60), _train(_mlp(1, 16, batchnorm=True), data, 60)
    path = linear_path(a, a.state_dict(), b.state_dict(), data, points=3)
    assert path.batchnorm_reestimated
    mid = _mlp(7, 16, batchnorm=True)  # reference: the midpoint, statistics recomputed by hand
    mid.load_state_dict(interpolate_state(a.state_dict(), b.state_dict(), 0.5))
    bn = mid[1]
    stats = [mid[0](xb).detach() for xb, _ in data]
    with torch.no_grad():
        bn.running_mean.copy_(torch.stack([s.mean(0) for s in stats]).mean(0))
        bn.running_var.copy_(torch.stack([s.var(0) for s in stats]).mean(0))
        x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
        expected = float(F.cross_entropy(mid.eval()(x), y))
    assert path.loss[1] == pytest.approx(expected, rel=1e-4)
    naive = linear_path(a, a.state_dict(), b.state_dict(), data, points=3, reestimate_batchnorm=False)
    assert naive.loss[1] != pytest.approx(path.loss[1], rel=1e-3)  # interpolated statistics differ
