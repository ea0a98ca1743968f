"""eNTK benchmark: lightning_ntk.empirical_ntk vs the torch.func tutorial and nngeometry.

    .venv/bin/python benchmarks/ntk.py                 # the table and the memory-bound run
    .venv/bin/python benchmarks/ntk.py --quick         # MLP N=64 and CNN N=32 only

Cases (2 CPU threads, ``torch.set_num_threads(2)``, float32, x2 = x1):

* MLP 64-512-512-10 (ReLU), N = 64 and 256, inputs ~ N(0, 1);
* CNN: the torch.func tutorial's network (Conv2d 3->32->32->32, 3x3, no padding, ReLU
  between, Linear 21632->10) on 3x32x32 inputs, N = 32 and 128;

kinds ``full`` (N, N, 10, 10) and ``trace`` (N, N) (mean over logits).

Methods:

* ours: ``empirical_ntk(model, x, kind=..., method="auto")``; the method auto picked is shown.
* func-jac: the tutorial's ``empirical_ntk_jacobian_contraction`` (method 1: vmap(jacrev)
  per-example Jacobians, einsum contraction, with its ``compute`` = 'full' / 'trace').
* func-ntvp: the tutorial's ``empirical_ntk_ntk_vps`` (method 2: vjp then jvp, vmapped over
  output basis vectors and over all example pairs). Verbatim, except that the outer vmap
  over x1 is given ``chunk_size`` so that its N*N*C*P intermediate stays near 2 GB.
* nngeometry 0.4: ``GramMatrix(model, loader)`` with the whole probe as one batch, then
  ``.to_torch()`` (C, N, C, N); it always computes the full kernel, the trace row
  takes its trace (its time includes the full computation).

Columns: "err" = max |K - K_ref| / max |K_ref| against a float64 reference (our
``method="jacobian"`` path run in float64, itself tested against the brute-force autograd
loop in tests/test_ntk.py); "time" = median wall time after one warm-up call, of 5 calls
(3 when the warm-up took over 2 s, 1 when over 20 s), all methods of a row timed in one
child process, taking turns (fair when the machine's load changes); "peak" = peak
resident memory of one call minus the resident memory before it, each method in a fresh
child process (Linux: ``VmHWM`` from ``/proc/self/status`` after resetting it through
``/proc/self/clear_refs``; tracemalloc cannot see torch's allocations). Children run with
a 12 GB address-space limit, so an anchor that runs out of memory fails instead of
drawing the OOM killer, and a 300 s time limit; an anchor whose time at the smaller N
(fastest kind), scaled by N^2, predicts more than half that limit is not run (it would
not finish its untimed and timed calls in time). "ours/best" = our time / the fastest
anchor's, from this one run.

The last section computes a full kernel for N = 2000 on a small MLP (32-256-256-10) under
``max_memory="2GB"`` (the output alone is 1.49 GiB: it completes tiled) and asks for N =
2400 (2.15 GiB output: refused with NTKMemoryError before any computation).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THREADS = 2
REPEATS = 3
CHILD_TIMEOUT = 300
ADDRESS_LIMIT = 12 * 2**30
CASES = [("mlp", 64), ("mlp", 256), ("cnn", 32), ("cnn", 128)]
KINDS = ["full", "trace"]
METHODS = ["ours", "func-jac", "func-ntvp", "nngeometry"]


# ---------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------


class CNN(nn.Module):
    """The network of the torch.func "Neural Tangent Kernels" tutorial."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, (3, 3))
        self.conv2 = nn.Conv2d(32, 32, (3, 3))
        self.conv3 = nn.Conv2d(32, 32, (3, 3))
        self.fc = nn.Linear(21632, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = x.relu()
        x = self.conv2(x)
        x = x.relu()
        x = self.conv3(x)
        x = x.flatten(1)
        x = self.fc(x)
        return x


def make_case(name: str, n: int):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        x = torch.randn(n, 64)
    elif name == "cnn":
        model = CNN()
        x = torch.randn(n, 3, 32, 32)
    elif name == "small-mlp":
        model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        x = torch.randn(n, 32)
    else:
        raise KeyError(name)
    return model.eval(), x


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


def run_method(method: str, kind: str, model: nn.Module, x: torch.Tensor):
    """One call; returns (kernel in our layout, extra text)."""
    if method == "ours":
        from lightning_ntk.ntk import empirical_ntk

        return empirical_ntk(model, x, kind=kind), ""
    if method == "nngeometry":
        g = nngeometry_gram(model, x)
        C = g.shape[0]
        full = g.permute(1, 3, 0, 2)
        return (full if kind == "full" else torch.einsum("NMaa->NM", full) / C), ""
    params = {k: v.detach() for k, v in model.named_parameters()}
    fnet_single = tutorial_fnet_single(model)
    if method == "func-jac":
        k = empirical_ntk_jacobian_contraction(fnet_single, params, x, x, kind)
    else:
        numel = sum(p.numel() for p in params.values())
        C = model(x[:1]).shape[1]
        chunk = max(1, int(2 * 2**30 // (x.shape[0] * C * numel * 4)))
        k = empirical_ntk_ntk_vps(fnet_single, params, x, x, kind, chunk_size=chunk)
    if kind == "trace":  # the tutorial's 'trace' is the sum over logits; ours the mean
        k = k / (k.shape[-1] if k.dim() == 4 else model(x[:1]).shape[1])
    return k, ""


# ---------------------------------------------------------------------------------------
# measurement (child processes)
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


def child(args) -> None:
    """One measurement in a fresh process: the float64 reference, or one method's first
    call (error, peak memory, time), or interleaved timings of several methods."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    torch.set_num_threads(THREADS)
    model, x = make_case(args.case, args.n)
    out: dict = {}
    try:
        if args.method == "reference":
            from lightning_ntk.ntk import empirical_ntk

            ref = empirical_ntk(model, x, kind="full", method="jacobian", dtype=torch.float64, max_memory="4GB")
            torch.save(ref, args.ref)
            out["ok"] = True
        elif args.method.startswith("time:"):
            out = {"ok": True, "times": interleaved(args.method[5:].split(","), args.kind, model, x)}
        else:
            model(x[:2])  # library initialisation outside the measurement
            before = _status("VmRSS")
            _reset_peak()
            t0 = time.perf_counter()
            k, extra = run_method(args.method, args.kind, model, x)
            first = time.perf_counter() - t0
            peak = _status("VmHWM") - before
            ref = torch.load(args.ref)
            if args.kind == "trace":
                ref = torch.diagonal(ref, dim1=2, dim2=3).mean(-1)
            err = float((k.double() - ref).abs().max() / ref.abs().max())
            out.update(ok=True, first=first, peak=peak, err=err, extra=extra)
            if args.method == "ours":
                from lightning_ntk.ntk import estimate_ntk_memory

                out["extra"] = estimate_ntk_memory(model, x, kind=args.kind).method
    except (MemoryError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        oom = isinstance(err, MemoryError) or "memory" in msg.lower() or "alloc" in msg.lower()
        out = {"ok": False, "error": ("out of memory: " if oom else "") + msg[:120]}
    print("RESULT " + json.dumps(out))


def interleaved(methods, kind, model, x) -> dict:
    """Median wall time per method, the methods taking turns (fair under a fluctuating
    machine load) after one warm-up call each: 5 calls, 3 if the warm-up took over 2 s,
    1 if over 20 s."""
    first = {}
    for m in methods:
        t0 = time.perf_counter()
        run_method(m, kind, model, x)
        first[m] = time.perf_counter() - t0
    times: dict = {m: [] for m in methods}
    wanted = {m: (5 if first[m] < 2 else REPEATS if first[m] < 20 else 1) for m in methods}
    for r in range(max(wanted.values())):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for m in order:
            if len(times[m]) >= wanted[m]:
                continue
            t0 = time.perf_counter()
            run_method(m, kind, model, x)
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}


def spawn(*argv: str, timeout: float = CHILD_TIMEOUT) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"> {timeout:.0f} s (stopped)"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "error": f"exit {proc.returncode}: {tail[:120]}"}


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------


def machine() -> str:
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


def have_nngeometry() -> bool:
    import importlib.util

    return importlib.util.find_spec("nngeometry") is not None


def table(cases) -> None:
    methods = [m for m in METHODS if m != "nngeometry" or have_nngeometry()]
    print(f"# eNTK benchmark: {machine()}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f}")
    print(f"# methods: {', '.join(methods)}" + ("" if have_nngeometry() else " (nngeometry not installed)"))
    header = f"{'case':<12} {'kind':<6} {'method':<11} {'err':>8} {'time s':>9} {'peak MiB':>9}  note"
    previous: dict = {}  # (case, method) -> (n, fastest seconds over kinds): predicts N^2 growth
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in cases:
            ref = os.path.join(tmp, f"{name}{n}.pt")
            r = spawn("reference", name, str(n), "full", ref)
            if not r.get("ok"):
                print(f"{name} N={n}: reference failed: {r.get('error')}")
                continue
            for kind in KINDS:
                rows = {}
                for method in methods:
                    last = previous.get((name, method))
                    if last is not None and last[1] * (n / last[0]) ** 2 > CHILD_TIMEOUT / 2:
                        guess = last[1] * (n / last[0]) ** 2
                        rows[method] = {"ok": False, "error": f"not run: ~{guess:.0f} s predicted from N={last[0]} (N^2 growth)"}
                        continue
                    rows[method] = spawn(method, name, str(n), kind, ref)
                ran = [m for m in methods if rows[m].get("ok")]
                budget = sum(6 * max(rows[m]["first"], 1.0) for m in ran) + 120  # warm-up + timed calls
                timed = spawn("time:" + ",".join(ran), name, str(n), kind, ref, timeout=budget) if ran else {"ok": False}
                print(header)
                for method in methods:
                    res = rows[method]
                    label = f"{name} N={n}"
                    if res.get("ok") and timed.get("ok"):
                        t = timed["times"][method]
                        prev = previous.get((name, method))
                        if prev is None or prev[0] != n or t < prev[1]:
                            previous[(name, method)] = (n, t)
                        note = f"auto -> {res['extra']}" if method == "ours" and res.get("extra") else ""
                        print(
                            f"{label:<12} {kind:<6} {method:<11} {res['err']:8.1e} {t:9.4f} "
                            f"{res['peak'] / 2**20:9.1f}  {note}",
                            flush=True,
                        )
                    else:
                        why = res.get("error") if not res.get("ok") else timed.get("error", "timing failed")
                        print(f"{label:<12} {kind:<6} {method:<11} {'-':>8} {'-':>9} {'-':>9}  {why}", flush=True)
                if timed.get("ok") and "ours" in timed["times"] and len(timed["times"]) > 1:
                    anchors = {m: t for m, t in timed["times"].items() if m != "ours"}
                    best = min(anchors, key=anchors.get)
                    print(
                        f"{'':<12} {kind:<6} ours/best = {timed['times']['ours'] / anchors[best]:.3f}  "
                        f"(best anchor: {best}, {anchors[best]:.4f} s)\n",
                        flush=True,
                    )
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")


def memory_section() -> None:
    print("# N = 2000, kind='full', max_memory='2GB', MLP 32-256-256-10 (float32)")
    for n in (2000, 2400):
        r = spawn("bounded", "small-mlp", str(n), "full", "")
        print(f"N={n}: {r.get('text') or r.get('error')}", flush=True)


def bounded_child(args) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    torch.set_num_threads(THREADS)
    from lightning_ntk.ntk import NTKMemoryError, empirical_ntk, estimate_ntk_memory

    model, x = make_case(args.case, args.n)
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
    except NTKMemoryError as err:
        text = f"refused after {time.perf_counter() - t0:.2f} s: NTKMemoryError: {err}"
    print("RESULT " + json.dumps({"ok": True, "text": text}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MLP N=64 and CNN N=32 only")
    parser.add_argument("--no-memory", action="store_true", help="skip the N=2000 max_memory section")
    parser.add_argument("--child", nargs=5, metavar=("METHOD", "CASE", "N", "KIND", "REF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, case, n, kind, ref = args.child
        ns = argparse.Namespace(method=method, case=case, n=int(n), kind=kind, ref=ref)
        (bounded_child if method == "bounded" else child)(ns)
        return
    cases = [("mlp", 64), ("cnn", 32)] if args.quick else CASES
    table(cases)
    if not args.no_memory:
        memory_section()


if __name__ == "__main__":
    main()
