"""SharpnessMonitor: stored curvature against a dense Hessian of the trained model."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from lightning_ntk.callbacks import SharpnessMonitor
from lightning_ntk.schedule import EveryNEpochs
from lightning_ntk.store import open_run

from .models import blob_data, loader, make_manual_module, make_module, tiny_net, trainer


def _dense_hessian(module, x, y):
    """float64 dense Hessian of the mean cross-entropy over (x, y), by torch.func."""
    net = module.net.double()
    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].reshape(-1) for n in names])

    def loss(theta):
        parts = torch.split(theta, sizes)
        p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return nn.functional.cross_entropy(functional_call(net, p, (x.double(),)), y)

    H = hessian(loss)(flat)
    net.float()
    return H, loss(flat).item(), torch.autograd.functional.jacobian(loss, flat).norm().item()


def test_eigenvalues_trace_and_threshold_match_dense_hessian(L, run_path):
    data = blob_data(n=48)
    monitor = SharpnessMonitor(run_path, sharpness_set=40, k=2, tol=1e-6, trace=True, trace_queries=90,
                               sam_rho=0.05, density=True, density_steps=20, schedule=EveryNEpochs(1),
                               on_error="raise", dtype=torch.float64)
    torch.manual_seed(0)
    module = make_module(L, tiny_net(hidden=8), lr=0.1, momentum=0.9)
    t = trainer(L, [monitor], max_epochs=2)
    t.fit(module, loader(data))
    module.eval()
    x, y = data.tensors
    H, loss, grad_norm = _dense_hessian(module, x[:40], y[:40])  # the first 40 training examples
    lam = torch.linalg.eigvalsh(H).numpy()[::-1]
    with open_run(run_path) as run:
        view = run["sharpness"]
        np.testing.assert_allclose(view["eigvals"][-1], lam[:2], rtol=1e-5)
        assert np.all(view["residuals"][-1] <= 1e-5 * np.abs(lam[:2]) + 1e-9) and view["converged"][-1]
        np.testing.assert_allclose(view["loss"][-1], loss, rtol=1e-6)
        np.testing.assert_allclose(view["grad_norm"][-1], grad_norm, rtol=1e-5)
        # Heavy-ball momentum 0.9 at lr 0.1: (2 + 2 * 0.9) / 0.1 (Cohen et al.).
        np.testing.assert_allclose(view["eos_threshold"], 38.0)
        np.testing.assert_allclose(view["lr"], 0.1)
        exact_trace = float(torch.trace(H))
        assert abs(view["trace"][-1] - exact_trace) <= 3 * view["trace_stderr"][-1] + 1e-6 * abs(exact_trace)
        assert view["sam_sharpness"][-1] > 0
        weights = view["density_weights"][-1]
        np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
        nodes = view["density_nodes"][-1]
        assert np.nanmax(nodes) <= lam[0] * (1 + 1e-6) and np.nanmin(nodes) >= lam[-1] - 1e-6 * abs(lam[0])
        np.testing.assert_array_equal(run.probe("sharpness")["index"], np.arange(40))


def _bn_hessian_top(net, chunks, train):
    """Top eigenvalue of the float64 Hessian of the mean cross-entropy over ``chunks`` for
    Linear-BatchNorm-ReLU-Linear, BatchNorm written out: in training mode each chunk's mean
    and biased variance (Cohen et al.'s HVPs in train mode), else the running statistics."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().double().reshape(-1) for _, p in net.named_parameters()])
    n = sum(len(y) for _, y in chunks)
    bn = net[1]

    def loss(theta):
        p = dict(zip(names, [t.reshape(s) for t, s in zip(torch.split(theta, [s.numel() for s in shapes]), shapes)]))
        total = 0.0
        for x, y in chunks:
            h = x.double() @ p["0.weight"].T + p["0.bias"]
            mean, var = (h.mean(0), h.var(0, unbiased=False)) if train else \
                (bn.running_mean.double(), bn.running_var.double())
            h = (h - mean) / torch.sqrt(var + bn.eps) * p["1.weight"] + p["1.bias"]
            out = torch.relu(h) @ p["3.weight"].T + p["3.bias"]
            total = total + nn.functional.cross_entropy(out, y) * len(y) / n
        return total

    return float(torch.linalg.eigvalsh(hessian(loss)(flat))[-1])


def test_batchnorm_sharpness_in_train_mode_leaves_training_unchanged(L, run_path):
    """Cohen et al. take HVPs in train mode: BatchNorm on each chunk's statistics (chunks of
    batch_size); the running statistics and the training trajectory are untouched."""
    data = blob_data(n=48)
    x, y = data.tensors

    def fit(callbacks):
        torch.manual_seed(0)
        module = make_module(L, tiny_net(hidden=8, batchnorm=True), lr=0.1)
        trainer(L, callbacks, max_epochs=2).fit(module, loader(data))
        return module

    train = SharpnessMonitor(run_path, sharpness_set=40, k=1, tol=1e-9, dtype=torch.float64, batch_size=20,
                             schedule=EveryNEpochs(1), on_error="raise", name="train")
    evaluated = SharpnessMonitor(run_path, sharpness_set=40, k=1, tol=1e-9, dtype=torch.float64, mode="eval",
                                 schedule=EveryNEpochs(1), on_error="raise", name="eval")
    module = fit([train, evaluated])
    bare = fit([])
    for (name, a), b in zip(module.state_dict().items(), bare.state_dict().values()):
        assert torch.equal(a, b), name  # weights and running statistics as without the monitors
    chunks = [(x[:20], y[:20]), (x[20:40], y[20:40])]
    train_top, eval_top = _bn_hessian_top(module.net, chunks, True), _bn_hessian_top(module.net, chunks, False)
    with open_run(run_path) as run:
        np.testing.assert_allclose(run["sharpness_train"]["eigvals"][-1, 0], train_top, rtol=1e-7)
        np.testing.assert_allclose(run["sharpness_eval"]["eigvals"][-1, 0], eval_top, rtol=1e-7)
        configs = {c["group"]: c for c in run.config.values() if isinstance(c, dict) and "group" in c}
        assert configs["sharpness_train"]["model_mode"] == "train"
    assert abs(train_top - eval_top) > 1e-2 * eval_top  # the modes differ on this network


def test_adaptive_optimizer_has_no_threshold(L, run_path):
    class AdamModule(make_module(L, tiny_net()).__class__):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    monitor = SharpnessMonitor(run_path, sharpness_set=24, schedule=EveryNEpochs(1), on_error="raise",
                               preconditioned=True)
    t = trainer(L, [monitor], max_epochs=1)
    t.fit(AdamModule(), loader(blob_data(n=32)))
    with open_run(run_path) as run:
        view = run["sharpness"]
        assert np.all(np.isnan(view["eos_threshold"]))
        precond = view["preconditioned_sharpness"]
        assert np.isnan(precond[0]) and np.all(np.isfinite(precond[1:]))  # no Adam state before the first step


@pytest.mark.parametrize("kwargs, message", [
    (dict(sharpness_set=0), "sharpness_set must be a positive number"), (dict(k=0), "k must be an integer"),
    (dict(tol=2.0), "tol must be in"), (dict(max_hvp=1), "max_hvp must be None or an integer"),
    (dict(sam_rho=-1.0), "sam_rho must be None or a positive radius"), (dict(probe=None), "sharpness_set="),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        SharpnessMonitor("x.h5", **kwargs)


def _diabetes(n=96):
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = torch.tensor(data.data[:n], dtype=torch.float32)
    y = torch.tensor((data.target[:n] - data.target.mean()) / data.target.std(), dtype=torch.float32)
    return torch.utils.data.TensorDataset(x, y.unsqueeze(1))


def _regression_module(L, logged):
    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            logged.append(float(loss))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Regression()


def test_regression_sharpness_is_the_hessian_of_the_loss_trained(L, run_path):
    """F.mse_loss in training_step: λ₁ equals the dense float64 Hessian of F.mse_loss (not of
    ½‖f − y‖², which has half of it), and the measurement logs nothing of its own."""
    data = _diabetes()
    logged_with, logged_without = [], []
    monitor = SharpnessMonitor(run_path, sharpness_set=64, k=2, tol=1e-8, schedule=EveryNEpochs(1),
                               on_error="raise", dtype=torch.float64, budget=False)
    torch.manual_seed(0)
    module = _regression_module(L, logged_with)
    t = trainer(L, [monitor], max_epochs=2)
    t.fit(module, loader(data))
    torch.manual_seed(0)
    plain = _regression_module(L, logged_without)
    t_plain = trainer(L, [], max_epochs=2)
    t_plain.fit(plain, loader(data))
    # The snapshots called training_step with logging silenced: the user's metrics are untouched.
    assert float(t.callback_metrics["train_loss_epoch"]) == float(t_plain.callback_metrics["train_loss_epoch"])
    assert len(logged_with) > len(logged_without)  # training_step did run for the snapshots
    module.eval()
    net = module.net.double()
    x, y = (t.double() for t in data.tensors)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def mse(theta):
        parts = torch.split(theta, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return nn.functional.mse_loss(functional_call(net, params, (x[:64],)), y[:64])

    lam = torch.linalg.eigvalsh(hessian(mse)(flat)).numpy()[::-1]
    with open_run(run_path) as run:
        view = run["sharpness"]
        np.testing.assert_allclose(view["eigvals"][-1], lam[:2], rtol=1e-6)
        np.testing.assert_allclose(view["loss"][-1], float(mse(flat)), rtol=1e-10)
        assert "training_step" in run.config["SharpnessMonitor[sharpness]"]["loss_fn"]


def test_manual_optimisation_is_refused_at_train_start_and_training_goes_on(L, run_path):
    module = make_manual_module(L)
    with pytest.warns(RuntimeWarning, match="SharpnessMonitor.*manual optimisation.*pass loss_fn="):
        trainer(L, [SharpnessMonitor(run_path, sharpness_set=16)], max_epochs=1).fit(module, loader(blob_data()))
    assert module.steps == 6
    with open_run(run_path) as run:
        assert "sharpness" not in run.tables
        assert b"manual optimisation" in run["errors"]["message"][0]


def test_forward_fn_without_loss_fn_is_refused_at_train_start(L, run_path):
    """forward_fn= says how to call the model, but the default loss is training_step's: the
    two do not go together without loss_fn= (a forward_fn would otherwise be ignored)."""
    monitor = SharpnessMonitor(run_path, sharpness_set=16, forward_fn=lambda m, x: m(x))
    with pytest.warns(RuntimeWarning, match="SharpnessMonitor.*forward_fn= gives the model's outputs.*pass "
                                            "loss_fn="):
        trainer(L, [monitor], max_epochs=1).fit(make_module(L, tiny_net()), loader(blob_data()))
    with open_run(run_path) as run:
        assert "sharpness" not in run.tables and len(run["errors"]) == 1


def test_a_tiny_transformer_lm_sharpness_equals_a_dense_hessian(L, run_path):
    """Per-token cross-entropy of a causal transformer: Hessian-vector products go through
    attention under the math SDPA kernel (the fused kernels have no double backward) and
    λ₁ equals a dense float64 Hessian of the training loss."""
    V, T, D = 6, 4, 4
    torch.manual_seed(0)
    tokens = torch.randint(0, V, (24, T + 1))
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.block = nn.TransformerEncoderLayer(D, 2, 8, batch_first=True, dropout=0.0)
            self.head = nn.Linear(D, V)

        def forward(self, x):
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=self.head.weight.dtype)
            return self.head(self.block(self.emb(x), src_mask=mask, is_causal=True))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x).reshape(-1, V), y.reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = LM()
    monitor = SharpnessMonitor(run_path, sharpness_set=16, k=1, tol=1e-8, schedule=EveryNEpochs(1), budget=False,
                               dtype=torch.float64, on_error="raise")
    trainer(L, [monitor], max_epochs=1).fit(module, loader(data, batch_size=8))
    module.eval()
    module.double()
    x, y = data.tensors[0][:16], data.tensors[1][:16]
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in module.named_parameters()])

    def loss(theta):
        parts = torch.split(theta, [s.numel() for s in shapes])
        out = functional_call(module, {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}, (x,))
        return nn.functional.cross_entropy(out.reshape(-1, V), y.reshape(-1))

    # reverse-over-reverse, row by row (torch.func.hessian's forward-over-reverse gives an
    # asymmetric Hessian through this attention: 6e-2 off)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        H = torch.autograd.functional.hessian(loss, flat)
    assert torch.allclose(H, H.T, atol=1e-10)
    lam = torch.linalg.eigvalsh(H).max().item()
    with open_run(run_path) as run:
        np.testing.assert_allclose(run["sharpness"]["eigvals"][-1][0], lam, rtol=1e-6)
