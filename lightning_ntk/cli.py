"""``lightning-ntk``: the command line.

    lightning-ntk demo [--out runs/demo.h5] [--epochs N]   train the digits demo (a small CNN)
    lightning-ntk demo --model lm [--out runs/demo_lm.h5]  train a character-level transformer LM
    lightning-ntk info RUN.h5                               what a run file holds
    lightning-ntk check RUN.h5                              verify a run file (exit 1 on errors)
    lightning-ntk report RUN.h5 [RUN2.h5 ...] [-o DIR]      HTML report with every figure the files feed
    lightning-ntk watch RUN.h5 [--interval S] [--timeout S] follow a training live, print new rows
    lightning-ntk export RUN.h5 --to csv|parquet|netcdf [-o DIR]   tables for pandas / xarray
    lightning-ntk spawn RUN.h5 (--steps N | --until N) [--children K] [--factory MOD:FN]   children of saved
                                                            parent states: barriers, kernel distances -> /landscape
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.model == "lm":
        from . import demo_lm

        run, epochs, out, report_name = demo_lm.run_lm_demo, demo_lm.LM_DEMO_EPOCHS, "runs/demo_lm.h5", "demo_lm_report"
    else:
        from . import demo

        run, epochs, out, report_name = demo.run_demo, demo.DEMO_EPOCHS, "runs/demo.h5", "demo_report"
    out = args.out or out
    report = None if args.no_report else (args.report or os.path.join(os.path.dirname(out) or ".", report_name))
    run(out, epochs=epochs if args.epochs is None else args.epochs, seed=args.seed, quiet=args.quiet, report=report)
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


def _cmd_report(args: argparse.Namespace) -> int:
    from .analysis import write_report
    from .store import RunFormatError

    out = args.out or os.path.splitext(os.path.abspath(args.runs[0]))[0] + "_report"
    try:
        path = write_report(args.runs, out, progress=not args.quiet, embed=not args.no_embed)
    except (FileNotFoundError, RunFormatError, NotADirectoryError, OSError) as exc:
        print(f"lightning-ntk report: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from .analysis import watch

    return watch(args.run, interval=args.interval, timeout=args.timeout, max_rows=args.max_rows)


def _cmd_export(args: argparse.Namespace) -> int:
    from .analysis import ExportError, export_run
    from .store import RunFormatError

    status = 0
    for run in args.runs:
        try:
            paths = export_run(run, args.to, args.out, groups=args.group, max_width=args.max_width)
        except (ExportError, FileNotFoundError, RunFormatError, OSError) as exc:
            print(f"lightning-ntk export: {exc}", file=sys.stderr)
            status = 2
            continue
        for path in paths:
            print(path)
    return status


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _cmd_check(args: argparse.Namespace) -> int:
    from .store import check_run

    status = 0
    for path in args.runs:
        report = check_run(path)
        print(report)
        if not report.ok:
            status = 1
    return status


def _load_factory(spec: str):
    """``package.module:function`` or ``path/to/file.py:function``."""
    import importlib
    import importlib.util

    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"--factory must be MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    if target.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(target))[0], target)
        if loaded is None or loaded.loader is None:
            raise ValueError(f"--factory: cannot load {target}")
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, name)


#: What a --factory function may return (a dict), passed to spawn_children.
_FACTORY_KEYS = ("module", "datamodule", "train_dataloaders", "val_dataloaders", "trainer_kwargs", "eval_data",
                 "forward_fn", "loss_fn", "error_fn", "task")


def _cmd_spawn(args: argparse.Namespace) -> int:
    from .callbacks.children import SpawnError, setup_from_parent, spawn_children
    from .parent_states import read_parent_states
    from .store import StoreError

    steps = None if args.at is None else [int(s) for s in args.at.split(",") if s.strip()]
    try:
        if args.factory:
            setup = _load_factory(args.factory)()
            if not isinstance(setup, dict) or "module" not in setup or set(setup) - set(_FACTORY_KEYS):
                raise ValueError(f"--factory {args.factory} must return a dict with 'module' and any of "
                                 f"{', '.join(_FACTORY_KEYS[1:])}")
        else:
            setup = setup_from_parent(read_parent_states(args.run, steps)[0])
        result = spawn_children(args.run, children=args.children, steps=args.steps, until=args.until,
                                spawn_steps=steps, seed=args.seed, probe=args.probe, points=args.points,
                                kernel=args.kernel, linearized=args.linearized, replace=args.replace,
                                progress=not args.quiet, **setup)
    except (SpawnError, StoreError, ValueError, TypeError, FileNotFoundError, OSError, ImportError) as exc:
        print(f"lightning-ntk spawn: {exc}", file=sys.stderr)
        return 2
    print(f"{'step':>8} {'epoch':>8} {'error barrier':>14} {'loss barrier':>13} {'kernel dist':>12} "
          f"{'disagree':>9}" + (f" {'linear err':>11} {'real err':>9}" if args.linearized else ""))
    for spawn in result.spawns:
        c = spawn.comparison
        line = (f"{spawn.step:>8} {spawn.epoch:>8.2f} {c.error_barrier.mean():>14.4f} {c.loss_barrier.mean():>13.4f} "
                f"{c.kernel_distance.mean():>12.4f} {c.disagreement.mean():>9.4f}")
        if spawn.linearized is not None:
            line += f" {spawn.linearized.linear_error:>11.4f} {spawn.linearized.real_error:>9.4f}"
        print(line)
    print(f"(means over pairs of {args.children} children; errors on the {result.eval_set} set; rows in {args.run} "
          "under /landscape)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-ntk", description="Training-dynamics run files: demo and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a demo model with every monitor: a small CNN on scikit-learn digits, "
                                       "or (--model lm) a character-level transformer on Python's own documentation")
    demo.add_argument("--model", choices=["digits", "lm"], default="digits",
                      help="digits: small CNN on scikit-learn digits (default); lm: causal transformer language model "
                           "on the text of pydoc_data.topics")
    demo.add_argument("--out", default=None,
                      help="run file to write, replaced if present (default: runs/demo.h5, runs/demo_lm.h5 for lm)")
    demo.add_argument("--epochs", type=int, default=None,
                      help="epochs (default: lightning_ntk.demo.DEMO_EPOCHS, lightning_ntk.demo_lm.LM_DEMO_EPOCHS for lm)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    demo.add_argument("--report", default=None, help="directory of the HTML report (default: <out dir>/demo_report, "
                                                           "<out dir>/demo_lm_report for lm)")
    demo.add_argument("--no-report", action="store_true", help="skip the HTML report")
    demo.set_defaults(func=_cmd_demo)
    info = sub.add_parser("info", help="print what a run file holds")
    info.add_argument("runs", nargs="+", help="run file(s)")
    info.set_defaults(func=_cmd_info)
    check = sub.add_parser("check", help="verify run file(s): format, complete rows, monotone steps, scales")
    check.add_argument("runs", nargs="+", help="run file(s)")
    check.set_defaults(func=_cmd_check)
    report = sub.add_parser("report", help="write an HTML report with every figure the run files feed")
    report.add_argument("runs", nargs="+", help="run file(s); several overlay in each figure")
    report.add_argument("-o", "--out", default=None, help="output folder (default: <first run>_report beside it)")
    report.add_argument("--no-embed", action="store_true", help="write PNG files beside the page instead of inline")
    report.add_argument("--quiet", action="store_true", help="no progress on stderr")
    report.set_defaults(func=_cmd_report)
    watch = sub.add_parser("watch", help="follow a training live: print each table's new rows as they arrive")
    watch.add_argument("run", help="run file being written")
    watch.add_argument("--interval", type=_positive, default=1.0, help="seconds between polls (default 1)")
    watch.add_argument("--timeout", type=_positive, default=None,
                       help="stop after this many seconds without a new row (default: until the writer closes the file)")
    watch.add_argument("--max-rows", type=int, default=10, help="most rows printed per table and poll (default 10)")
    watch.set_defaults(func=_cmd_watch)
    export = sub.add_parser("export", help="write the tables as CSV, Parquet or netCDF files")
    export.add_argument("runs", nargs="+", help="run file(s)")
    export.add_argument("--to", required=True, choices=["csv", "parquet", "netcdf"], help="file format")
    export.add_argument("-o", "--out", default=None, help="output folder (default: <run>_export beside the run)")
    export.add_argument("--group", action="append", default=None,
                        help="export only this group (repeatable), e.g. --group sharpness --group forgetting/examples")
    export.add_argument("--max-width", type=int, default=16,
                        help="vector fields with at most this many values per row become one column each (csv/parquet)")
    export.set_defaults(func=_cmd_export)
    spawn = sub.add_parser("spawn", help="train children from the parent states saved by ParentStateMonitor and "
                                          "write their barriers and kernel distances into the run file (/landscape)")
    spawn.add_argument("run", help="the parent's run file (states in <run>.parents)")
    budget = spawn.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, default=None, help="steps each child trains past its spawn step")
    budget.add_argument("--until", type=int, default=None, help="the step every child trains to (e.g. the parent's last)")
    spawn.add_argument("--children", type=int, default=2, help="children per parent state (default 2)")
    spawn.add_argument("--at", default=None, help="spawn steps, comma-separated (default: every saved state)")
    spawn.add_argument("--factory", default=None,
                       help="MODULE:FUNCTION or FILE.py:FUNCTION returning a dict with 'module' (the LightningModule) "
                            "and the data ('datamodule' or 'train_dataloaders', ...), 'trainer_kwargs'. Default: the "
                            "classes and Trainer settings the parent state recorded")
    spawn.add_argument("--seed", type=int, default=0, help="seed of the children's seeds (default 0)")
    spawn.add_argument("--probe", type=int, default=128, help="probe examples for disagreement and eNTKs (default 128)")
    spawn.add_argument("--points", type=int, default=11, help="points on each linear path (default 11)")
    spawn.add_argument("--kernel", default="trace", help="eNTK kind (default trace)")
    spawn.add_argument("--linearized", action="store_true",
                       help="also train the linearised network from each state and record it next to child 0")
    spawn.add_argument("--replace", action="store_true", help="drop earlier /landscape rows measured with other settings")
    spawn.add_argument("--quiet", action="store_true", help="no progress lines")
    spawn.set_defaults(func=_cmd_spawn)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
