"""The sketched trace eNTK against a float64 brute force: exact for a given sign matrix,
unbiased and with error ~ 1/sqrt(m) over seeds, a standard error that covers the error,
and the usual side-effect and argument checks."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import lightning_ntk
from lightning_ntk.ntk import (
    NTKMemoryError,
    SketchedNTK,
    empirical_ntk,
    empirical_ntk_reference,
    rademacher_projections,
    sketched_ntk,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*batching rule.*:UserWarning",  # torch.func fallbacks on CPU: slower, still exact
    "ignore:.*torch.jit.script.*:DeprecationWarning",  # torch internals
)

F64 = torch.float64


def mlp(d_in: int = 5, hidden: int = 12, C: int = 7, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, C)).eval()


class Tied(nn.Module):
    """One weight used twice (the total derivative counts once) and a frozen-free bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(6, 6)
        self.out = nn.Linear(6, 9)

    def forward(self, x):
        return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))


class Grid(nn.Module):
    """Outputs (B, 2, 3): flattened to C = 6 by sketched_ntk."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 6)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x))).reshape(-1, 2, 3)


def brute_force(full: torch.Tensor, S: torch.Tensor):
    """K_r = s_r^T Theta s_r / C from the reference full kernel (N1, N2, C, C): mean, stderr."""
    C, m = full.shape[-1], S.shape[0]
    k_r = torch.einsum("nmab,ra,rb->nmr", full, S, S) / C
    return k_r.mean(-1), k_r.std(-1, correction=1) / math.sqrt(m)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> bool:
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-300)


# ----------------------------------------------------------------------------------------
# exact for the drawn signs
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["structured", "jacobian", "ntvp"])
@pytest.mark.parametrize("cross", [False, True])
def test_equals_brute_force_for_the_same_signs(method, cross):
    model = mlp()
    x = torch.randn(5, 5)
    x2 = torch.randn(3, 5) if cross else None
    m, seed = 6, 11
    r = sketched_ntk(model, x, x2, projections=m, seed=seed, method=method, dtype=F64)
    S = rademacher_projections(m, 7, seed, dtype=F64)
    mean, se = brute_force(empirical_ntk_reference(model, x, x2), S)
    assert isinstance(r, SketchedNTK)
    assert r.kernel.shape == (5, 3 if cross else 5) and r.kernel.dtype == F64
    assert (r.projections, r.seed, r.num_outputs) == (m, seed, 7)
    assert close(r.kernel, mean) and close(r.stderr, se)
    assert r.relative_stderr == pytest.approx(float(se.norm() / mean.norm()), rel=1e-9)


def test_tied_weights_and_params_by_the_users_names():
    model = Tied().eval()
    x = torch.randn(4, 6)
    S = rademacher_projections(5, 9, 2, dtype=F64)
    r = sketched_ntk(model, x, projections=5, seed=2, dtype=F64)
    assert close(r.kernel, brute_force(empirical_ntk_reference(model, x), S)[0])
    # the names of model.named_parameters(), not the projected wrapper's
    r = sketched_ntk(model, x, projections=5, seed=2, dtype=F64, params=["a.weight", "out.bias"])
    ref = empirical_ntk_reference(model, x, params=["a.weight", "out.bias"])
    assert close(r.kernel, brute_force(ref, S)[0])
    r = sketched_ntk(model, x, projections=5, seed=2, dtype=F64, params=[model.out.weight])
    assert close(r.kernel, brute_force(empirical_ntk_reference(model, x, params=[model.out.weight]), S)[0])


def test_frozen_parameters_are_left_out():
    model = mlp()
    model[0].weight.requires_grad_(False)
    x = torch.randn(4, 5)
    r = sketched_ntk(model, x, projections=4, dtype=F64)
    S = rademacher_projections(4, 7, 0, dtype=F64)
    assert close(r.kernel, brute_force(empirical_ntk_reference(model, x), S)[0])


def test_vector_output_is_one_output():
    """(B,) outputs: C = 1, every projection is +-1 and gives the exact kernel."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 1), nn.Flatten(0)).eval()
    x, x2 = torch.randn(4, 4), torch.randn(6, 4)
    r = sketched_ntk(model, x, x2, projections=3, dtype=F64)
    exact = empirical_ntk_reference(model, x, x2, kind="trace")
    assert r.num_outputs == 1 and r.kernel.shape == (4, 6)
    assert close(r.kernel, exact)
    assert float(r.stderr.abs().max()) <= 1e-12 * float(exact.abs().max())


def test_outputs_of_more_dims_are_flattened():
    model = Grid().eval()
    x = torch.randn(4, 4)
    r = sketched_ntk(model, x, projections=5, seed=4, dtype=F64)

    class Flat(nn.Module):  # the same function with (B, 6) outputs, for the reference
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).flatten(1)

    S = rademacher_projections(5, 6, 4, dtype=F64)
    assert r.num_outputs == 6
    assert close(r.kernel, brute_force(empirical_ntk_reference(Flat(model), x), S)[0])


def test_one_projection_has_no_stderr():
    model = mlp()
    x = torch.randn(3, 5)
    r = sketched_ntk(model, x, projections=1, dtype=F64)
    S = rademacher_projections(1, 7, 0, dtype=F64)
    assert close(r.kernel, torch.einsum("nmab,a,b->nm", empirical_ntk_reference(model, x), S[0], S[0]) / 7)
    assert torch.isnan(r.stderr).all() and math.isnan(r.relative_stderr)


def test_more_projections_than_outputs_is_still_valid():
    model = mlp(C=3)
    x = torch.randn(3, 5)
    r = sketched_ntk(model, x, projections=20, seed=5, dtype=F64)
    S = rademacher_projections(20, 3, 5, dtype=F64)
    mean, se = brute_force(empirical_ntk_reference(model, x), S)
    assert close(r.kernel, mean) and close(r.stderr, se)


class RootParams(nn.Module):
    """Parameters registered on the root module: each is its own layer of empirical_ntk."""

    def __init__(self, roots: int):
        super().__init__()
        torch.manual_seed(5)
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 5)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(5))
        if roots > 1:
            self.shift = nn.Parameter(0.1 * torch.randn(6))

    def forward(self, x):
        h = torch.tanh(self.fc(x) + (self.shift if hasattr(self, "shift") else 0))
        return self.head(h) * self.scale


@pytest.mark.parametrize("name", ["mlp", "one root parameter", "two root parameters"])
def test_per_layer_keys_and_values_match_empirical_ntk(name):
    model = {"mlp": mlp, "one root parameter": lambda: RootParams(1),
             "two root parameters": lambda: RootParams(2)}[name]().eval()
    d_in = 5 if name == "mlp" else 4
    x = torch.randn(4, d_in)
    m, seed = 5, 8
    r = sketched_ntk(model, x, projections=m, seed=seed, dtype=F64, per_layer=True)
    exact_layers = empirical_ntk(model, x, kind="trace", per_layer=True)
    assert list(r.layers) == list(exact_layers)  # same names, same order
    S = rademacher_projections(m, r.num_outputs, seed, dtype=F64)
    for layer, k in r.layers.items():
        owned = [n for n, _ in model.named_parameters() if n == layer or n.startswith(layer + ".")]
        assert close(k, brute_force(empirical_ntk_reference(model, x, params=owned), S)[0]), layer
        assert torch.equal(k, k.T)
    assert close(sum(r.layers.values()), r.kernel, 1e-12)
    plain = sketched_ntk(model, x, projections=m, seed=seed, dtype=F64)
    assert close(r.kernel, plain.kernel, 1e-12) and close(r.stderr, plain.stderr, 1e-12)


# ----------------------------------------------------------------------------------------
# statistics over seeds
# ----------------------------------------------------------------------------------------


def test_unbiased_rate_and_stderr_coverage():
    """C = 50: over 30 seeds the mean estimate approaches the exact trace kernel, the error
    shrinks as 1/sqrt(m) (m = 4 -> 64: about 4x), and |K_hat - K| <= 2 se for most entries."""
    model = mlp(d_in=6, hidden=16, C=50, seed=7)
    x = torch.randn(6, 6)
    exact = empirical_ntk_reference(model, x, kind="trace")
    norm = float(exact.norm())
    seeds = range(30)
    estimates = {m: [sketched_ntk(model, x, projections=m, seed=s, dtype=F64) for s in seeds] for m in (4, 16, 64)}
    rms = {}
    for m, runs in estimates.items():
        errors = torch.tensor([float((r.kernel - exact).norm()) / norm for r in runs])
        rms[m] = float(errors.square().mean().sqrt())
        mean = torch.stack([r.kernel for r in runs]).mean(0)
        # unbiased: the mean of 30 estimates is ~sqrt(30) = 5.5x closer than one estimate
        assert float((mean - exact).norm()) / norm < 0.45 * rms[m], m
        if m >= 16:
            inside = torch.cat([((r.kernel - exact).abs() <= 2 * r.stderr).flatten() for r in runs])
            assert float(inside.double().mean()) >= 0.85, m
            # the stored relative standard error is the size of the actual relative error
            stored = sum(r.relative_stderr for r in runs) / len(runs)
            assert 0.5 * rms[m] <= stored <= 2.0 * rms[m], (m, stored, rms[m])
    assert rms[64] > 0
    assert 2.5 <= rms[4] / rms[64] <= 6.5, rms


# ----------------------------------------------------------------------------------------
# side effects, symmetry, arguments
# ----------------------------------------------------------------------------------------


def test_global_rng_untouched_and_seed_decides():
    model = mlp()
    x = torch.randn(4, 5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sketched_ntk(model, x, projections=8, seed=9)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    b = sketched_ntk(model, x, projections=8, seed=9)
    assert torch.equal(a.kernel, b.kernel) and torch.equal(a.stderr, b.stderr)
    c = sketched_ntk(model, x, projections=8, seed=10)
    assert not torch.equal(a.kernel, c.kernel)


def test_no_side_effects_on_the_model():
    model = mlp()
    x = torch.randn(4, 5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sketched_ntk(model, x, projections=4)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and not any(m.training for m in model.modules())


@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_symmetric_when_x2_is_none(method):
    model = mlp(C=20)
    x = torch.randn(9, 5)
    for x2 in (None, x):
        r = sketched_ntk(model, x, x2, projections=16, method=method)
        assert torch.equal(r.kernel, r.kernel.T) and torch.equal(r.stderr, r.stderr.T)
    # the engine's per-projection kernels are exactly symmetric already
    d = empirical_ntk(model, x, kind="diagonal", method=method)
    assert torch.equal(d, d.transpose(0, 1))


def test_rademacher_projections():
    S = rademacher_projections(64, 300, 5)
    assert S.shape == (64, 300) and S.dtype == torch.float32
    assert set(S.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(S.mean())) < 0.02  # 19200 fair signs: sd of the mean 0.0072
    assert torch.equal(S, rademacher_projections(64, 300, 5))
    assert not torch.equal(S, rademacher_projections(64, 300, 6))
    assert torch.equal(S[:8], rademacher_projections(8, 300, 5))  # nested in m for one seed
    assert rademacher_projections(2, 3, dtype=F64).dtype == F64


def test_exported_from_the_package():
    assert lightning_ntk.sketched_ntk is sketched_ntk
    assert "sketched_ntk" in lightning_ntk.__all__ and "SketchedNTK" in lightning_ntk.__all__
    assert "rademacher_projections" in lightning_ntk.ntk.__all__


def test_dropout_in_training_mode_warns_once_under_our_name():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sketched_ntk(model, torch.randn(3, 4), projections=2)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and msgs[0].startswith("sketched_ntk: dropout module"), msgs
    assert caught[0].filename == __file__


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(projections=0), ValueError, ["sketched_ntk", "projections", "0"]),
        (dict(projections=2.5), ValueError, ["sketched_ntk", "projections", "2.5"]),
        (dict(projections=True), ValueError, ["sketched_ntk", "projections", "True"]),
        (dict(seed=-1), ValueError, ["sketched_ntk", "seed", "-1"]),
        (dict(seed="0"), ValueError, ["sketched_ntk", "seed", "'0'"]),
        (dict(method="fast"), ValueError, ["sketched_ntk", "method", "'fast'", "'structured'"]),
        (dict(params=["nope.weight"]), ValueError, ["sketched_ntk", "params", "'nope.weight'", "0.weight"]),
        (dict(dtype=torch.int32), TypeError, ["sketched_ntk", "dtype", "int32"]),
    ],
)
def test_bad_arguments(kwargs, error, words):
    with pytest.raises(error) as info:
        sketched_ntk(mlp(), torch.randn(3, 5), **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bad_model_inputs_and_outputs():
    with pytest.raises(TypeError, match="sketched_ntk: model must be a torch.nn.Module"):
        sketched_ntk(lambda x: x, torch.randn(3, 5))
    with pytest.raises(TypeError, match="sketched_ntk: x1 must be a tensor"):
        sketched_ntk(mlp(), [[0.0] * 5])
    with pytest.raises(ValueError, match="sketched_ntk: x1 and x2 must hold examples of the same shape"):
        sketched_ntk(mlp(), torch.randn(3, 5), torch.randn(2, 4))

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(TypeError, match="sketched_ntk: the model must return one tensor"):
        sketched_ntk(Pair(), torch.randn(3, 5))
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).train()
    stats = bn[1].running_mean.clone()
    with pytest.raises(ValueError, match="sketched_ntk: BatchNorm module '1' is in training mode"):
        sketched_ntk(bn, torch.randn(3, 5))
    assert torch.equal(bn[1].running_mean, stats)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="sketched_ntk needs autograd"):
        sketched_ntk(mlp(), torch.randn(3, 5))


def test_too_large_request_names_the_fix():
    with pytest.raises(NTKMemoryError) as info:
        sketched_ntk(mlp(), torch.randn(50, 5), projections=64, max_memory=100_000)
    msg = str(info.value)
    assert msg.startswith("sketched_ntk: 64 projections of the (50, 50) kernel") and "fewer projections" in msg
