"""LossSet: one loss set shared by every curvature estimator.

Checks: the LossSet form gives the same numbers as the (model, loss_fn, batches) form;
its loss, gradient, HVPs and eigenvalues against a dense float64 Hessian
(torch.autograd.functional.hessian); and a SharpnessMonitor snapshot builds it once.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_ntk import LossSet, curvature
from lightning_ntk.callbacks import SharpnessMonitor
from lightning_ntk.curvature import (
    gradient_norm,
    hessian_density,
    hessian_eigs,
    hessian_trace,
    preconditioned_sharpness,
    sam_sharpness,
)
from lightning_ntk.schedule import EveryNEpochs
from lightning_ntk.store import open_run

from .models import blob_data, loader, make_module, tiny_net, trainer


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _data(n=21, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _dense(model, x, y):
    """Flat parameters, the mean cross-entropy as a function of them, its float64 Hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def loss(theta):
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return flat, loss, torch.autograd.functional.hessian(loss, flat)


def test_loss_set_form_gives_the_same_numbers_as_the_model_form():
    model = _mlp()
    x, y = _data()
    batches = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 21, 5)]  # uneven: 5, 5, 5, 5, 1
    for dtype in (None, torch.float64):
        ls = LossSet(model, None, batches, dtype=dtype)
        a = hessian_eigs(ls, 2, tol=1e-6, return_eigenvectors=True)
        b = hessian_eigs(model, None, batches, 2, tol=1e-6, return_eigenvectors=True, dtype=dtype)
        assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.residuals, b.residuals)
        assert torch.equal(a.eigenvectors, b.eigenvectors) and a.n_hvp == b.n_hvp
        ta = hessian_trace(ls, n_queries=12, generator=5)
        tb = hessian_trace(model, None, batches, n_queries=12, generator=5, dtype=dtype)
        assert (ta.trace, ta.stderr) == (tb.trace, tb.stderr)
        assert gradient_norm(ls) == gradient_norm(model, None, batches, dtype=dtype)
        assert sam_sharpness(ls, 0.05) == sam_sharpness(model, None, batches, 0.05, dtype=dtype)
        da, db = hessian_density(ls, n_steps=8), hessian_density(model, None, batches, n_steps=8, dtype=dtype)
        assert torch.equal(da.nodes, db.nodes) and torch.equal(da.weights, db.weights)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    pa = preconditioned_sharpness(LossSet(model, None, batches), opt, 1)
    pb = preconditioned_sharpness(model, opt, None, batches, 1)
    assert torch.equal(pa.eigenvalues, pb.eigenvalues) and pa.threshold == pb.threshold


def test_hessian_eigs_through_a_loss_set_match_a_dense_hessian():
    model = _mlp(torch.float64)  # P = 51
    x, y = _data(dtype=torch.float64)
    flat, loss, H = _dense(model, x, y)
    lam = torch.linalg.eigvalsh(H)
    ls = LossSet(model, None, [(x[:8], y[:8]), (x[8:], y[8:])])
    top = hessian_eigs(ls, 3, tol=1e-10)
    torch.testing.assert_close(top.eigenvalues, lam.flip(0)[:3], rtol=1e-6, atol=1e-6 * float(lam.abs().max()))
    bottom = hessian_eigs(ls, 2, which="SA", tol=1e-10)
    torch.testing.assert_close(bottom.eigenvalues, lam[:2], rtol=1e-6, atol=1e-6 * float(lam.abs().max()))
    # the LossSet's own loss, gradient and HVPs against the same references
    assert ls.loss() == pytest.approx(float(loss(flat)), rel=1e-12)
    torch.testing.assert_close(ls.gradient(), torch.autograd.functional.jacobian(loss, flat), rtol=1e-10, atol=1e-12)
    v = torch.randn(ls.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for method in ("double_backward", "double_backward_retain", "forward_over_reverse"):
        torch.testing.assert_close(ls.hvp(v, method), H @ v, rtol=1e-10, atol=1e-12)
    per_param = ls.hvp(ls.unflatten(v))
    assert [tuple(t.shape) for t in per_param] == ls.shapes
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in per_param]), H @ v, rtol=1e-10, atol=1e-12)
    assert ls.n_examples == 21 and ls.n_params == 51 and ls.dtype == torch.float64


def test_loss_set_leaves_the_model_as_it_was_and_refuses_settings_beside_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))
    x, y = _data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ls = LossSet(model, None, (x, y))
    ls.loss(), ls.gradient(), ls.hvp(torch.ones(ls.n_params))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    # eval mode while measuring (dropout off): the loss is deterministic
    assert ls.loss() == ls.loss()
    with pytest.raises(TypeError, match="dtype belong to the LossSet"):
        hessian_eigs(ls, 1, dtype=torch.float64)
    # select: other parameters, the same batches (not read again)
    head = ls.select(["4.weight", "4.bias"])
    assert head.batches is ls.batches and head.n_params == 6 * 3 + 3 and head.names == ["4.weight", "4.bias"]
    assert head.loss() == ls.loss()


def test_a_sharpness_snapshot_builds_its_loss_set_once(L, run_path, monkeypatch):
    """Eigenvalues, loss, gradient norm, trace, density, SAM and preconditioned sharpness
    of one snapshot all share one LossSet: one parameter selection, one read of the set."""
    counts = {"init": 0, "materialise": 0}
    init, materialise = curvature.LossSet.__init__, curvature.LossSet._materialise

    def counting_init(self, *args, **kwargs):
        counts["init"] += 1
        init(self, *args, **kwargs)

    def counting_materialise(self, batches):
        counts["materialise"] += 1
        return materialise(self, batches)

    monkeypatch.setattr(curvature.LossSet, "__init__", counting_init)
    monkeypatch.setattr(curvature.LossSet, "_materialise", counting_materialise)

    class AdamModule(make_module(L, tiny_net()).__class__):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    monitor = SharpnessMonitor(run_path, sharpness_set=24, k=1, schedule=EveryNEpochs(1), on_error="raise",
                               trace=True, trace_queries=9, density=True, density_steps=6, sam_rho=0.05,
                               preconditioned=True)
    trainer(L, [monitor], max_epochs=2).fit(AdamModule(), loader(blob_data(n=32)))
    with open_run(run_path) as run:
        view = run["sharpness"]
        snapshots = len(view["step"])
        assert np.all(np.isfinite(view["preconditioned_sharpness"][1:]))  # the Adam branch ran
        assert np.all(np.isfinite(view["trace"])) and np.all(np.isfinite(view["sam_sharpness"]))
    assert snapshots >= 2
    assert counts == {"init": snapshots, "materialise": snapshots}


def test_auto_never_picks_a_forward_over_reverse_product_that_disagrees(monkeypatch):
    """Whatever the timing, "auto" keeps double backward when forward-over-reverse gives
    another product (a forward-mode formula missing or wrong for some op)."""
    from lightning_ntk.curvature import _hvp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    ls = LossSet(model, None, [(x[:4], y[:4]), (x[4:], y[4:])], dtype=torch.float64)
    monkeypatch.setattr(_hvp, "_retained_graphs_fit", lambda ls: False)  # force the timed choice
    import time

    right, slow = _hvp._HVP._forward_over_reverse, _hvp._HVP._double_backward

    def slow_double_backward(self, vs):  # so that timing alone would pick forward-over-reverse
        time.sleep(0.01)
        return slow(self, vs)

    monkeypatch.setattr(_hvp._HVP, "_double_backward", slow_double_backward)
    for factor, expected in ((1.0, "forward_over_reverse"), (1.0 + 1e-6, "double_backward")):
        monkeypatch.setattr(_hvp, "_AUTO_CACHE", {})
        monkeypatch.setattr(_hvp._HVP, "_forward_over_reverse", lambda self, vs, f=factor: right(self, vs) * f)
        with ls.measuring():
            assert _hvp._choose_auto(ls) == expected
