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


# ----------------------------------------------------------------------------- linearisation
def _small_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4), nn.Softplus(), nn.Linear(4, 2)).to(dtype)


def _explicit_jacobian(net, theta, x):
    """Reference in float64: f(θ, x) and J = ∂ vec f / ∂θ (N·C, P), by torch.func.jacrev."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    net64 = _small_net(torch.float64)

    def f(flat):
        parts, offset = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[offset:offset + s.numel()].reshape(s)
            offset += s.numel()
        return torch.func.functional_call(net64, parts, (x,)).reshape(-1)

    return f(theta), torch.func.jacrev(f)(theta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linearized_outputs_and_gradients_equal_an_explicit_jacobian(dtype):
    from torch.nn.utils import parameters_to_vector as p2v

    from lightning_ntk.landscape import Linearized
    net = _small_net(dtype)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theta0 = p2v(net.parameters()).detach().double()
    lin = Linearized(net)
    torch.testing.assert_close(lin(x.to(dtype)), net(x.to(dtype)), rtol=0, atol=0)  # θ = θ₀: f itself
    delta = 0.3 * torch.randn(theta0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters((theta0 + delta).to(dtype), net.parameters())
    f0, jac = _explicit_jacobian(net, theta0, x)
    expected = (f0 + jac @ delta).reshape(5, 2)
    out = lin(x.to(dtype))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out.double(), expected, **tol)
    assert not torch.allclose(out.double(), net(x.to(dtype)).double(), atol=1e-3)  # not the network itself
    weights = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out * weights.to(dtype)).sum(), list(net.parameters()))
    torch.testing.assert_close(p2v(grads).double(), jac.T @ weights.reshape(-1), **tol)  # Jᵀ w at θ₀


def test_linearized_trains_as_the_explicit_linear_model():
    from torch.nn.utils import parameters_to_vector as p2v

    from lightning_ntk.landscape import Linearized
    net = _small_net()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 3, dtype=torch.float64, generator=g), torch.randint(0, 2, (8,), generator=g)
    theta = p2v(net.parameters()).detach().clone()
    f0, jac = _explicit_jacobian(net, theta, x)
    lin = Linearized(net)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5, momentum=0.9)
    velocity = torch.zeros_like(theta)
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(lin(x), y).backward()
        opt.step()
        # reference: heavy-ball SGD on the explicit linear model f0 + J (θ − θ₀)
        logits = (f0 + jac @ (theta - p2v(lin.theta0_dict().values()))).reshape(8, 2).requires_grad_(True)
        (dlogits,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
        velocity = 0.9 * velocity + jac.T @ dlogits.reshape(-1)
        theta = theta - 0.5 * velocity
    torch.testing.assert_close(p2v(net.parameters()).detach(), theta, rtol=1e-9, atol=1e-11)
    assert float((theta - p2v(lin.theta0_dict().values())).norm()) > 0.1  # it moved


def test_linearized_batchnorm_frozen_and_dropout_one_mask():
    from lightning_ntk.landscape import Linearized
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    net.train()(torch.randn(32, 4))  # running statistics away from their initial values
    stats = net[1].running_mean.clone()
    lin = Linearized(net).train()
    x = torch.randn(6, 4)
    torch.manual_seed(7)
    out = lin(x)
    net[1].eval()
    torch.manual_seed(7)  # the same dropout mask: f(θ₀, x) with BatchNorm on its running statistics
    torch.testing.assert_close(out, net(x))
    net[1].train()
    assert torch.equal(net[1].running_mean, stats) and net[1].training
    direction = [0.1 * torch.randn_like(p) for p in net.parameters()]
    outs = []
    for scale in (1.0, 2.0):  # linear in θ − θ₀ for one mask
        with torch.no_grad():
            for p, p0, d in zip(net.parameters(), lin.theta0_dict().values(), direction):
                p.copy_(p0 + scale * d)
        torch.manual_seed(7)
        outs.append(lin(x) - out)
    torch.testing.assert_close(outs[1], 2 * outs[0], rtol=1e-4, atol=1e-5)
    lin.eval()
    torch.testing.assert_close(lin(x), lin(x))  # eval: dropout off, deterministic


def test_linearize_a_lightning_module_trained_by_a_trainer(L):
    from torch.nn.utils import parameters_to_vector as p2v

    from lightning_ntk.landscape import Linearized, linearize

    from .models import blob_data, loader, make_module, tiny_net, trainer
    torch.manual_seed(0)
    module = make_module(L, tiny_net())
    trainer(L, [], max_epochs=1).fit(module, loader(blob_data()))
    before = p2v(module.parameters()).detach().clone()
    lin = linearize(module)
    assert isinstance(lin.net, Linearized) and not isinstance(module.net, Linearized)
    theta0 = p2v(lin.net.theta0_dict().values()).clone()
    torch.testing.assert_close(theta0, before, rtol=0, atol=0)
    trainer(L, [], max_epochs=2).fit(lin, loader(blob_data()))
    assert torch.equal(p2v(module.parameters()), before)  # the original is untouched
    theta = p2v(lin.net.module.parameters()).detach()
    assert float((theta - theta0).norm()) > 1e-3
    x = blob_data()[:8][0]
    with torch.no_grad():
        f0 = module.net(x)
    jac = torch.func.jacrev(lambda flat: torch.func.functional_call(
        module.net, _split(module.net, flat), (x,)))(theta0)  # (8, 3, P) at θ₀
    expected = f0 + torch.einsum("ncp,p->nc", jac, theta - theta0)
    torch.testing.assert_close(lin(x).detach(), expected, rtol=1e-4, atol=1e-5)


def _split(net, flat):
    out, offset = {}, 0
    for n, p in net.named_parameters():
        out[n] = flat[offset:offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return out


def test_linearize_refuses_an_ambiguous_network():
    from lightning_ntk.landscape import linearize

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    with pytest.raises(ValueError, match="attribute="):
        linearize(Two())
    two = linearize(Two(), "head")
    assert type(two.head).__name__ == "Linearized" and isinstance(two.encoder, nn.Linear)


# ----------------------------------------------------------------------------- slices
def test_filter_normalized_direction_matches_li_et_al():
    from lightning_ntk.landscape import filter_normalized_direction
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4, 3))
    d = filter_normalized_direction(model, generator=1)
    for name, p in model.named_parameters():
        if p.dim() <= 1:  # biases and BatchNorm parameters: zero (Li et al.'s --xignore biasbn)
            assert torch.equal(d[name], torch.zeros_like(p))
            continue
        for i in range(p.shape[0]):  # each filter (output channel / output row) scaled to the weight's filter norm
            assert float(d[name][i].norm()) == pytest.approx(float(p[i].detach().norm()), rel=1e-5)
        assert float(torch.nn.functional.cosine_similarity(d[name].reshape(-1), p.reshape(-1), dim=0)) < 0.9
    copied = filter_normalized_direction(model, one_dimensional="copy")
    assert torch.equal(copied["1.weight"], model[1].weight) and torch.equal(copied["3.bias"], model[3].bias)
    again = filter_normalized_direction(model, generator=1)
    assert all(torch.equal(again[k], d[k]) for k in d)  # seeded


def test_slices_equal_the_loss_at_moved_weights(two_trained):
    from lightning_ntk.landscape import filter_normalized_direction, slice_1d, slice_2d
    a, _, data = two_trained
    dx = filter_normalized_direction(a, generator=0)
    dy = filter_normalized_direction(a, generator=1)
    one = slice_1d(a, data, dx, coords=[-0.5, 0.0, 0.5])
    two = slice_2d(a, data, dx, dy, coords_x=[0.0, 0.5], coords_y=[-0.25, 0.0, 0.75])
    assert one.loss.shape == (3,) and two.loss.shape == (2, 3)
    x, y = torch.cat([d[0] for d in data]).double(), torch.cat([d[1] for d in data])

    def reference(ca, cb):  # float64 weights moved by hand
        ref = _mlp(3).double()
        ref.load_state_dict({k: v.double() + ca * dx.get(k, 0) + cb * dy.get(k, 0) for k, v in a.state_dict().items()})
        with torch.no_grad():
            return float(F.cross_entropy(ref(x), y))

    for i, c in enumerate([-0.5, 0.0, 0.5]):
        assert one.loss[i] == pytest.approx(reference(c, 0.0), rel=1e-5)
    for i, cx in enumerate([0.0, 0.5]):
        for j, cy in enumerate([-0.25, 0.0, 0.75]):
            assert two.loss[i, j] == pytest.approx(reference(cx, cy), rel=1e-5)
    assert one.loss[1] == two.loss[0, 1]  # the centre, both ways
    assert one.loss[0] > one.loss[1] and one.loss[2] > one.loss[1]  # a trained minimum along a random line


def test_slice_along_hessian_eigenvector_is_the_quadratic_of_its_eigenvalue():
    """Linear regression under the mean squared error: the loss is exactly quadratic, its
    Hessian (2/N) X̃ᵀX̃ (bias column appended) known in closed form."""
    from lightning_ntk.landscape import hessian_directions, slice_1d
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64, generator=g) * torch.tensor([3.0, 1.0, 0.3], dtype=torch.float64)
    y = torch.randn(40, 1, dtype=torch.float64, generator=g)
    model = nn.Linear(3, 1).double()
    data = [(x[:25], y[:25]), (x[25:], y[25:])]
    directions, result = hessian_directions(model, data, k=2, task="regression", tol=1e-8)
    xt = np.hstack([x.numpy(), np.ones((40, 1))])  # parameters (w1, w2, w3, b)
    evals, evecs = np.linalg.eigh(2.0 / 40 * xt.T @ xt)
    np.testing.assert_allclose(result.eigenvalues.numpy(), evals[::-1][:2], rtol=1e-6)
    v = np.concatenate([directions[0]["weight"].reshape(-1).numpy(), directions[0]["bias"].numpy()])
    assert abs(float(v @ evecs[:, -1])) == pytest.approx(1.0, abs=1e-6)
    coords = [-0.2, 0.0, 0.1, 0.3]
    got = slice_1d(model, data, directions[0], coords=coords, task="regression")
    theta = np.concatenate([model.weight.detach().reshape(-1).numpy(), model.bias.detach().numpy()])
    for i, t in enumerate(coords):  # closed form: mean squared error at θ + t v
        residual = xt @ (theta + t * v) - y.numpy()[:, 0]
        assert got.loss[i] == pytest.approx(float(np.mean(residual ** 2)), rel=1e-9)
    assert np.isnan(got.error).all()


def test_hessian_directions_use_the_running_statistics_the_slices_measure():
    """With BatchNorm, the Hessian is of the loss the slices evaluate (eval mode, running
    statistics), not of the batch-statistics loss: top eigenvalue vs a dense float64 Hessian."""
    from torch.func import functional_call

    from lightning_ntk.landscape import hessian_directions
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    model[1].running_mean.copy_(torch.tensor([0.5, -1.0, 0.2, 2.0]))
    model[1].running_var.copy_(torch.tensor([0.3, 4.0, 1.5, 0.7]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    data = [(x[:12], y[:12]), (x[12:], y[12:])]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss(flat):  # mean cross-entropy with BatchNorm on its running statistics, by hand
        params, at = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[at:at + s.numel()].reshape(s)
            at += s.numel()
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    dense = torch.autograd.functional.hessian(loss, flat0)
    top = float(torch.linalg.eigvalsh(dense)[-1])
    _, result = hessian_directions(model, data, k=1, tol=1e-8)
    assert float(result.eigenvalues[0]) == pytest.approx(top, rel=1e-6)
    assert model.training is False and model[1].running_mean[1].item() == -1.0


def test_linearized_nested_outputs_are_linearised_leaf_by_leaf():
    """A dict of a tuple and a list: each leaf equals the float64 explicit-Jacobian model."""
    from collections import namedtuple

    from torch.nn.utils import parameters_to_vector as p2v

    from lightning_ntk.landscape import Linearized
    Pair = namedtuple("Pair", "logits doubled")

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _small_net()

        def forward(self, x):
            out = self.net(x)
            return {"pair": Pair(out, 2 * out), "list": [out[:, :1]]}

    model = Nested()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theta0 = p2v(model.parameters()).detach().clone()
    lin = Linearized(model)
    delta = 0.3 * torch.randn(theta0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta0 + delta, model.parameters())
    f0, jac = _explicit_jacobian(model.net, theta0, x)
    expected = (f0 + jac @ delta).reshape(5, 2)
    out = lin(x)
    assert isinstance(out["pair"], Pair) and isinstance(out["list"], list)
    torch.testing.assert_close(out["pair"].logits, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["pair"].doubled, 2 * expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["list"][0], expected[:, :1], rtol=1e-10, atol=1e-12)
