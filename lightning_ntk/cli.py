"""``lightning-ntk``: the command line.

    lightning-ntk demo [--out runs/demo.h5] [--epochs N]   train the digits demo
    lightning-ntk info RUN.h5                               what a run file holds
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, epochs=args.epochs, seed=args.seed, quiet=args.quiet)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .store import RunFormatError, open_run

    status = 0
    for path in args.runs:
        try:
            with open_run(path) as run:
                print(run.summary())
        except (FileNotFoundError, RunFormatError, OSError) as exc:
            print(f"lightning-ntk info: {exc}", file=sys.stderr)
            status = 2
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-ntk", description="Training-dynamics run files: demo and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on scikit-learn digits with every monitor")
    demo.add_argument("--out", default="runs/demo.h5", help="run file to write (replaced if present)")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    demo.set_defaults(func=_cmd_demo)
    info = sub.add_parser("info", help="print what a run file holds")
    info.add_argument("runs", nargs="+", help="run file(s)")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
