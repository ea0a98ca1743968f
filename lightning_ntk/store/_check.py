"""``lightning-ntk check RUN.h5``: verify a run file against format v1.

Checks: the file is a run file of a known format version; every table's datasets agree
with its declared fields; every axis of every dataset has a dimension scale; in every
append table the keys of complete rows form a leading run (no complete row after an
incomplete one), time-series steps strictly increase and event steps never decrease;
fixed tables were completely written. Problems are reported, never repaired.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, List

import h5py
import numpy as np

from ._reader import Run, RunFormatError, _dim_name, _is_scale, _text


@dataclass
class CheckReport:
    """What :func:`check_run` found: ``ok`` when there is no error (warnings allowed)."""

    path: str
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        lines = [f"{'OK' if self.ok else 'FAILED'}: {self.path}"]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def check_run(path: "os.PathLike[str] | str") -> CheckReport:
    """Verify the run file at ``path`` (see the module docstring)."""
    report = CheckReport(os.fspath(path))
    try:
        run = Run(path)
    except (FileNotFoundError, RunFormatError, OSError) as exc:
        report.errors.append(str(exc))
        return report
    with run:
        report.notes.append(f"format {_text(run.file.attrs.get('format'))} v{run.format_version}")
        for attr in ("config", "versions", "model", "history"):
            raw = run.file.attrs.get(attr)
            if raw is None:
                report.errors.append(f"root attribute {attr!r} is missing")
                continue
            try:
                json.loads(_text(raw))
            except ValueError:
                report.errors.append(f"root attribute {attr!r} is not valid JSON")
        _check_scales(run.file, report)
        for name in run.table_names():
            _check_table(run, name, report)
        for error in run.errors():
            report.warnings.append(f"monitor {error['monitor']} failed at step {error['step']}: {error['message']}")
    return report


def _check_scales(file: h5py.File, report: CheckReport) -> None:
    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset) or _is_scale(obj):
            return
        for axis in range(obj.ndim):
            if len(obj.dims[axis]) == 0:
                report.errors.append(f"/{name}: axis {axis} has no dimension scale")

    file.visititems(visit)


def _check_table(run: Run, name: str, report: CheckReport) -> None:
    view = run[name]
    grp = view.group
    try:
        declared = json.loads(_text(grp.attrs["fields"]))
    except (KeyError, ValueError):
        report.errors.append(f"/{name}: missing or invalid 'fields' attribute")
        return
    for spec in declared:
        if spec["name"] not in grp:
            report.errors.append(f"/{name}: declared field {spec['name']!r} is missing")
            continue
        ds = grp[spec["name"]]
        if tuple(ds.shape[1:]) != tuple(spec["shape"]):
            report.errors.append(f"/{name}/{spec['name']}: row shape {ds.shape[1:]} differs from the declared "
                                 f"{tuple(spec['shape'])}")
        if np.dtype(ds.dtype).str != spec["dtype"]:
            report.errors.append(f"/{name}/{spec['name']}: dtype {ds.dtype} differs from the declared {spec['dtype']}")
    if view.is_fixed:
        if view.written_step is None:
            report.warnings.append(f"/{name}: per-example table never completely written (or a crash interrupted "
                                   "its rewrite); recompute it from the event log")
        else:
            report.notes.append(f"/{name}: {len(view)} rows as of step {view.written_step}")
        return
    key = view.key
    keys = grp[key][()]
    lengths = {spec["name"]: grp[spec["name"]].shape[0] for spec in declared if spec["name"] in grp}
    if len(set(lengths.values())) > 1:
        report.warnings.append(f"/{name}: datasets have different lengths {lengths} (an interrupted append); "
                               f"rows beyond the complete ones are ignored")
    incomplete = np.flatnonzero(keys < 0)
    n_complete = int(incomplete[0]) if incomplete.size else int(keys.shape[0])
    if incomplete.size and np.any(keys[incomplete[0]:] >= 0):
        report.errors.append(f"/{name}: a complete row follows an incomplete one (row {int(incomplete[0])}); "
                             "rows after it would be lost by readers")
    if incomplete.size:
        report.warnings.append(f"/{name}: {keys.shape[0] - n_complete} incomplete trailing row(s) (a crash "
                               "mid-write); readers ignore them")
    complete_keys = keys[:n_complete]
    if n_complete > 1:
        steps = np.diff(complete_keys)
        if view.row_dim == key and np.any(steps <= 0):
            bad = int(np.flatnonzero(steps <= 0)[0])
            report.errors.append(f"/{name}: {key} not strictly increasing at row {bad + 1} "
                                 f"({int(complete_keys[bad])} then {int(complete_keys[bad + 1])})")
        elif view.row_dim != key and np.any(steps < 0):
            bad = int(np.flatnonzero(steps < 0)[0])
            report.errors.append(f"/{name}: {key} decreases at row {bad + 1}")
    short = {f: n for f, n in lengths.items() if n < n_complete}
    if short:
        report.errors.append(f"/{name}: datasets {sorted(short)} are shorter than the {n_complete} complete rows")
    detail = f"{key} {int(complete_keys[0])}..{int(complete_keys[-1])}" if n_complete else "empty"
    report.notes.append(f"/{name}: {n_complete} complete rows ({detail})")
    for spec in declared:
        ds = grp.get(spec["name"])
        if ds is not None and ds.dtype.kind == "f" and n_complete:
            values = ds[:n_complete]
            if not np.all(np.isfinite(values)):
                report.notes.append(f"/{name}/{spec['name']}: holds NaN/Inf values")
    for axis_name in {_dim_name(grp[spec['name']], 0) for spec in declared if spec["name"] in grp}:
        if axis_name != view.row_dim:
            report.errors.append(f"/{name}: first axis named {axis_name!r}, expected the row axis {view.row_dim!r}")
