"""Sharpness benchmark: lightning_ntk.curvature vs PyHessian and hessian-eigenthings.

    .venv/bin/python benchmarks/sharpness.py            # ~3-5 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/sharpness.py --models mlp --repeats 5

Setting: scikit-learn digits (all 1797 images, standardised), two small networks trained
briefly (an MLP 64-32-32-10 tanh and a small CNN, ~3.5k parameters each), cross-entropy,
the Hessian of the mean loss over the whole set. Reference: the dense float64 Hessian
(autograd loop, one row per backward pass) -> eigvalsh / trace.

Every method runs in float32 on the same model and data, as one batch (1797 examples):

* ours: ``hessian_eigs`` (Lanczos, residual stop), ``hessian_trace`` (Hutch++ /
  Hutchinson). HVP count: ``result.n_hvp``.
* PyHessian 0.1: ``hessian(model, criterion, data=(x, y), cuda=False)`` then
  ``.eigenvalues(top_n, tol, maxIter)`` (power iteration with deflation, stop on relative
  change < tol) and ``.trace(maxIter, tol)`` (Hutchinson). In this single-batch mode it
  keeps the gradient graph, like our ``double_backward_retain``. HVPs counted by wrapping
  ``pyhessian.hessian.hessian_vector_product``, the function every product goes through.
* hessian-eigenthings 1.0.0a5: ``HessianOperator`` on ``[(x, y)]``; ``lanczos`` (runs
  exactly ``max_iter`` steps, default ``2k``), ``power_iteration_one``,
  ``hutch_plus_plus``. HVPs counted by wrapping the operator's ``matvec``. It rebuilds the
  gradient graph at every product (no retain option).

Each row: R = 7 repeats with seeds 0..6 (PyHessian: ``torch.manual_seed(seed)``, it draws
from the global RNG), run round-robin (every method once per seed, in turn) so that load
from other processes hits all methods alike; "max rel err" is the worst over repeats and
eigenvalues, "HVPs" the mean, "med ms" / "min ms" the median / minimum wall time of a
whole call (including graph building), after one untimed warm-up call. Ratios are
ours / anchor from this one run (on medians, and on minima: the less load-sensitive one on
a shared machine).
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ntk.curvature import _HVP, _LossSet, hessian_eigs, hessian_trace  # noqa: E402

torch.set_num_threads(2)
R = 7


# ---------------------------------------------------------------------------------------
def load_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(d.target)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.f1 = nn.Linear(32, 32)
        self.f2 = nn.Linear(32, 10)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        x = F.max_pool2d(torch.tanh(self.c1(x)), 2)
        x = F.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.f2(torch.tanh(self.f1(x.flatten(1))))


def make_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    torch.manual_seed(0)
    cnn = CNN()
    return {"MLP 64-32-32-10": mlp, "CNN 2conv+2fc": cnn}


def train(model, x, y, steps=150):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def dense_reference(model, x, y):
    """float64 Hessian, one row per backward pass through the kept gradient graph."""
    m = copy.deepcopy(model).double()
    ps = list(m.parameters())
    loss = F.cross_entropy(m(x.double()), y)
    grads = torch.autograd.grad(loss, ps, create_graph=True)
    sizes = [p.numel() for p in ps]
    P = sum(sizes)
    H = torch.empty(P, P, dtype=torch.float64)
    for i in range(P):
        e = torch.zeros(P, dtype=torch.float64)
        e[i] = 1.0
        parts = [t.view_as(p) for t, p in zip(torch.split(e, sizes), ps)]
        row = torch.autograd.grad(grads, ps, grad_outputs=parts, retain_graph=True)
        H[i] = torch.cat([r.reshape(-1) for r in row])
    H = 0.5 * (H + H.T)
    return torch.linalg.eigvalsh(H).flip(0), float(H.trace())


# ---------------------------------------------------------------------------------------
def run_rows(specs, refs, repeats=None):
    """Round-robin timing: every method once per seed, in turn, so that load from other
    processes on the machine hits all methods alike.

    specs: list of fn(seed) -> (values, n_hvp, extra); refs: matching reference arrays.
    Returns one dict per spec: max rel err, mean HVPs, median time, extras.
    """
    repeats = R if repeats is None else repeats
    for fn in specs:
        fn(0)  # warm-up
    acc = [{"times": [], "hvps": [], "errs": [], "extras": []} for _ in specs]
    for seed in range(repeats):
        for fn, ref, a in zip(specs, refs, acc):
            t0 = time.perf_counter()
            vals, n, extra = fn(seed)
            a["times"].append(time.perf_counter() - t0)
            vals = torch.as_tensor(vals, dtype=torch.float64).reshape(-1)
            r = torch.as_tensor(ref, dtype=torch.float64).reshape(-1)[: vals.numel()]
            a["errs"].append(float(((vals - r).abs() / r.abs()).max()))
            a["hvps"].append(n)
            a["extras"].append(extra)
    return [
        {"err": max(a["errs"]), "hvp": sum(a["hvps"]) / len(a["hvps"]), "time": statistics.median(a["times"]),
         "tmin": min(a["times"]), "extras": a["extras"]}
        for a in acc
    ]


def pyhessian_module():
    try:
        import pyhessian  # noqa: F401

        return sys.modules["pyhessian.hessian"]
    except Exception:
        return None


def eigenthings_module():
    try:
        import hessian_eigenthings as he

        return he
    except Exception:
        return None


class Counter:
    n = 0


def restore(model):
    """Undo PyHessian's side effects (model.eval(), .grad filled with a graph)."""
    model.train()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------
def bench_model(name, model, x, y, ph, he):
    loss = train(model, x, y)
    P = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    ev, tr = dense_reference(model, x, y)
    t_dense = time.perf_counter() - t0
    print(f"\n=== {name}: P={P} parameters, N={x.shape[0]} examples, train loss {loss:.4f} ===")
    print(f"dense float64 reference ({t_dense:.1f} s): top eigenvalues {[round(float(v), 6) for v in ev[:4]]}, "
          f"trace {tr:.6f}")

    rows = []  # (group, method, settings, stats, ours_key)

    def ours_eigs(k, tol, guard=0):
        def fn(seed):
            r = hessian_eigs(model, None, (x, y), k=k, tol=tol, generator=seed, guard=guard, warn=False)
            return r.eigenvalues.tolist(), r.n_hvp, r.hvp_method
        return fn

    def ours_trace(method, m):
        def fn(seed):
            r = hessian_trace(model, None, (x, y), n_queries=m, method=method, generator=seed)
            return [r.trace], r.n_hvp, r.stderr
        return fn

    # --- PyHessian
    def ph_eigs(k, tol):
        def fn(seed):
            torch.manual_seed(seed)
            Counter.n = 0
            h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            vals, _ = h.eigenvalues(top_n=k, tol=tol, maxIter=100)
            n = Counter.n
            restore(model)
            return sorted(vals, reverse=True), n, None
        return fn

    def ph_trace(tol):
        def fn(seed):
            torch.manual_seed(seed)
            Counter.n = 0
            h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            samples = h.trace(maxIter=100, tol=tol)
            n = Counter.n
            restore(model)
            return [sum(samples) / len(samples)], n, None
        return fn

    # --- hessian-eigenthings
    def he_operator():
        op = he.HessianOperator(model, [(x, y)], he.supervised_loss(F.cross_entropy))

        class Counted(he.CurvatureOperator):
            size, device, dtype = op.size, op.device, op.dtype
            n = 0

            def matvec(self, v):
                Counted.n += 1
                return op.matvec(v)

        return Counted()

    def he_lanczos(k, max_iter):
        def fn(seed):
            op = he_operator()
            r = he.lanczos(op, k=k, max_iter=max_iter, which="LA", tol=1e-3, seed=seed)
            return r.eigenvalues.tolist(), type(op).n, None
        return fn

    def he_power(tol):
        def fn(seed):
            op = he_operator()
            lam, _, _, _, _ = he.power_iteration_one(op, max_iter=100, tol=tol, seed=seed)
            return [lam], type(op).n, None
        return fn

    def he_hutchpp(m):
        def fn(seed):
            op = he_operator()
            r = he.hutch_plus_plus(op, num_matvecs=m, seed=seed)
            return [r.estimate], type(op).n, r.stderr
        return fn

    top2, top1 = ev[:2], ev[:1]
    rows.append(("top-2", "ours hessian_eigs", "k=2 tol=1e-3", (ours_eigs(2, 1e-3), top2), "o2"))
    rows.append(("top-2", "ours hessian_eigs", "k=2 tol=1e-2", (ours_eigs(2, 1e-2), top2), "o2b"))
    rows.append(("top-2", "ours hessian_eigs", "k=2 tol=1e-3 guard=1", (ours_eigs(2, 1e-3, 1), top2), None))
    if ph is not None:
        rows.append(("top-2", "PyHessian eigenvalues", "top_n=2 tol=1e-3 maxIter=100", (ph_eigs(2, 1e-3), top2), None))
    if he is not None:
        rows.append(("top-2", "eigenthings lanczos", "k=2 which=LA default max_iter(=4)", (he_lanczos(2, None), top2), None))
        rows.append(("top-2", "eigenthings lanczos", "k=2 which=LA max_iter=20", (he_lanczos(2, 20), top2), None))
        rows.append(("top-2", "eigenthings lanczos", "k=2 which=LA max_iter=40", (he_lanczos(2, 40), top2), None))
    rows.append(("top-1", "ours hessian_eigs", "k=1 tol=1e-3", (ours_eigs(1, 1e-3), top1), "o1"))
    rows.append(("top-1", "ours hessian_eigs", "k=1 tol=1e-2", (ours_eigs(1, 1e-2), top1), "o1b"))
    if ph is not None:
        rows.append(("top-1", "PyHessian eigenvalues", "top_n=1 tol=1e-3 maxIter=100", (ph_eigs(1, 1e-3), top1), None))
    if he is not None:
        rows.append(("top-1", "eigenthings power_iteration_one", "max_iter=100 tol=1e-3", (he_power(1e-3), top1), None))
        rows.append(("top-1", "eigenthings lanczos", "k=1 which=LA default max_iter(=2)", (he_lanczos(1, None), top1), None))
        rows.append(("top-1", "eigenthings lanczos", "k=1 which=LA max_iter=20", (he_lanczos(1, 20), top1), None))
    rows.append(("trace", "ours hessian_trace", "hutch++ n_queries=60", (ours_trace("hutch++", 60), [tr]), "ot"))
    rows.append(("trace", "ours hessian_trace", "hutchinson n_queries=60", (ours_trace("hutchinson", 60), [tr]), None))
    if ph is not None:
        rows.append(("trace", "PyHessian trace", "maxIter=100 tol=1e-3 (Hutchinson)", (ph_trace(1e-3), [tr]), None))
    if he is not None:
        rows.append(("trace", "eigenthings hutch_plus_plus", "num_matvecs=60", (he_hutchpp(60), [tr]), None))
        rows.append(("trace", "eigenthings hutch_plus_plus", "num_matvecs=99 (default)", (he_hutchpp(99), [tr]), None))

    stats = run_rows([r[3][0] for r in rows], [r[3][1] for r in rows])
    rows = [(g, m, st_, st, key) for (g, m, st_, _, key), st in zip(rows, stats)]

    ours_for = {"top-2": "o2", "top-1": "o1", "trace": "ot"}
    by_key = {key: st for _, _, _, st, key in rows if key}
    hdr = (f"{'quantity':<7} {'method':<32} {'settings':<36} {'max rel err':>11} {'HVPs':>6} {'med ms':>8} "
           f"{'min ms':>7} {'ms/HVP':>7} {'ours/anchor med':>15} {'min':>5}")
    print(hdr)
    print("-" * len(hdr))
    for group, method, settings, st, _key in rows:
        ratio, rmin = "", ""
        if not method.startswith("ours"):
            ratio = f"{by_key[ours_for[group]]['time'] / st['time']:.2f}"
            rmin = f"{by_key[ours_for[group]]['tmin'] / st['tmin']:.2f}"
        extra = ""
        if group == "trace" and st["extras"][0] is not None:
            extra = f"  stderr~{statistics.mean(st['extras']):.3g}"
        print(f"{group:<7} {method:<32} {settings:<36} {st['err']:>11.2e} {st['hvp']:>6.1f} "
              f"{1e3 * st['time']:>8.1f} {1e3 * st['tmin']:>7.1f} {1e3 * st['time'] / max(st['hvp'], 1):>7.2f} "
              f"{ratio:>15} {rmin:>5}{extra}")

    # side effects (what each call leaves behind on a model in train mode with .grad None)
    restore(model)
    params0 = [p.detach().clone() for p in model.parameters()]
    hessian_eigs(model, None, (x, y), k=2)
    ours_fx = (model.training, any(p.grad is not None for p in model.parameters()),
               all(torch.equal(a, b) for a, b in zip(params0, model.parameters())))
    if ph is not None:
        h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        h.eigenvalues(top_n=1)
        ph_fx = (model.training, any(p.grad is not None for p in model.parameters()),
                 all(torch.equal(a, b) for a, b in zip(params0, model.parameters())))
        restore(model)
        print(f"side effects (train mode kept, .grad set, params unchanged): ours {ours_fx}, PyHessian {ph_fx}")
    # target lines
    if ph is not None:
        php = [st for g, m, s, st, _ in rows if g == "top-2" and m.startswith("PyHessian")][0]
        for key, label in (("o2", "tol=1e-3"), ("o2b", "tol=1e-2")):
            o = by_key[key]
            print(f"target top-2 vs PyHessian: ours {label}: err {o['err']:.1e} vs {php['err']:.1e} "
                  f"({'>=' if o['err'] <= php['err'] else '<'} PyHessian's accuracy), time ratio "
                  f"{o['time'] / php['time']:.2f} median / {o['tmin'] / php['tmin']:.2f} min (target <= 0.5), "
                  f"HVPs {o['hvp']:.1f} vs {php['hvp']:.1f} (target <= 40)")
    return P


def bench_hvp_methods(models, x, y):
    print("\n=== time per full-set HVP (float32, 1797 examples), median of 20 ===")
    print(f"{'model':<18} {'batches':>7} {'double_backward':>16} {'double_backward_retain':>22} {'forward_over_reverse':>21} {'auto picks':>24}")
    for name, model in models.items():
        for nb in (1, 4):
            chunks = list(zip(x.chunk(nb), y.chunk(nb)))
            ls = _LossSet(model, None, chunks if nb > 1 else (x, y), None, None, "eval")
            v = torch.randn(ls.n_params, generator=torch.Generator().manual_seed(0))
            out = []
            with torch.enable_grad():
                for m in ("double_backward", "double_backward_retain", "forward_over_reverse"):
                    op = _HVP(ls, m)
                    op(v)
                    ts = []
                    for _ in range(20):
                        t0 = time.perf_counter()
                        op(v)
                        ts.append(time.perf_counter() - t0)
                    out.append(1e3 * statistics.median(ts))
                auto = _HVP(ls, "auto").method
            print(f"{name:<18} {nb:>7} {out[0]:>13.2f} ms {out[1]:>19.2f} ms {out[2]:>18.2f} ms {auto:>24}")


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="curvature benchmark vs PyHessian / hessian-eigenthings")
    ap.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    ap.add_argument("--repeats", type=int, default=7, help="seeds per method (round-robin)")
    args = ap.parse_args(argv)
    global R
    R = args.repeats
    x, y = load_data()
    ph, he = pyhessian_module(), eigenthings_module()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"PyHessian {'installed' if ph else 'NOT installed'}; "
          f"hessian-eigenthings {getattr(he, '__version__', 'NOT installed') if he else 'NOT installed'}")
    if ph is not None:
        orig = ph.hessian_vector_product

        def counted(*a, **k):
            Counter.n += 1
            return orig(*a, **k)

        ph.hessian_vector_product = counted
    import warnings

    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    models = {name: m for name, m in make_models().items() if name.split()[0].lower() in args.models}
    for name, model in models.items():
        bench_model(name, model, x, y, ph, he)
    bench_hvp_methods(models, x, y)


if __name__ == "__main__":
    main()
