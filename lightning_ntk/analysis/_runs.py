"""Shared helpers of the plots: runs given as paths or :class:`Run` objects, tolerant
field lookups, labels, and the x axis.

Every plot takes ``run``: a :class:`~lightning_ntk.store.Run`, a path, or a list of them
(several runs overlay, each labelled). Paths are opened for the duration of the call.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._args import one_of
from ..store import Run, TableView, open_run

RunLike = Union[Run, "os.PathLike[str]", str]
RunsLike = Union[RunLike, Sequence[RunLike]]

#: Accepted values of the ``x=`` argument of the time-series plots.
X_AXES = ("step", "epoch", "wall_time")


def _as_list(runs: RunsLike) -> List[RunLike]:
    if isinstance(runs, (Run, str, os.PathLike)):
        return [runs]
    if isinstance(runs, (list, tuple)):
        if not runs:
            raise ValueError("run: got an empty list; pass a Run, a run-file path, or a non-empty list of them")
        return list(runs)
    raise TypeError(f"run must be a lightning_ntk Run, a run-file path, or a list of them; got {type(runs).__name__}")


@contextlib.contextmanager
def opened(runs: RunsLike) -> Iterator[List[Run]]:
    """Context manager: the runs as open :class:`Run` objects (paths opened and closed here)."""
    items = _as_list(runs)
    owned: List[Run] = []
    result: List[Run] = []
    try:
        for item in items:
            if isinstance(item, Run):
                result.append(item)
            else:
                run = open_run(item)
                owned.append(run)
                result.append(run)
        yield result
    finally:
        for run in owned:
            run.close()


def run_labels(runs: Sequence[Run], labels: Optional[Sequence[str]] = None) -> List[str]:
    """One label per run: ``labels`` if given, else the file names (made unique by their folders)."""
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(runs):
            raise ValueError(f"labels: got {len(labels)} labels for {len(runs)} runs; give one label per run")
        return [str(label) for label in labels]
    stems = [os.path.splitext(os.path.basename(run.path))[0] for run in runs]
    if len(set(stems)) == len(stems):
        return stems
    paths = [os.path.abspath(run.path) for run in runs]
    try:
        common = os.path.commonpath(paths)
    except ValueError:  # pragma: no cover - different drives
        return paths
    return [os.path.relpath(p, common) if os.path.relpath(p, common) != "." else p for p in paths]


def table(run: Run, group: str) -> Optional[TableView]:
    """The table ``group`` of ``run`` if it exists and holds at least one complete row, else None."""
    if group not in run:
        return None
    view = run[group]
    if not (view.is_table or view.is_fixed):
        return None
    try:
        return view if len(view) > 0 else None
    except (KeyError, OSError):  # a table caught mid-declaration or damaged
        return None


def find_field(view: Optional[TableView], candidates: Sequence[str], ndim: Optional[int] = None) -> Optional[str]:
    """The first of ``candidates`` that ``view`` holds (with ``ndim`` axes including the row axis)."""
    if view is None:
        return None
    for name in candidates:
        if name in view:
            if ndim is None or view.group[name].ndim == ndim:
                return name
    return None


def fields_matching(view: Optional[TableView], prefixes: Sequence[str] = (), suffixes: Sequence[str] = (),
                    ndim: int = 1, contains: Sequence[str] = ()) -> List[str]:
    """Fields of ``view`` whose name starts with one of ``prefixes``, ends with one of
    ``suffixes`` or contains one of ``contains`` (the key, ``epoch`` and ``wall_time`` excluded)."""
    if view is None:
        return []
    out = []
    for name in view.fields:
        if name == view.key or name in ("epoch", "wall_time"):
            continue
        if (any(name.startswith(p) for p in prefixes) or any(name.endswith(s) for s in suffixes)
                or any(c in name for c in contains)):
            if view.group[name].ndim == ndim:
                out.append(name)
    return out


def x_values(view: TableView, x: str) -> Tuple[np.ndarray, str]:
    """The x coordinate of a time-series table: its ``step`` (default), ``epoch`` or ``wall_time``.

    ``wall_time`` is shown as seconds since the table's first row.
    """
    one_of(x, "x", X_AXES)
    if x == "step":
        return np.asarray(view[view.key or "step"]), "step"
    if x not in view:
        raise KeyError(f"table {view.name!r} has no {x!r} field to use as x axis; use x='step'")
    values = np.asarray(view[x], dtype=np.float64)
    if x == "wall_time":
        return values - values[0], "wall time (s)"
    return values, "epoch"


def single(runs: List[Run], what: str) -> Run:
    """The one run of ``runs``; a clear error for several (figures that cannot overlay)."""
    if len(runs) != 1:
        raise ValueError(f"{what} draws one run at a time (got {len(runs)}); call it once per run")
    return runs[0]


def new_axes(ax: Any = None, figsize: Tuple[float, float] = (6.4, 4.0)) -> Any:
    """``ax`` itself, or the Axes of a new pyplot figure."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def colors(n: int, cmap: str = "viridis") -> List[Any]:
    """``n`` colours spread over ``cmap`` (the default colour cycle for up to 10)."""
    import matplotlib

    if n <= 10 and cmap == "tab10":
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    cm = matplotlib.colormaps[cmap]
    return [cm(v) for v in (np.linspace(0.0, 0.9, n) if n > 1 else [0.0])]


def run_colors(n: int) -> List[Any]:
    """One colour per run (tab10)."""
    import matplotlib

    tab = matplotlib.colormaps["tab10"]
    return [tab(i % 10) for i in range(n)]
