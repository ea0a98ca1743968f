"""lightning_ntk.analytic: infinite-width NNGP/NTK against closed forms written here,
numerical integration, PyTorch's own convolution and pooling, and Monte-Carlo averages of
our eNTK over random initialisations."""
from __future__ import annotations

import math
import os

import h5py
import numpy as np
import pytest
import torch
from scipy import integrate, special
from torch import nn

import lightning_ntk
from lightning_ntk import (
    analytic_kernels,
    empirical_ntk,
    finite_infinite_gap,
    kernel_distance,
    open_run,
    record_analytic_kernels,
)
from lightning_ntk.analytic import Erf, Residual
from lightning_ntk.analytic import _layers as L
from lightning_ntk.store import Field, RunStore, StoreError, check_run


def _gaussian_init(model: nn.Module, weight_var: float, bias_var: float, generator: torch.Generator) -> nn.Module:
    """W ~ N(0, weight_var / fan_in), b ~ N(0, bias_var) for every Linear/Conv."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator, dtype=m.weight.dtype)
                               * math.sqrt(weight_var / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator, dtype=m.bias.dtype)
                                 * math.sqrt(bias_var))
    return model


# ----------------------------------------------------------------------------- closed forms
def _arccos_reference(a, b, c):
    """Cho & Saul (2009) degree 1 and 0, written from the paper (numpy)."""
    theta = np.arccos(np.clip(c / np.sqrt(a * b), -1, 1))
    k1 = np.sqrt(a * b) / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * np.cos(theta))
    k0 = (np.pi - theta) / (2 * np.pi)
    return k1, k0


def test_one_hidden_layer_relu_matches_the_arccos_formulas():
    torch.manual_seed(0)
    d, n, c = 7, 33, 4
    model = nn.Sequential(nn.Linear(d, n), nn.ReLU(), nn.Linear(n, c))  # PyTorch's default init (checked)
    x1 = torch.randn(6, d, dtype=torch.float64)
    x2 = torch.randn(5, d, dtype=torch.float64)
    X1, X2 = x1.numpy(), x2.numpy()
    sw, sb1, sb2 = 1 / 3, 1 / (3 * d), 1 / (3 * n)  # kaiming_uniform(a=sqrt 5) and the bias bound, both 1/sqrt(fan_in)
    dot = X1 @ X2.T
    s12 = sw * dot / d + sb1
    s11 = sw * (X1 * X1).sum(1) / d + sb1
    s22 = sw * (X2 * X2).sum(1) / d + sb1
    k1, k0 = _arccos_reference(s11[:, None], s22[None, :], s12)
    nngp = sw * k1 + sb2
    ntk_standard = n * k1 + 1 + sw * k0 * (dot + 1)  # dW2: features; db2: 1; W1 and b1 through W2
    ntk_ntk = nngp + sw * k0 * s12  # Jacot et al.: Θ1 = Σ1, Θ2 = Σ2 + σ_w² k0 Θ1
    out = analytic_kernels(model, x1, x2)
    assert out.nngp.dtype == torch.float64 and out.nngp.shape == (6, 5)
    np.testing.assert_allclose(out.nngp.numpy(), nngp, rtol=1e-12)
    np.testing.assert_allclose(out.ntk.numpy(), ntk_standard, rtol=1e-12)
    np.testing.assert_allclose(analytic_kernels(model, x1, x2, parameterization="ntk").ntk.numpy(), ntk_ntk,
                               rtol=1e-12)
    assert [(v.name, v.fan_in) for v in out.layers] == [("0", d), ("2", n)]
    assert out.layers[0].weight_var == pytest.approx(1 / 3) and out.layers[1].bias_var == pytest.approx(sb2)
    assert "checked" in out.layers[0].source
    sym = analytic_kernels(model, x1)
    assert torch.equal(sym.ntk, sym.ntk.T) and torch.equal(sym.nngp, sym.nngp.T)


def _gauss_expectation(f, g, a, b, c):
    """E[f(u) g(v)], (u, v) ~ N(0, [[a, c], [c, b]]), by scipy's adaptive quadrature over
    z ~ N(0, I) with u = √a z1, v = √b (ρ z1 + √(1 − ρ²) z2), split where u or v changes
    sign (so kinked f, g are integrated piecewise smooth)."""
    r = c / math.sqrt(a * b)
    s = math.sqrt(max(0.0, 1 - r * r))
    density = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    if s < 1e-12:  # v = ±√(b/a) u: one dimension
        h = lambda z: f(math.sqrt(a) * z) * g(math.sqrt(b) * r * z) * density(z)  # noqa: E731
        return sum(integrate.quad(h, lo, hi, epsabs=1e-13, epsrel=1e-12)[0] for lo, hi in ((-10, 0), (0, 10)))

    def integrand(z2, z1):
        return f(math.sqrt(a) * z1) * g(math.sqrt(b) * (r * z1 + s * z2)) * density(z1) * density(z2)

    kink = lambda z1: -r * z1 / s  # noqa: E731  v = 0
    total = 0.0
    for lo1, hi1 in ((-10, 0), (0, 10)):
        for lo2, hi2 in ((lambda z1: -10.0, kink), (kink, lambda z1: 10.0)):
            total += integrate.dblquad(integrand, lo1, hi1, lo2, hi2, epsabs=1e-12, epsrel=1e-11)[0]
    return total


def _phi(u):
    return 0.5 * (1 + special.erf(u / math.sqrt(2)))


ACTIVATIONS = {
    "relu": (L.relu_map, lambda u: max(u, 0.0), lambda u: float(u > 0)),
    "leaky": (L.leaky_relu_map(0.2), lambda u: u if u > 0 else 0.2 * u, lambda u: 1.0 if u > 0 else 0.2),
    "erf": (L.erf_map, special.erf, lambda u: 2 / math.sqrt(math.pi) * math.exp(-u * u)),
    "gelu": (L.gelu_map, lambda u: u * _phi(u), lambda u: _phi(u) + u * math.exp(-u * u / 2) / math.sqrt(2 * math.pi)),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_kernels_against_numerical_integration(name):
    kernel, f, df = ACTIVATIONS[name]
    for a, b, c in [(1.3, 0.4, 0.5), (2.0, 3.0, -1.9), (0.5, 0.5, 0.5)]:
        t, dot = kernel(*(torch.tensor([v], dtype=torch.float64) for v in (c, a, b)), True)
        assert float(t) == pytest.approx(_gauss_expectation(f, f, a, b, c), rel=1e-7, abs=1e-9)
        assert float(dot) == pytest.approx(_gauss_expectation(df, df, a, b, c), rel=1e-6, abs=1e-8)


# ----------------------------------------------------------------------------- spatial maps vs PyTorch
@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, padding=2, stride=2, dilation=2),
    dict(kernel_size=(2, 3), padding="same", padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="circular", stride=(1, 2)),
    dict(kernel_size=2, padding=1, padding_mode="replicate"),
    dict(kernel_size=(3, 1), padding="valid"),
])
def test_conv_average_equals_pytorch_convolution_with_unit_variance_weights(conv):
    """For one realisation u, v of the input channel, E_W[conv(u)(p) conv(v)(q)] with
    Var(W) = 1/k is (1/k) Σ_j ∂conv(u)(p)/∂W_j ∂conv(v)(q)/∂W_j: PyTorch's own Jacobian."""
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(1, 1, 6, 7, generator=g, dtype=torch.float64), torch.randn(1, 1, 6, 7, generator=g,
                                                                                    dtype=torch.float64)
    layer = nn.Conv2d(1, 1, bias=False, **conv).double()
    k = layer.weight.numel()
    ju = torch.autograd.functional.jacobian(lambda w: torch.func.functional_call(layer, {"weight": w}, (u,)),
                                            layer.weight.detach()).reshape(-1, k)
    jv = torch.autograd.functional.jacobian(lambda w: torch.func.functional_call(layer, {"weight": w}, (v,)),
                                            layer.weight.detach()).reshape(-1, k)
    reference = (ju @ jv.T / k)  # (positions out, positions out)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(layer(u).numel(), 1)).double()
    program = lightning_ntk.analytic._convert.compile_module(model, u, weight_var=1.0, bias_var=0.0)
    axes = program.ops[0].conv
    out_shape = layer(u).shape[2:]
    full = L.conv_average(torch.einsum("p,q->pq", u.reshape(-1), v.reshape(-1)).reshape(1, 1, 6, 7, 6, 7),
                          2, 2, True, axes)
    np.testing.assert_allclose(full.reshape(reference.shape).numpy(), reference.numpy(), rtol=1e-12, atol=1e-12)
    diag = L.conv_average((u * v).reshape(1, 1, 6, 7), 2, 2, False, axes)
    np.testing.assert_allclose(diag.reshape(-1).numpy(), torch.diagonal(reference).numpy(), rtol=1e-12, atol=1e-12)
    assert tuple(full.shape[2:4]) == tuple(out_shape)


@pytest.mark.parametrize("pool", [
    nn.AvgPool2d(2), nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
    nn.AvgPool2d((2, 3), stride=1, padding=(1, 0)), nn.AdaptiveAvgPool2d((2, 3)), nn.AdaptiveAvgPool2d(1),
    nn.AvgPool2d(2, divisor_override=3),
])
def test_pooling_map_equals_pytorch_pooling(pool):
    g = torch.Generator().manual_seed(2)
    u, v = (torch.randn(1, 1, 5, 7, generator=g, dtype=torch.float64) for _ in range(2))
    maps, dense, spatial_out = L.position_operator(pool, (5, 7))
    k = torch.einsum("p,q->pq", u.reshape(-1), v.reshape(-1)).reshape(1, 1, 5, 7, 5, 7)
    out = L.apply_position_map(k, 2, 2, maps, dense, spatial_out)
    reference = torch.einsum("p,q->pq", pool(u).reshape(-1), pool(v).reshape(-1))
    np.testing.assert_allclose(out.reshape(reference.shape).numpy(), reference.numpy(), rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------- Monte Carlo
def _draws(make, x, draws, weight_var, bias_var, seed, outputs=False):
    g = torch.Generator().manual_seed(seed)
    kernels, outs = [], []
    for _ in range(draws):
        model = _gaussian_init(make().double(), weight_var, bias_var, g).eval()
        kernels.append(empirical_ntk(model, x, kind="trace", dtype=torch.float64))
        if outputs:
            with torch.no_grad():
                outs.append(model(x))
    return torch.stack(kernels), (torch.stack(outs) if outputs else None)


def _projection_z(samples, target):
    """z of the mean of ⟨K_d, Θ⟩/‖Θ‖² over draws against 1 (an unbiasedness test on one
    scalar, so the correlations between kernel entries do not matter)."""
    proj = (samples * target).sum((1, 2)) / (target * target).sum()
    return float((proj.mean() - 1) / (proj.std() / math.sqrt(len(proj))))


def _check_convergence(make, x, widths, draws, weight_var, bias_var, seed=0):
    """Unbiased at every width (z-test), one draw's error ∝ 1/√width, and the error of the
    mean of the draws within 4 standard errors of 0, i.e. ∝ 1/√(width × draws)."""
    rms_scaled = []
    for i, n in enumerate(widths):
        samples, _ = _draws(lambda n=n: make(n), x, draws, weight_var, bias_var, seed + i)
        theta = analytic_kernels(make(n), x, weight_var=weight_var, bias_var=bias_var).ntk
        norm = torch.linalg.norm(theta)
        assert abs(_projection_z(samples, theta)) < 4, (n, _projection_z(samples, theta))
        rms = float(torch.sqrt(((samples - theta) ** 2).sum((1, 2)).mean()) / norm)  # one draw's relative error
        error = float(torch.linalg.norm(samples.mean(0) - theta) / norm)  # the mean of `draws` draws
        assert error < 4 * rms / math.sqrt(draws), (n, error, rms)
        rms_scaled.append(rms * math.sqrt(n))
    assert max(rms_scaled) / min(rms_scaled) < 1.5, rms_scaled  # rms ∝ 1/√width


def test_mlp_entk_mean_converges_to_the_analytic_ntk():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    _check_convergence(lambda n: nn.Sequential(nn.Linear(5, n), nn.ReLU(), nn.Linear(n, 3)), x, [16, 64, 256],
                       64, 2.0, 0.1)


def test_cnn_entk_mean_converges_to_the_analytic_ntk():
    """Conv (zero padding) -> ReLU -> global average pooling -> Linear: the full pixel x
    pixel kernels, against the eNTK of the same PyTorch network."""
    torch.manual_seed(1)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    make = lambda n: nn.Sequential(nn.Conv2d(2, n, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),  # noqa: E731
                                   nn.Flatten(), nn.Linear(n, 3))
    _check_convergence(make, x, [8, 32, 128], 48, 2.0, 0.1)


@pytest.mark.parametrize("name", ["cnn-flatten", "cnn-pool", "residual-mlp", "deep-mixed"])
def test_more_architectures_are_unbiased(name):
    """One width each, z-test of the Monte-Carlo mean (deeper nets carry an O(1/width) bias,
    small against the standard error at these widths and draws). NNGP: output covariance."""
    torch.manual_seed(2)
    if name == "cnn-flatten":  # equal-position kernels; stride, dilation, reflect padding, GELU
        x = torch.randn(4, 2, 6, 5, dtype=torch.float64)
        make = lambda n: nn.Sequential(nn.Conv2d(2, n, 3, padding=2, stride=(2, 1), dilation=(1, 2),  # noqa: E731
                                                 padding_mode="reflect"), nn.GELU(), nn.Flatten(),
                                       nn.Linear(n * 4 * 5, 3))
        n, draws = 64, 40
    elif name == "cnn-pool":  # average pooling between convolutions, leaky ReLU, erf
        x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
        make = lambda n: nn.Sequential(nn.Conv2d(1, n, 3, padding=1), nn.LeakyReLU(0.1),  # noqa: E731
                                       nn.AvgPool2d(2), nn.Conv2d(n, n, 2), Erf(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten(), nn.Linear(n, 2))
        n, draws = 96, 24
    elif name == "residual-mlp":
        x = torch.randn(5, 4, dtype=torch.float64)
        make = lambda n: nn.Sequential(nn.Linear(4, n), Residual(nn.Sequential(nn.ReLU(), nn.Linear(n, n))),  # noqa: E731
                                       nn.ReLU(), nn.Linear(n, 2))
        n, draws = 256, 24
    else:
        x = torch.randn(5, 4, dtype=torch.float64)
        make = lambda n: nn.Sequential(nn.Linear(4, n), Erf(), nn.Linear(n, n), nn.ReLU(),  # noqa: E731
                                       nn.Linear(n, 2))
        n, draws = 256, 24
    samples, outs = _draws(lambda: make(n), x, draws, 1.5, 0.05, seed=7, outputs=True)
    kernels = analytic_kernels(make(n), x, weight_var=1.5, bias_var=0.05)
    assert abs(_projection_z(samples, kernels.ntk)) < 4
    prior = torch.einsum("dnc,dmc->dnm", outs, outs) / outs.shape[2]
    assert abs(_projection_z(prior, kernels.nngp)) < 4


def test_ntk_parameterization_is_the_limit_of_the_rescaled_entk():
    """The eNTK of W = σ_w/√fan_in · ω, b = σ_b β (per-parameter eNTKs of the PyTorch net,
    rescaled) averages to the 'ntk' kernel, which does not depend on the width."""
    torch.manual_seed(3)
    x = torch.randn(5, 4, dtype=torch.float64)
    make = lambda n: nn.Sequential(nn.Linear(4, n), nn.ReLU(), nn.Linear(n, 3))  # noqa: E731
    ntk16 = analytic_kernels(make(16), x, parameterization="ntk", weight_var=2.0, bias_var=0.1)
    ntk64 = analytic_kernels(make(64), x, parameterization="ntk", weight_var=2.0, bias_var=0.1)
    torch.testing.assert_close(ntk16.ntk, ntk64.ntk, rtol=1e-13, atol=0)
    torch.testing.assert_close(ntk16.nngp, analytic_kernels(make(16), x, weight_var=2.0, bias_var=0.1).nngp,
                               rtol=1e-13, atol=0)
    # Standard parameterisation: one hidden layer's NTK is affine in the width (n·k1 + ...).
    sp = [analytic_kernels(make(n), x, weight_var=2.0, bias_var=0.1).ntk for n in (10, 20, 30)]
    torch.testing.assert_close(sp[2] - sp[1], sp[1] - sp[0], rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(4)
    samples = []
    for _ in range(30):
        model = _gaussian_init(make(64).double(), 2.0, 0.1, g)
        gap = finite_infinite_gap(model, x, parameterization="ntk", analytic=ntk64)
        samples.append(gap.empirical)
    assert abs(_projection_z(torch.stack(samples), ntk64.ntk)) < 4


def test_finite_infinite_gap_fields():
    torch.manual_seed(5)
    x = torch.randn(6, 4, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2)).double().eval()
    gap = finite_infinite_gap(model, x)
    k = empirical_ntk(model, x, kind="trace", dtype=torch.float64)
    theta = analytic_kernels(model, x).ntk
    assert gap.kernel_distance == pytest.approx(kernel_distance(k.numpy(), theta.numpy()), rel=1e-12)
    assert gap.relative_error == pytest.approx(float(torch.linalg.norm(k - theta) / torch.linalg.norm(theta)))
    assert gap.scale == pytest.approx(float((k * theta).sum() / (theta * theta).sum()))
    assert gap.parameterization == "standard"


# ----------------------------------------------------------------------------- conventions and refusals
def test_variances_read_checked_given_and_refused():
    torch.manual_seed(6)
    x = torch.randn(3, 4)
    model = nn.Sequential(nn.Linear(4, 50), nn.ReLU(), nn.Linear(50, 2))
    read = analytic_kernels(model, x)
    assumed = analytic_kernels(model, x, weight_var="pytorch", bias_var="pytorch")
    torch.testing.assert_close(read.ntk, assumed.ntk, rtol=0, atol=0)
    given = analytic_kernels(model, x, weight_var=1 / 3, bias_var={"0": 1 / 12, "2": 1 / 150})
    torch.testing.assert_close(read.ntk, given.ntk, rtol=1e-14, atol=0)
    meta = nn.Sequential(nn.Linear(4, 50), nn.ReLU(), nn.Linear(50, 2)).to("meta")
    torch.testing.assert_close(analytic_kernels(meta, x, weight_var="pytorch", bias_var="pytorch").ntk, read.ntk,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="'0' \\(Linear\\) is on the meta device.*weight_var="):
        analytic_kernels(meta, x)
    with torch.no_grad():
        model[2].weight.mul_(3.0)  # e.g. after training, or another init
    with pytest.raises(ValueError, match="layer '2' \\(Linear\\) weights do not look like PyTorch's default.*"
                                         "weight_var="):
        analytic_kernels(model, x)
    with pytest.raises(ValueError, match="bias_var has no entry for layer '2'"):
        analytic_kernels(model, x, weight_var=1.0, bias_var={"0": 0.1})
    with pytest.raises(ValueError, match="weight_var must be a finite number > 0"):
        analytic_kernels(model, x, weight_var=0.0, bias_var=0.0)
    # A bare layer is its own root, named "" as in named_modules(): Σ = σ_w² x·x'/d + σ_b², Θ = x·x' + 1.
    single = analytic_kernels(nn.Linear(4, 2), x, weight_var={"": 2.0}, bias_var={"": 0.1})
    xd = x.double()
    torch.testing.assert_close(single.nngp, 2.0 * xd @ xd.T / 4 + 0.1, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(single.ntk, xd @ xd.T + 1, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
     "layer '1' \\(BatchNorm1d\\) has no analytic kernel here: normalisation layers"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)),
     "layer '1' \\(MaxPool2d\\) has no analytic kernel here: max pooling"),
    (nn.Sequential(nn.Linear(4, 8), nn.ELU(), nn.Linear(8, 2)), "layer '1' \\(ELU\\) has no analytic kernel"),
    (nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), "layer '1' \\(Tanh\\) has no analytic kernel.*Erf"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 2)),
     "layer '1' \\(Conv2d\\) has groups=2"),
    (nn.Sequential(nn.Linear(4, 8), Residual(nn.Sequential(nn.Linear(8, 8), nn.ReLU())), nn.Linear(8, 2)),
     "Residual '1': its branch ends in ReLU"),
    (nn.Sequential(nn.Conv2d(1, 3, 3, padding=1)), "output has shape \\(N, 3, 6, 6\\)"),
    (nn.Sequential(nn.Conv2d(1, 3, 3), nn.Linear(4, 2)), "layer '1' \\(Linear\\) gets an input of shape .*Flatten"),
])
def test_unsupported_layers_are_refused_by_name(model, match):
    x = torch.randn(2, 1, 6, 6) if isinstance(model[0], nn.Conv2d) else torch.randn(2, 4)
    with pytest.raises(ValueError, match=match):
        analytic_kernels(model, x, weight_var=1.0, bias_var=0.0)


def test_containers_and_shared_layers_are_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x).relu()

    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="layer '<root>' \\(Net\\).*nn.Sequential"):
        analytic_kernels(Net(), x, weight_var=1.0, bias_var=0.0)
    shared = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="'0' \\(Linear\\) is called more than once.*shared weights"):
        analytic_kernels(nn.Sequential(shared, nn.ReLU(), shared), x, weight_var=1.0, bias_var=0.0)


def test_pooled_cnn_kernel_is_tiled_the_same_and_runs_on_digits_quickly():
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:40], dtype=torch.float64).reshape(-1, 1, 8, 8) / 16
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    whole = analytic_kernels(model, x)
    tiled = analytic_kernels(model, x, x, max_memory=8 * 12 * 4096 * 9)  # 3 x 3 pairs per tile
    torch.testing.assert_close(tiled.ntk, whole.ntk, rtol=1e-12, atol=0)
    torch.testing.assert_close(tiled.nngp, whole.nngp, rtol=1e-12, atol=0)
    assert torch.linalg.eigvalsh(whole.nngp).min() > 0


# ----------------------------------------------------------------------------- the run file
def _run_file(path, x, y, store_x=True):
    store = RunStore.acquire(path, owner="synthetic", overwrite=True)
    try:
        index = np.arange(10, 10 + len(x), dtype=np.int64)
        store.write_static("probe/train", "index", index, ("probe_example",), coords={"probe_example": index})
        store.write_static("probe/train", "y", y, ("probe_example",), coords={"probe_example": index})
        if store_x:
            store.write_static("probe/train", "x", x.numpy(), ("probe_example", "x_dim1"),
                               coords={"probe_example": index})
        n = len(x)
        table = store.declare_table("ntk", [Field("step", (), "int64"), Field("epoch"), Field("wall_time"),
                                            Field("trace"), Field("kernel", (n, n), dims=("probe_i", "probe_j"))],
                                    attrs={"probe": "train", "kind": "trace"})
        store.start_swmr()
        return store, table
    except Exception:
        store.release("synthetic")
        raise


def test_record_analytic_kernels_into_a_closed_run_file(tmp_path):
    torch.manual_seed(8)
    x = torch.randn(12, 5)
    y = np.arange(12) % 3
    model = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 3))
    path = str(tmp_path / "run.h5")
    store, table = _run_file(path, x, y)
    kernels = []
    for step in range(3):
        k = empirical_ntk(model, x, kind="trace", dtype=torch.float64).numpy()
        kernels.append(k)
        table.append(step=step * 10, epoch=float(step), wall_time=1.7e9 + step, trace=float(np.trace(k)), kernel=k)
        store.flush()
        with torch.no_grad():
            model[2].weight.add_(0.3 * torch.randn_like(model[2].weight))  # "training"
    with pytest.raises(StoreError, match="still open for writing in this process"):
        record_analytic_kernels(path, model)
    store.release("synthetic")
    init = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 3))
    out = record_analytic_kernels(path, init)
    expected = analytic_kernels(init, x.double())
    with open_run(path) as run:
        view = run["analytic/train"]
        np.testing.assert_array_equal(view["ntk"], expected.ntk.numpy())
        np.testing.assert_array_equal(view["nngp"], expected.nngp.numpy())
        np.testing.assert_array_equal(view["probe_i"], np.arange(10, 22))
        assert view.dims("ntk") == ["probe_i", "probe_j"]
        attrs = view.attrs
        assert attrs["parameterization"] == "standard" and attrs["probe"] == "train"
        assert attrs["layers"][1]["fan_in"] == 64 and attrs["inputs"] == "/probe/train/x"
        assert run.history[-1]["event"] == "analytic" and run.history[-1]["groups"] == ["analytic/train"]
        assert len(run["ntk"]) == 3  # the training's tables are intact
        np.testing.assert_array_equal(run["ntk"]["kernel"][0], kernels[0])
    assert check_run(path).ok
    assert not os.path.exists(path + ".writing") and not os.path.exists(path + ".lock")
    torch.testing.assert_close(out.ntk, expected.ntk, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        record_analytic_kernels(path, init)
    record_analytic_kernels(path, init, parameterization="ntk", overwrite=True)
    with h5py.File(path, "r") as f:
        assert f["analytic/train"].attrs["parameterization"] == "ntk"

    from lightning_ntk.analysis.plots_analytic import plot_distance_to_analytic, plot_scale_to_analytic

    assert plot_distance_to_analytic.available(path, "ntk") and plot_scale_to_analytic.available(path, "ntk")
    ax = plot_distance_to_analytic(path)
    theta = analytic_kernels(init, x.double(), parameterization="ntk").ntk.numpy()
    ys = ax.get_lines()[0].get_ydata()
    np.testing.assert_allclose(ys, [kernel_distance(k, theta) for k in kernels], rtol=1e-10)
    ax = plot_scale_to_analytic(path)
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [np.trace(k) / np.trace(theta) for k in kernels],
                               rtol=1e-6)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_record_needs_the_inputs_when_the_file_lacks_them(tmp_path):
    torch.manual_seed(9)
    x = torch.randn(6, 5)
    path = str(tmp_path / "run.h5")
    store, _ = _run_file(path, x, np.zeros(6, dtype=np.int64), store_x=False)
    store.release("synthetic")
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="does not store the inputs of probe 'train'.*pass x="):
        record_analytic_kernels(path, model)
    with pytest.raises(KeyError, match="no probe 'heldout'"):
        record_analytic_kernels(path, model, probe="heldout", x=x)
    out = record_analytic_kernels(path, model, x=x)
    with open_run(path) as run:
        assert run["analytic/train"].attrs["inputs"] == "x given to record_analytic_kernels"
        np.testing.assert_array_equal(run["analytic/train"]["ntk"], out.ntk.numpy())
