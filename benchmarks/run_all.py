"""Every benchmark table of the package, from one command.

    .venv/bin/python benchmarks/run_all.py            # everything (over an hour on 2 CPU cores: ntk.py alone ~40 min)
    .venv/bin/python benchmarks/run_all.py --quick    # smaller cases (about 12 min)
    .venv/bin/python benchmarks/run_all.py --only store overhead

Runs, one after the other (each in its own process, so one does not warm or load the next):

1. ``ntk.py``: eNTK vs the torch.func tutorial's Jacobian contraction and NTK-vector
   products and nngeometry over a width/N/kind sweep with the FLOP floor, the ResNet-18
   trace kernel and the N = 2000 memory-bound run;
2. ``sharpness.py``: Hessian eigenvalues and trace vs PyHessian and hessian-eigenthings;
3. ``store.py``: run-store throughput vs plain h5py;
4. ``overhead.py``: the demo training with each monitor alone and all together, with and
   without the governor and with ``budget=0.02``, as ratios to the training without monitors.

Anchors that are not installed are reported as such by each script (``pip install
nngeometry pyhessian hessian-eigenthings`` to include them). Every table is printed as
the script prints it; ``benchmarks/README.md`` explains the columns and holds the numbers
of one run.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUITES = {
    "ntk": (["ntk.py"], ["ntk.py", "--quick"]),
    "sharpness": (["sharpness.py"], ["sharpness.py", "--models", "mlp", "--repeats", "3"]),
    "store": (["store.py"], ["store.py"]),
    "overhead": (["overhead.py"], ["overhead.py", "--quick"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smaller case of each benchmark")
    parser.add_argument("--only", nargs="+", choices=sorted(SUITES), help="run only these benchmarks")
    args = parser.parse_args()
    failed = []
    for name, (full, quick) in SUITES.items():
        if args.only and name not in args.only:
            continue
        argv = quick if args.quick else full
        print(f"\n{'=' * 100}\n== {name}: python benchmarks/{' '.join(argv)}\n{'=' * 100}", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / argv[0]), *argv[1:]], cwd=HERE.parent)
        print(f"== {name}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
