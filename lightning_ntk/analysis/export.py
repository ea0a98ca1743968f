"""Export a run file to CSV, Parquet or netCDF, for people who live in pandas or xarray.

* ``csv`` / ``parquet``: one file per table, ``<run>.<group>.csv`` (``/`` in group names
  becomes ``.``). Columns: the row axis first (``step`` for time series; the example's
  dataset index for per-example tables), then every field with one value per row, in the
  table's order. A field with one short per-row axis (at most ``max_width`` values, e.g.
  ``eigvals`` (T, k)) becomes one column per value, ``eigvals[0]``, ``eigvals[1]``, …;
  a wider one is written in long form to its own file, ``<run>.<group>.<field>.csv`` (the
  row key, the position along the field's axis, the value). Arrays of more than one axis
  per row (kernels, logits, eigenvectors) are left to netCDF, and named in an
  :class:`ExportWarning` (the command line prints it): nothing is dropped silently. Probe
  sets are exported the same way (``<run>.probe.<name>.csv``).
* ``netcdf``: one file per group, ``<run>.<group>.nc``, written by xarray with the
  h5netcdf engine: every field with its named axes and coordinates, complete rows only.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..store import Run, open_run

FORMATS = ("csv", "parquet", "netcdf")


class ExportError(RuntimeError):
    """An export cannot be written as asked (missing optional package, bad argument)."""


class ExportWarning(UserWarning):
    """Fields a tabular export leaves out (arrays of several axes per row): use netCDF for them."""


def _frame(run: Run, group: str, max_width: int) -> Tuple[Any, Dict[str, Any], List[str]]:
    """A pandas DataFrame of the per-row scalars and short vectors of ``group`` (None if
    none), the long-form frames of its wider vectors (by field), and the fields left out."""
    import pandas as pd

    view = run[group]
    n = len(view)
    columns: Dict[str, Any] = {}
    if view.is_table or view.is_fixed:
        row_dim = view.row_dim or view.attrs.get("row_dim")
        if row_dim and row_dim != view.key and row_dim in view.group:
            scale = view.group[row_dim]
            name = scale.attrs.get("NAME", b"")
            name = name.decode() if isinstance(name, bytes) else str(name)
            if not name.startswith("This is a netCDF dimension"):  # a real coordinate (e.g. dataset index)
                columns[row_dim] = scale[:n]
        names = ([view.key] if view.key else []) + [f for f in view.fields if f != view.key]
    else:  # a static group: probe index, y, ...
        names = view.fields
    long: Dict[str, Any] = {}
    omitted: List[str] = []
    key = view.key if (view.is_table or view.is_fixed) and view.key in names else None
    for name in names:
        ds = view.group[name]
        if ds.ndim == 0:
            continue
        values = view[name]
        if values.shape[0] != n:
            continue
        if values.ndim == 1:
            columns[name] = values
        elif values.ndim == 2 and values.shape[1] <= max_width:
            for i in range(values.shape[1]):
                columns[f"{name}[{i}]"] = values[:, i]
        elif values.ndim == 2:
            rows, width = values.shape
            row_key = view[key] if key is not None and name != key else range(rows)
            long[name] = pd.DataFrame({key or "row": [k for k in row_key for _ in range(width)],
                                       "position": list(range(width)) * rows, name: values.reshape(-1)})
        else:
            omitted.append(f"/{group}/{name} {tuple(values.shape)}")
    return (pd.DataFrame(columns) if columns else None), long, omitted


def _file_name(run: Run, group: str, suffix: str) -> str:
    stem = os.path.splitext(os.path.basename(run.path))[0]
    return f"{stem}.{group.replace('/', '.')}.{suffix}"


def _require_parquet() -> None:
    try:
        import pyarrow  # noqa: F401  (only checks that it is installed)
    except ImportError as exc:
        raise ExportError(
            "exporting to parquet needs the pyarrow package, which is not installed: run "
            "`pip install pyarrow` (or export with --to csv / --to netcdf)"
        ) from exc


def _groups(run: Run, groups: Optional[Sequence[str]]) -> List[str]:
    every = list(run.tables) + [f"probe/{p}" for p in run.probes]
    if groups is None:
        return every
    wanted = [g.strip("/") for g in groups]
    unknown = [g for g in wanted if g not in every]
    if unknown:
        raise ExportError(f"groups {unknown} are not in {run.path}; it holds {every}")
    return wanted


def export_run(run: "Run | os.PathLike[str] | str", to: str, out_dir: "os.PathLike[str] | str | None" = None, *,
               groups: Optional[Sequence[str]] = None, max_width: int = 16) -> List[str]:
    """Export the tables of ``run`` to ``out_dir`` as ``to`` = ``"csv"``, ``"parquet"`` or ``"netcdf"``.

    ``out_dir`` defaults to ``<run>_export`` beside the run file. ``groups`` limits the export
    (e.g. ``["sharpness", "forgetting/examples"]``); default: every table and probe set.
    Tables without any complete row are skipped. Returns the paths written.
    """
    if to not in FORMATS:
        raise ExportError(f"to must be one of {FORMATS}, got {to!r}")
    if max_width < 0:
        raise ExportError(f"max_width must be >= 0, got {max_width!r}")
    if to == "parquet":
        _require_parquet()
    owned = not isinstance(run, Run)
    opened = open_run(run) if owned else run
    try:
        if out_dir is None:
            out_dir = os.path.splitext(os.path.abspath(opened.path))[0] + "_export"
        out_dir = os.fspath(out_dir)
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ExportError(f"out_dir {out_dir} exists and is not a folder")
        os.makedirs(out_dir, exist_ok=True)
        written: List[str] = []
        omitted: List[str] = []
        for group in _groups(opened, groups):
            view = opened[group]
            if (view.is_table or view.is_fixed) and len(view) == 0:
                continue
            if to == "netcdf":
                path = os.path.join(out_dir, _file_name(opened, group, "nc"))
                opened.to_xarray(group).to_netcdf(path, engine="h5netcdf")
                written.append(path)
                continue
            frame, long, left_out = _frame(opened, group, max_width)
            omitted += left_out
            parts = ([(group, frame)] if frame is not None else []) + [(f"{group}/{f}", v) for f, v in long.items()]
            for name, table in parts:
                path = os.path.join(out_dir, _file_name(opened, name, to if to == "csv" else "parquet"))
                if to == "csv":
                    table.to_csv(path, index=False)
                else:
                    table.to_parquet(path, index=False, engine="pyarrow")
                written.append(path)
        if omitted:
            warnings.warn(f"{to} export of {opened.path} leaves out {len(omitted)} field(s) with several axes per row "
                          f"(use --to netcdf for them): {', '.join(omitted)}", ExportWarning, stacklevel=2)
        return written
    finally:
        if owned:
            opened.close()
