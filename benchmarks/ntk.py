"""eNTK benchmark: lightning_ntk.empirical_ntk vs the torch.func tutorial and nngeometry,
and vs the FLOP floor of the shapes, over widths, probe sizes and kinds.

    .venv/bin/python benchmarks/ntk.py               # sweep, choices, ResNet-18, memory (~30 min on 2 cores)
    .venv/bin/python benchmarks/ntk.py --quick       # CNN w=32 and MLP w=512 at N=64 only (~5 min)
    .venv/bin/python benchmarks/ntk.py --only sweep choices resnet memory
    .venv/bin/python benchmarks/ntk.py --device cuda # the same on a GPU (sweep and ResNet-18)

Sweep cases (2 CPU threads, ``--threads`` to change, float32, x2 = x1, inputs ~ N(0, 1),
10 classes):

* CNN of width w (widening, like the torch.func tutorial's network but strided):
  Conv2d(3, w, 3, padding 1) -> ReLU -> Conv2d(w, 2w, 3, stride 2, padding 1) -> ReLU ->
  Conv2d(2w, 4w, 3, stride 2, padding 1) -> ReLU -> flatten -> Linear(4w * 64, 10), on 3x32x32;
  w = 16, 32, 64, 128 at N = 64, and w = 32 at N = 16 and 256;
* MLP 64-w-w-10 (ReLU): w = 128, 512, 2048 at N = 64, and w = 512 at N = 16 and 256;

kinds ``full`` (N, N, 10, 10), ``trace`` (N, N) and ``sketch`` (``sketched_ntk`` with m = 4
Rademacher projections: the kernels s_r^T Theta s_r / C, their mean and standard error).

Methods:

* ours: ``empirical_ntk(model, x, kind=...)`` (default ``method="auto"``, default memory
  budget) or ``sketched_ntk(model, x, projections=4)``.
* func-jac: the tutorial's ``empirical_ntk_jacobian_contraction`` (vmap(jacrev) per-example
  Jacobians, einsum contraction; ``compute`` 'full' / 'trace'; for the sketch 'diagonal' on
  the model times S^T, then mean and standard error over the m kernels).
* func-ntvp: the tutorial's ``empirical_ntk_ntk_vps`` (vjp then jvp, vmapped over output
  basis vectors and all example pairs; the outer vmap given a ``chunk_size`` that bounds its
  N*N*C*P intermediate near 2 GB).
* nngeometry 0.4 (if installed): ``GramMatrix(model, loader)`` with the whole probe as one
  batch, ``.to_torch()`` (C, N, C, N); it always computes the full kernel (also for the
  trace and sketch rows, where it is given the projected model).

func-ntvp and nngeometry are run on the smallest case of each architecture (N = 16) and
elsewhere only where their time, predicted from their FLOP rate measured there (FLOP
models: ``anchor_flops``), is under twice the time of an anchor already measured in the
row (func-jac); otherwise the row says "not run" with the prediction.

An anchor whose Jacobians alone would exceed 6 GB is not run; a call is stopped after
``--stop`` seconds (default 90; a stop takes effect between operations).

Columns: times are medians over rounds in which every method of the row runs once, in
turns (fair when the machine's load changes), after one warm-up call each; 5 rounds, 3
when a round takes over 10 s, 1 over 60 s. "best" = the fastest anchor's time and
"ours/best" our time divided by it. "floor" = the FLOPs of the cheapest exact structured
computation for these shapes (forward pass, one backward pass per output direction, and per
layer the cheapest contraction order of Novak et al. 2022: ``lightning_ntk.ntk._cost``)
divided by this machine's GEMM rate, measured as a 1024^3 float32 matmul once per round
(median over the row's rounds; the column "GF/s"), so that the ratio tracks the load;
"ours/floor" our time divided by it. "err" = max |K - K_ref| / max |K_ref| against a
float64 reference computed by ours in float64 (the anchors' errors against the same
reference check it independently). The load average is printed per row.

``--choices``: for chosen cases, every factored layer is forced into each contraction
order (the others keep the model's choice) and the whole kernel timed in turns with the
model's choice: measured times next to the cost model's prediction, so the per-layer choice
is checked against measurement.

``resnet``: a ResNet-18 (CIFAR layout: 3x3 stem, BasicBlocks 64-128-256-512, eval-mode
BatchNorm, 11.2 M parameters; built from torch.nn here), trace kernel for N = 128 under
``max_memory="6GB"``: time, peak RSS, the per-layer kernels from the same pass (their sum
against the total) and the first 4 examples against a float64 torch.func reference.

``memory``: a full kernel for N = 2000 on an MLP 32-256-256-10 under ``max_memory="2GB"``
(the output alone is 1.49 GiB: it completes tiled) and N = 2400 (refused before computing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THREADS = int(os.environ.get("NTK_BENCH_THREADS", "2"))  # set by --threads for the children
ADDRESS_LIMIT = 14 * 2**30
JACOBIAN_LIMIT = 6 * 2**30
PROJECTIONS = 4
C = 10
CNN_CASES = [("cnn", 32, 16), ("cnn", 16, 64), ("cnn", 32, 64), ("cnn", 64, 64), ("cnn", 128, 64), ("cnn", 32, 256)]
MLP_CASES = [("mlp", 512, 16), ("mlp", 128, 64), ("mlp", 512, 64), ("mlp", 2048, 64), ("mlp", 512, 256)]
QUICK_CASES = [("cnn", 32, 64), ("mlp", 512, 64)]
KINDS = ["full", "trace", "sketch"]
ANCHORS = ["func-jac", "func-ntvp", "nngeometry"]
CHOICE_CASES = [("cnn", 64, 64, "full"), ("cnn", 64, 64, "trace"), ("cnn", 128, 64, "full"), ("mlp", 512, 64, "full")]


# ---------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------


class CNN(nn.Module):
    """Widening strided CNN of width w (see the module docstring)."""

    def __init__(self, w: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * w * 64, C)

    def forward(self, x):
        x = self.conv1(x).relu()
        x = self.conv2(x).relu()
        x = self.conv3(x).relu()
        return self.fc(x.flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016, the usual CIFAR layout)."""

    def __init__(self, classes: int = C):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layers(x).mean((2, 3)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their defaults (a trained look)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model


def make_case(arch: str, width: int, n: int, device: str = "cpu"):
    torch.manual_seed(0)
    if arch == "cnn":
        model, x = CNN(width), torch.randn(n, 3, 32, 32)
    elif arch == "mlp":
        model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, C))
        x = torch.randn(n, 64)
    elif arch == "small-mlp":
        model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, C))
        x = torch.randn(n, 32)
    elif arch == "resnet18":
        model, x = _randomize_bn(ResNet18()), torch.randn(n, 3, 32, 32)
    else:
        raise KeyError(arch)
    return model.eval().to(device), x.to(device)


def signs(device: str = "cpu") -> torch.Tensor:
    from lightning_ntk.ntk import rademacher_projections

    return rademacher_projections(PROJECTIONS, C, 0, device=device)


class Projected(nn.Module):
    """model(x) S^T: the m projected outputs whose diagonal kernel is the sketch."""

    def __init__(self, model: nn.Module, s: torch.Tensor):
        super().__init__()
        self.model = model
        self.s = s

    def forward(self, x):
        return self.model(x) @ self.s.T


# ---------------------------------------------------------------------------------------
# anchors: the torch.func tutorial (https://pytorch.org/tutorials/intermediate/neural_tangent_kernels.html)
# ---------------------------------------------------------------------------------------


def tutorial_fnet_single(net):
    from torch.func import functional_call

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    return fnet_single


def empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2, compute="full"):
    from torch.func import jacrev, vmap

    # Compute J(x1)
    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = jac1.values()
    jac1 = [j.flatten(2) for j in jac1]

    # Compute J(x2)
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = jac2.values()
    jac2 = [j.flatten(2) for j in jac2]

    # Compute J(x1) @ J(x2).T
    einsum_expr = None
    if compute == "full":
        einsum_expr = "Naf,Mbf->NMab"
    elif compute == "trace":
        einsum_expr = "Naf,Maf->NM"
    elif compute == "diagonal":
        einsum_expr = "Naf,Maf->NMa"
    else:
        raise ValueError(f"unknown compute {compute!r}")

    result = torch.stack([torch.einsum(einsum_expr, j1, j2) for j1, j2 in zip(jac1, jac2)])
    result = result.sum(0)
    return result


def empirical_ntk_ntk_vps(func, params, x1, x2, compute="full", chunk_size=None):
    from torch.func import jvp, vjp, vmap

    def get_ntk(x1, x2):
        def func_x1(params):
            return func(params, x1)

        def func_x2(params):
            return func(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):
            # This computes vec @ J(x2).T
            # `vec` is some unit vector (a single slice of the Identity matrix)
            vjps = vjp_fn(vec)
            # This computes J(X1) @ vjps
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        # Here's our identity matrix
        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    # the only change: chunk_size on the outer vmap bounds the N*N*C*P intermediate
    result = vmap(vmap(get_ntk, (None, 0)), (0, None), chunk_size=chunk_size)(x1, x2)

    if compute == "full":
        return result
    if compute == "trace":
        return torch.einsum("NMKK->NM", result)
    if compute == "diagonal":
        return torch.einsum("NMKK->NMK", result)


def nngeometry_gram(model, x):
    from nngeometry import GramMatrix
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x), batch_size=x.shape[0])
    return GramMatrix(model, loader).to_torch()  # (C, N, C, N)


def _sketch_stats(diag: torch.Tensor) -> tuple:
    """(N, N, m) kernels s_r^T Theta s_r (already divided by C) -> mean and standard error."""
    return diag.mean(-1), diag.std(-1) / math.sqrt(diag.shape[-1])


def run_method(method: str, kind: str, model: nn.Module, x: torch.Tensor):
    """One call; returns the kernel in our layout (trace: mean over logits; sketch: mean)."""
    if method == "ours":
        if kind == "sketch":
            from lightning_ntk.ntk import sketched_ntk

            return sketched_ntk(model, x, projections=PROJECTIONS, seed=0).kernel
        from lightning_ntk.ntk import empirical_ntk

        return empirical_ntk(model, x, kind=kind)
    net = Projected(model, signs(str(x.device))) if kind == "sketch" else model
    if method == "nngeometry":
        g = nngeometry_gram(net, x).permute(1, 3, 0, 2)  # (N, N, C, C)
        d = torch.diagonal(g, dim1=2, dim2=3)
        if kind == "full":
            return g
        return d.mean(-1) if kind == "trace" else _sketch_stats(d / C)[0]
    params = {k: v.detach() for k, v in net.named_parameters()}
    fnet_single = tutorial_fnet_single(net)
    compute = "diagonal" if kind == "sketch" else kind
    if method == "func-jac":
        k = empirical_ntk_jacobian_contraction(fnet_single, params, x, x, compute)
    else:
        numel = sum(p.numel() for p in params.values())
        outputs = PROJECTIONS if kind == "sketch" else C
        chunk = max(1, int(2 * 2**30 // (x.shape[0] * outputs * numel * 4)))
        k = empirical_ntk_ntk_vps(fnet_single, params, x, x, compute, chunk_size=chunk)
    if kind == "trace":  # the tutorial's 'trace' is the sum over logits; ours the mean
        return k / C
    if kind == "sketch":
        return _sketch_stats(k / C)[0]
    return k


def reference(model: nn.Module, x: torch.Tensor, kind: str, full64: torch.Tensor) -> torch.Tensor:
    if kind == "full":
        return full64
    if kind == "trace":
        return torch.diagonal(full64, dim1=2, dim2=3).mean(-1)
    s = signs(str(full64.device)).to(torch.float64)
    return torch.einsum("nmab,ra,rb->nmr", full64, s, s).div(C).mean(-1)


# ---------------------------------------------------------------------------------------
# costs: the FLOP floor, the anchors' sizes
# ---------------------------------------------------------------------------------------


def plan_of(model: nn.Module, x: torch.Tensor):
    from lightning_ntk.ntk._empirical import _Setup

    with torch.enable_grad():
        return _Setup(model, x, None, "trace", None, "structured", False, None, None).plan


def floor_flops(plan, kind: str, n: int) -> float:
    from lightning_ntk.ntk._cost import flop_floor

    if kind == "sketch":
        return flop_floor(plan, "diagonal", n, K=PROJECTIONS)["total"]
    return flop_floor(plan, kind, n)["total"]


def ntvp_flops(plan, kind: str, n: int) -> float:
    """The tutorial's NTK-vector products: per example pair and output, one vjp and one jvp
    on one example (about 2 and 2 forward passes' worth of multiply-adds)."""
    outputs = PROJECTIONS if kind == "sketch" else C
    return 2 * n * n * outputs * 4 * max(plan.macs_per_example, sum(plan.numel.values()))


def anchor_flops(method: str, model: nn.Module, plan, kind: str, n: int) -> float:
    """FLOP model of an anchor, to predict its time at other sizes from its measured rate:
    NTK-vector products as above; nngeometry (full kernel always): per-example Jacobians
    (forward and C backward passes with weight gradients) and their N^2 C^2 P Gram."""
    if method == "func-ntvp":
        return ntvp_flops(plan, kind, n)
    outputs = PROJECTIONS if kind == "sketch" else C
    p = sum(q.numel() for q in model.parameters())
    return 2 * (n * (1 + 2 * outputs) * plan.macs_per_example + n * n * outputs * outputs * p)


def jacobian_bytes(model: nn.Module, kind: str, n: int) -> int:
    outputs = PROJECTIONS if kind == "sketch" else C
    return 2 * n * outputs * sum(p.numel() for p in model.parameters()) * 4


class Stopped(Exception):
    pass


def _alarm(signum, frame):
    raise Stopped()


def timed_call(fn, limit: float):
    """(result, seconds), or raise Stopped after ``limit`` seconds (between operations)."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    t0 = time.perf_counter()
    try:
        out = fn()
        return out, time.perf_counter() - t0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def gemm_rate(device: str) -> float:
    """FLOP/s of one 1024^3 float32 matmul (two calls, the faster)."""
    a = torch.randn(1024, 1024, device=device)
    b = torch.randn(1024, 1024, device=device)
    best = math.inf
    for _ in range(2):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def have_nngeometry() -> bool:
    import importlib.util

    return importlib.util.find_spec("nngeometry") is not None


# ---------------------------------------------------------------------------------------
# sweep: one child process per case
# ---------------------------------------------------------------------------------------


def sweep_child(arch: str, width: int, n: int, kinds, ntvp_rate: dict, stop: float, device: str, quick: bool) -> list:
    from lightning_ntk.ntk import empirical_ntk

    model, x = make_case(arch, width, n, device)
    plan = plan_of(model, x)
    full64 = empirical_ntk(model, x, kind="full", dtype=torch.float64)
    rows = []
    anchors = [a for a in ANCHORS if a != "nngeometry" or have_nngeometry()]
    for kind in kinds:
        ref = reference(model, x, kind, full64)
        row: dict = {"arch": arch, "width": width, "n": n, "kind": kind, "notes": {}, "err": {}, "first": {}}
        ok = []
        for method in ["ours"] + anchors:
            why = None
            if method != "ours" and jacobian_bytes(model, kind, n) > JACOBIAN_LIMIT and method != "func-ntvp":
                why = f"not run: its Jacobians need {jacobian_bytes(model, kind, n) / 2**30:.1f} GB"
            if method == "func-ntvp" and quick:
                why = "not run with --quick (N^2 C passes: the slowest anchor in every full-sweep row)"
            elif method == "nngeometry" and quick and arch == "cnn":
                why = "not run with --quick (on CNNs 3-6x slower than func-jac at N = 16 in the full sweep)"
            elif method in ("func-ntvp", "nngeometry"):
                rate = ntvp_rate.get(f"{arch}:{method}:{kind}")
                best = min([row["first"][m] for m in ok if m != "ours"], default=None)
                if rate is not None and best is not None:
                    guess = anchor_flops(method, model, plan, kind, n) / rate
                    if guess > 2 * best:
                        why = f"not run: ~{guess:.0f} s predicted from its rate on the smallest {arch} case"
            if why:
                row["notes"][method] = why
                continue
            try:
                k, dt = timed_call(lambda m=method, k=kind: run_method(m, k, model, x), stop if method != "ours" else 10 * stop)
                _sync(device)
            except Stopped:
                row["notes"][method] = f"stopped after {stop:.0f} s"
                continue
            except Exception as err:  # noqa: BLE001 - an anchor that fails is reported, not fatal
                if method == "ours":
                    raise
                traceback.print_exc()
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                row["notes"][method] = ("out of memory: " if "memory" in msg.lower() or "alloc" in msg.lower() else "") + msg[:80]
                continue
            row["first"][method] = dt
            if k.shape != ref.shape:
                row["notes"][method] = f"returned shape {tuple(k.shape)}, expected {tuple(ref.shape)}"
                continue
            row["err"][method] = float((k.double() - ref).abs().max() / ref.abs().max())
            del k
            ok.append(method)
            if method in ("func-ntvp", "nngeometry"):
                row.setdefault("anchor_rates", {})[f"{arch}:{method}:{kind}"] = anchor_flops(method, model, plan, kind, n) / dt
        round_time = sum(row["first"].values())
        rounds = 5 if round_time < 10 else (3 if round_time < 60 else 1)
        times: dict = {m: [] for m in ok}
        rates = []
        for r in range(rounds):
            rates.append(gemm_rate(device))
            order = ok[r % len(ok):] + ok[: r % len(ok)]
            for m in order:
                if rounds == 1 and m != "ours":  # one slow round: the warm-up call is the time
                    times[m].append(row["first"][m])
                    continue
                _sync(device)
                t0 = time.perf_counter()
                run_method(m, kind, model, x)
                _sync(device)
                times[m].append(time.perf_counter() - t0)
        row["time"] = {m: statistics.median(t) for m, t in times.items()}
        row["rate"] = statistics.median(rates)
        row["floor"] = floor_flops(plan, kind, n) / row["rate"]
        row["rounds"] = rounds
        row["load"] = os.getloadavg()[0]
        row["modes"] = _modes(model, x, kind)
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
    return rows


def _modes(model, x, kind) -> str:
    """The contraction order of each factored layer that ours used."""
    from lightning_ntk.ntk._empirical import _Setup

    k = "diagonal" if kind == "sketch" else kind
    net = Projected(model, signs(str(x.device))) if kind == "sketch" else model
    with torch.enable_grad():
        plan = _Setup(net, x, None, k, None, "auto", False, None, None).plan
    short = {"per_example": "J", "patch": "P", "patch_h": "H"}
    return "".join(short[s.mode] for s in plan.structured if s.mode in short)


def _fmt(t) -> str:
    return f"{t:8.3f}" if t is not None else f"{'-':>8}"


def print_row(row: dict) -> None:
    t = row["time"]
    anchors = {m: v for m, v in t.items() if m != "ours"}
    best = min(anchors, key=anchors.get) if anchors else None
    ours = t.get("ours")
    label = f"{row['arch']} w={row['width']}"
    cells = " ".join(_fmt(t.get(m)) for m in ANCHORS)
    ratio = f"{ours / anchors[best]:9.3f}" if best and ours else f"{'-':>9}"
    fl = f"{ours / row['floor']:10.2f}" if ours else f"{'-':>10}"
    err = f"{row['err'].get('ours', float('nan')):8.1e}"
    aerr = f"{row['err'][best]:8.1e}" if best else f"{'-':>8}"
    print(
        f"{label:<11} {row['n']:>4} {row['kind']:<6} {_fmt(ours)} {cells} {ratio} {(best or '-'):<10} "
        f"{row['floor']:8.3f} {fl} {err} {aerr} {row['rate'] / 1e9:6.0f} {row['load']:5.2f}  {row['modes']}",
        flush=True,
    )
    for m, why in row["notes"].items():
        print(f"{'':<11} {'':>4} {'':<6} {m}: {why}", flush=True)


def sweep(cases, kinds, stop: float, device: str, quick: bool = False) -> None:
    print(f"# eNTK sweep: {machine(device)}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f}; nngeometry {'installed' if have_nngeometry() else 'not installed'}")
    print(
        "# times in s (medians of rounds in turns); floor = cheapest structured FLOPs / GEMM rate; "
        "modes: contraction order per factored layer (J per-example, P patch, H patch_h)"
    )
    print(
        f"{'case':<11} {'N':>4} {'kind':<6} {'ours':>8} {'func-jac':>8} {'ntvp':>8} {'nngeom':>8} {'ours/best':>9} "
        f"{'best':<10} {'floor':>8} {'ours/floor':>10} {'err':>8} {'err best':>8} {'GF/s':>6} {'load':>5}  modes"
    )
    ntvp_rate: dict = {}
    for arch, width, n in cases:
        args = ["sweep", arch, str(width), str(n), ",".join(kinds), json.dumps(ntvp_rate), str(stop), str(int(quick)), device]
        for row in spawn(args, timeout=3600):
            if "error" in row:
                print(f"{arch} w={width} N={n}: failed: {row['error']}", flush=True)
                continue
            for key, rate in row.get("anchor_rates", {}).items():
                ntvp_rate.setdefault(key, rate)
            print_row(row)
    print(f"# load average at end: {os.getloadavg()[0]:.2f}", flush=True)


# ---------------------------------------------------------------------------------------
# choices: the per-layer cost model against measured time
# ---------------------------------------------------------------------------------------


def choices_child(arch: str, width: int, n: int, kind: str, device: str) -> list:
    from lightning_ntk.ntk import _empirical, empirical_ntk
    from lightning_ntk.ntk._cost import EFFICIENCY, slot_options

    model, x = make_case(arch, width, n, device)
    plan = plan_of(model, x)
    K = C
    chosen = {}
    from lightning_ntk.ntk._cost import choose_modes

    choose_modes(plan, kind, K, n, n, True)
    variants = [("model's choice", {})]
    preds = {"model's choice": 0.0}
    for s in plan.structured:
        if s.family == "vec":
            continue
        opts = slot_options(s, kind, K, n, n, True)
        chosen[s.name] = s.mode
        for mode, macs in opts.items():
            if mode == s.mode:
                continue
            name = f"{s.name} -> {mode}"
            preds[name] = 2 * (macs * EFFICIENCY[mode] - opts[s.mode] * EFFICIENCY[s.mode])
            variants.append((name, {s.name: mode}))
    rate = gemm_rate(device)
    base = floor_flops(plan, kind, n) / rate

    def run(force):
        _empirical._FORCE_MODES = force
        try:
            _sync(device)
            t0 = time.perf_counter()
            empirical_ntk(model, x, kind=kind)
            _sync(device)
            return time.perf_counter() - t0
        finally:
            _empirical._FORCE_MODES = {}

    run({})
    live = []
    out = []
    for name, force in variants:
        extra = preds[name] / rate
        if extra > 20 * max(base, 0.05):
            out.append({"variant": name, "note": f"not timed: +{extra:.1f} s predicted"})
            continue
        live.append((name, force))
    times: dict = {name: [] for name, _ in live}
    rates = []
    for r in range(3):
        rates.append(gemm_rate(device))
        for name, force in live[r % len(live):] + live[: r % len(live)]:
            times[name].append(run(force))
    rate = statistics.median(rates)
    t0 = statistics.median(times["model's choice"])
    for name, _ in live:
        out.append({"variant": name, "time": statistics.median(times[name]), "pred": t0 + preds[name] / rate})
    return [{"case": f"{arch} w={width} N={n} {kind}", "chosen": chosen, "rows": out, "load": os.getloadavg()[0]}]


def choices(device: str) -> None:
    print("# per-layer contraction order: whole-kernel time with one layer forced into another order")
    print("# (pred = measured time of the model's choice + the cost model's extra FLOPs at the measured GEMM rate)")
    for arch, width, n, kind in CHOICE_CASES:
        for res in spawn(["choices", arch, str(width), str(n), kind, device], timeout=1800):
            if "error" in res:
                print(f"{arch} w={width} N={n} {kind}: failed: {res['error']}")
                continue
            print(f"## {res['case']}: chosen {res['chosen']} (load {res['load']:.2f})")
            for r in res["rows"]:
                if "time" in r:
                    print(f"   {r['variant']:<34} measured {r['time']:8.3f} s   predicted {r['pred']:8.3f} s", flush=True)
                else:
                    print(f"   {r['variant']:<34} {r['note']}", flush=True)


# ---------------------------------------------------------------------------------------
# ResNet-18 and the memory bound
# ---------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def resnet_child(device: str, max_memory: str = "6GB", n: int = 128) -> list:
    from lightning_ntk.ntk import empirical_ntk, estimate_ntk_memory

    model, x = make_case("resnet18", 0, n, device)
    params = sum(p.numel() for p in model.parameters())
    empirical_ntk(model, x[:4], kind="trace")  # library initialisation outside the measurement
    est = estimate_ntk_memory(model, x, kind="trace", max_memory=max_memory)
    plan = plan_of(model, x)
    r0 = gemm_rate(device)
    before = _status("VmRSS")
    _reset_peak()
    _sync(device)
    t0 = time.perf_counter()
    k = empirical_ntk(model, x, kind="trace", max_memory=max_memory)
    _sync(device)
    total = time.perf_counter() - t0
    peak = _status("VmHWM") - before
    t0 = time.perf_counter()
    parts = empirical_ntk(model, x, kind="trace", max_memory=max_memory, per_layer=True)
    _sync(device)
    layered = time.perf_counter() - t0
    rate = statistics.median([r0, gemm_rate(device)])
    summed = sum(parts.values())
    sum_err = float((summed.double() - k.double()).abs().max() / k.double().abs().max())
    ref = empirical_ntk(model, x[:4], kind="trace", method="jacobian", dtype=torch.float64, max_memory="4GB")
    err = float((k[:4, :4].double() - ref).abs().max() / ref.abs().max())
    fl = floor_flops(plan, "trace", n)
    from lightning_ntk.ntk._empirical import _Setup

    with torch.enable_grad():
        tiling = _Setup(model, x, None, "trace", None, "auto", False, None, max_memory).steps[0][2]
    return [
        {
            "params": params,
            "n": n,
            "max_memory": max_memory,
            "time": total,
            "time_per_layer": layered,
            "layers": len(parts),
            "peak": peak,
            "est_out": est.output_bytes,
            "est_work": est.working_bytes,
            "sum_err": sum_err,
            "err": err,
            "floor": fl / rate,
            "rate": rate,
            "tiling": str(tiling),
            "load": os.getloadavg()[0],
        }
    ]


def resnet(device: str) -> None:
    print("# ResNet-18 (CIFAR layout, 11.2 M parameters), trace kernel, N = 128, float32")
    for r in spawn(["resnet", device], timeout=3600):
        if "error" in r:
            print(f"failed: {r['error']}")
            continue
        print(
            f"{r['params'] / 1e6:.2f} M parameters, N = {r['n']}, max_memory={r['max_memory']}: {r['time']:.1f} s "
            f"(floor {r['floor']:.1f} s at {r['rate'] / 1e9:.0f} GFLOP/s: ours/floor {r['time'] / r['floor']:.2f}); "
            f"per_layer=True ({r['layers']} layers, same pass) {r['time_per_layer']:.1f} s; peak RSS increase "
            f"{r['peak'] / 2**30:.2f} GiB (estimate: output {r['est_out'] / 2**20:.2f} MiB + working "
            f"{r['est_work'] / 2**30:.2f} GiB); {r['tiling']}; per-layer sum vs total {r['sum_err']:.1e}; first 4 "
            f"examples vs float64 torch.func {r['err']:.1e}; load {r['load']:.2f}",
            flush=True,
        )


def memory_child() -> list:
    from lightning_ntk.ntk import NTKMemoryError, empirical_ntk, estimate_ntk_memory

    out = []
    for n in (2000, 2400):
        model, x = make_case("small-mlp", 0, n)
        est = estimate_ntk_memory(model, x, kind="full", max_memory="2GB")
        before = _status("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        try:
            k = empirical_ntk(model, x, kind="full", max_memory="2GB")
            dt = time.perf_counter() - t0
            peak = _status("VmHWM") - before
            text = (
                f"completed in {dt:.1f} s, output {tuple(k.shape)} {k.numel() * 4 / 2**30:.2f} GiB, peak RSS increase "
                f"{peak / 2**30:.2f} GiB (estimate: output {est.output_bytes / 2**30:.2f} GiB + working "
                f"{est.working_bytes / 2**30:.2f} GiB, method {est.method}), finite: {bool(torch.isfinite(k).all())}"
            )
            del k
        except NTKMemoryError as err:
            text = f"refused after {time.perf_counter() - t0:.2f} s: NTKMemoryError: {err}"
        out.append({"n": n, "text": text})
    return out


def memory() -> None:
    print("# N = 2000, kind='full', max_memory='2GB', MLP 32-256-256-10 (float32)")
    for r in spawn(["memory"], timeout=1800):
        print(f"N={r.get('n')}: {r.get('text') or r.get('error')}", flush=True)


# ---------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------


def machine(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {THREADS} threads"


def spawn(argv, timeout: float) -> list:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(argv)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"> {timeout:.0f} s (stopped)"}]
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if rows:
        return rows[0]
    partial = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    with open(Path(os.environ.get("TMPDIR", "/tmp")) / "ntk_bench_child.err", "a") as fh:
        fh.write(f"--- {argv}\n{proc.stderr}\n")
    return partial + [{"error": f"exit {proc.returncode}: {tail[:160]}"}]


def child(argv) -> None:
    what = argv[0]
    device = argv[-1] if what in ("sweep", "choices", "resnet") else "cpu"
    if device == "cpu":
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    torch.set_num_threads(THREADS)
    if what == "sweep":
        _, arch, width, n, kinds, rates, stop, quick, _ = argv
        out = sweep_child(arch, int(width), int(n), kinds.split(","), json.loads(rates), float(stop), device, quick == "1")
    elif what == "choices":
        _, arch, width, n, kind, _ = argv
        out = choices_child(arch, int(width), int(n), kind, device)
    elif what == "resnet":
        out = resnet_child(device)
    else:
        out = memory_child()
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CNN w=32 and MLP w=512 at N=64, sweep only")
    parser.add_argument("--only", nargs="+", choices=["sweep", "choices", "resnet", "memory"], help="sections to run")
    parser.add_argument("--no-memory", action="store_true", help="skip the N=2000 max_memory section")
    parser.add_argument("--stop", type=float, default=90.0, help="seconds after which an anchor's call is stopped")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 on a machine loaded by other jobs: see benchmarks/README.md)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global THREADS
    if not args.child:
        THREADS = args.threads
        os.environ["NTK_BENCH_THREADS"] = str(args.threads)
    if args.child:
        child(json.loads(args.child))
        return
    sections = args.only or (["sweep"] if args.quick else ["sweep", "choices", "resnet", "memory"])
    if args.no_memory and "memory" in sections:
        sections.remove("memory")
    if args.device != "cpu":
        sections = [s for s in sections if s in ("sweep", "resnet")]
    t0 = time.perf_counter()
    if "sweep" in sections:
        sweep(QUICK_CASES if args.quick else CNN_CASES + MLP_CASES, KINDS, args.stop, args.device, args.quick)
    if "resnet" in sections:
        resnet(args.device)
    if "choices" in sections:
        choices(args.device)
    if "memory" in sections:
        memory()
    print(f"# total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
