"""Edge of stability at digits scale (Cohen et al. 2021, "Gradient descent on neural
networks typically occurs at the edge of stability").

    .venv/bin/python benchmarks/repro_eos.py                 # ~4-8 minutes on 2 shared CPU cores
    .venv/bin/python benchmarks/repro_eos.py --lrs 0.4 0.2 --tau 200
    .venv/bin/python benchmarks/repro_eos.py --lrs 0.2 --momentum-lrs 0.38 --seeds 1 2   # other inits

Their setting, scaled down: full-batch gradient descent (torch.optim.SGD, no momentum),
squared loss ``mean_i 0.5 * ||f(x_i) - y_i||^2`` with one-hot 0/1 targets, a fully
connected tanh network 64-200-200-10 (PyTorch default init, seed 0), on the first 1000
scikit-learn digits (features centred and standardised, as they do for CIFAR-10).

Sharpness = top Hessian eigenvalue of the training loss on those 1000 examples, by
``lightning_ntk.hessian_eigs(k=1, tol=1e-3)``, warm-started from the previous snapshot's
eigenvector. The learning rates are compared at equal "time" tau = eta * step (for heavy-ball
momentum beta, tau = eta * step / (1 - beta), its effective step), so each row of the table
is the same point of gradient flow for every learning rate.
Prediction (Cohen et al.): sharpness rises (progressive sharpening) until it reaches
2/eta, then hovers at or just above 2/eta while the loss keeps decreasing, non-monotonically.
With full-batch heavy-ball momentum beta (``--momentum-lrs``, beta = ``--momentum`` = 0.9,
PyTorch's SGD without dampening) the threshold is (2 + 2 beta)/eta (Cohen et al. 2021,
their momentum experiments): 3.8/eta, so eta = 0.25 and 0.2 put it at 15.2 and 19
(their effective steps 2.5 and 2 keep the rows at tau multiples of 10; trained to tau =
500, ``--momentum-tau``). At eta = 0.38 (threshold 10) the run crossed the threshold at
tau 171, fell back once, then diverged at step 63: a run stops at a non-finite (or
> 1e6) loss and says so.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ntk.curvature import edge_of_stability_threshold, hessian_eigs, squared_loss  # noqa: E402


def load(n: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = nn.functional.one_hot(torch.tensor(d.target[:n]), 10).float()
    return x, y


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 10))


def run(lr: float, x, y, tau_max: float, tau_every: float, momentum: float = 0.0, seed: int = 0):
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    thr, _ = edge_of_stability_threshold(opt)
    per_step = lr / (1.0 - momentum)  # gradient-flow time per step
    steps = int(round(tau_max / per_step))
    every = max(1, int(round(tau_every / per_step)))
    rows, prev, n_hvp, t_sharp = [], None, 0, 0.0
    t0 = time.perf_counter()
    diverged = None
    for step in range(steps + 1):
        if step % every == 0:
            ts = time.perf_counter()
            r = hessian_eigs(model, None, (x, y), k=1, tol=1e-3, init=prev, return_eigenvectors=True)
            t_sharp += time.perf_counter() - ts
            prev = r
            n_hvp += r.n_hvp
            with torch.no_grad():
                loss = float(squared_loss(model(x), y))
            rows.append((per_step * step, step, loss, float(r.eigenvalues[0]), r.n_hvp, r.converged))
        if step < steps:
            opt.zero_grad(set_to_none=True)
            loss_t = squared_loss(model(x), y)
            if not bool(torch.isfinite(loss_t)) or float(loss_t.detach()) > 1e6:  # diverged: stop, say so
                diverged = step
                break
            loss_t.backward()
            opt.step()
    return {"lr": lr, "momentum": momentum, "seed": seed, "thr": thr, "rows": rows, "diverged": diverged,
            "n_hvp": n_hvp, "time": time.perf_counter() - t0, "t_sharp": t_sharp, "steps": steps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lrs", type=float, nargs="*", default=[0.4, 0.2, 0.1])
    ap.add_argument("--tau", type=float, default=300.0, help="train until eta * step = tau")
    ap.add_argument("--tau-every", type=float, default=10.0, help="sharpness every eta * steps = this")
    ap.add_argument("--n", type=int, default=1000, help="number of digits examples")
    ap.add_argument("--momentum", type=float, default=0.9, help="heavy-ball momentum of the --momentum-lrs runs")
    ap.add_argument("--momentum-lrs", type=float, nargs="*", default=[0.25, 0.2])
    ap.add_argument("--momentum-tau", type=float, default=500.0, help="tau of the momentum runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="initialisation seeds")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    x, y = load(args.n)
    P = sum(p.numel() for p in make_model().parameters())
    print(f"full-batch GD, MSE (0.5*||f-y||^2, one-hot), MLP 64-200-200-10 tanh (P={P}), "
          f"{args.n} digits; sharpness = hessian_eigs top-1, tol 1e-3, warm-started")
    results = [run(lr, x, y, args.tau, args.tau_every, 0.0, seed) for seed in args.seeds for lr in args.lrs]
    results += [run(lr, x, y, args.momentum_tau, args.tau_every, args.momentum, seed)
                for seed in args.seeds for lr in args.momentum_lrs]

    print(f"{'':>9} |" + "|".join(f" {_name(r):<34}" for r in results))
    head = f"{'tau':>9} |" + "|".join(f" {'step':>10} {'loss':>7} {'sharp':>7}  {'thr':>5} " for r in results)
    print(head)
    print("-" * len(head))
    n_rows = max(len(r["rows"]) for r in results)
    for i in range(n_rows):
        cells = []
        tau = None
        for r in results:
            if i < len(r["rows"]):
                tau_i, step, loss, lam, nh, conv = r["rows"][i]
                tau = tau_i if tau is None else tau
                flag = "" if conv else "*"
                cells.append(f" {step:>10d} {loss:>7.4f} {lam:>7.3f}{flag:1} {r['thr']:>5.1f} ")
            else:
                cells.append(" " * 35)
        print(f"{tau:>9.0f} |" + "|".join(cells))
    print("(* = not converged to tol)")

    print("\nsummary per learning rate")
    print(f"{'run':>12} {'thr':>6} {'sharp@0':>8} {'max sharp':>9} {'first >= 0.95*thr':>20} "
          f"{'after that: mean, min, max of sharp/thr':>44} {'final loss':>10} {'HVPs/snap':>9} {'time s':>7} {'of which sharp':>14}")
    for r in results:
        lam = [row[3] for row in r["rows"]]
        hit = next((i for i, v in enumerate(lam) if v >= 0.95 * r["thr"]), None)
        if hit is None:
            after, when = "never reached", "-"
        else:
            tail = torch.tensor(lam[hit:]) / r["thr"]
            after = f"{float(tail.mean()):.3f}, {float(tail.min()):.3f}, {float(tail.max()):.3f}"
            when = f"step {r['rows'][hit][1]} (tau {r['rows'][hit][0]:.0f})"
        print(f"{_name(r):>12} {r['thr']:>6.1f} {lam[0]:>8.3f} {max(lam):>9.3f} {when:>20} {after:>44} "
              f"{r['rows'][-1][2]:>10.4f} {r['n_hvp'] / len(lam):>9.1f} {r['time']:>7.1f} {r['t_sharp']:>14.1f}"
              + (f"  diverged at step {r['diverged']}" if r["diverged"] is not None else ""))


def _name(r: dict) -> str:
    momentum = f" b={r['momentum']:g}" if r["momentum"] else ""
    return f"lr={r['lr']:g}{momentum} s{r['seed']}"


if __name__ == "__main__":
    main()
