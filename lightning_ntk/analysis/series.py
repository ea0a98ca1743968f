"""Time series of a table drawn against ``step`` (or ``epoch``, ``wall_time``): the
building block of most figures, public so users can draw any field of any table.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._runs import RunsLike, new_axes, opened, run_colors, run_labels, table, x_values

FieldSpec = Union[str, Tuple[str, int]]
LINESTYLES = ("-", "--", ":", "-.")


def available(predicate: Callable[[Any, str], bool], group: str) -> Callable[[Callable], Callable]:
    """Mark a plot function: ``fn.group`` is the group it draws by default (a monitor given a
    ``name`` writes ``<group>_<name>`` instead: pass ``group=``), and ``fn.available(run,
    group=None)`` tells whether ``run`` holds what the figure draws (the report shows a figure
    only when one run does)."""

    def wrap(fn: Callable) -> Callable:
        def check(run: Any, group_: Optional[str] = None) -> bool:
            return bool(predicate(run, group_ or group))

        fn.available = check  # type: ignore[attr-defined]
        fn.group = group  # type: ignore[attr-defined]
        return fn

    return wrap


def has_fields(fields: Sequence[str], prefixes: Sequence[str] = (), contains: Sequence[str] = ()
               ) -> Callable[[Any, str], bool]:
    """Predicate ``(run, group)``: a non-empty table ``group`` holding one of ``fields``, or a
    scalar field whose name starts with one of ``prefixes`` or contains one of ``contains``."""

    def predicate(run: Any, group: str) -> bool:
        view = table(run, group)
        if view is None:
            return False
        return any(f in view for f in fields) or bool(series_fields(view, prefixes, contains=contains))

    return predicate


def _column(view: Any, spec: FieldSpec) -> Optional[Tuple[str, np.ndarray]]:
    """(label, values) of a field (scalar per row) or of one column ``(field, i)`` of a vector field."""
    name, index = (spec, None) if isinstance(spec, str) else spec
    if name not in view:
        return None
    values = np.asarray(view[name], dtype=np.float64)
    if index is None:
        if values.ndim != 1:
            return None
        return name, values
    if values.ndim != 2 or not (-values.shape[1] <= index < values.shape[1]):
        return None
    return f"{name}[{index % values.shape[1]}]", values[:, index]


def plot_series(run: RunsLike, group: str, fields: Sequence[FieldSpec], ax: Any = None, *, x: str = "step",
                labels: Optional[Sequence[str]] = None, logy: bool = False, ylabel: Optional[str] = None,
                title: Optional[str] = None, names: Optional[dict] = None, **line_kw: Any) -> Any:
    """Draw scalar fields of table ``group`` over time, one line per field and run.

    ``fields``: names of scalar fields, or ``(name, i)`` for column ``i`` of a vector field.
    Fields a run lacks are skipped; a ValueError if no run holds any. One run: one colour
    per field. Several runs: one colour per run, one line style per field. ``names`` maps a
    field to its legend text. Each line's ``gid`` is ``"<run label>:<field>"``.
    """
    ax = new_axes(ax)
    names = dict(names or {})
    drawn = 0
    with opened(run) as runs:
        tags = run_labels(runs, labels)
        several = len(runs) > 1
        palette = run_colors(max(len(runs), len(fields)))
        for r, (one, tag) in enumerate(zip(runs, tags)):
            view = table(one, group)
            if view is None:
                continue
            xs, xlabel = x_values(view, x)
            for f, spec in enumerate(fields):
                got = _column(view, spec)
                if got is None:
                    continue
                name, values = got
                shown = names.get(name, name)
                kw = dict(color=palette[r] if several else palette[f],
                          linestyle=LINESTYLES[f % len(LINESTYLES)] if several else "-",
                          marker="." if len(values) < 60 else None)
                kw.update(line_kw)
                (line,) = ax.plot(xs, values, label=f"{tag}: {shown}" if several else shown, **kw)
                line.set_gid(f"{tag}:{name}")
                drawn += 1
            ax.set_xlabel(xlabel)
    if not drawn:
        raise ValueError(f"none of the runs holds any of the fields {list(fields)} in a non-empty table /{group}")
    if logy:
        _log_scale(ax)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if drawn > 1 or several:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax


def _log_scale(ax: Any) -> None:
    """Log y axis when the drawn data have positive values (else left linear)."""
    positive = False
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata(), dtype=np.float64)
        if np.any(np.isfinite(y) & (y > 0)):
            positive = True
            break
    if positive:
        ax.set_yscale("log", nonpositive="mask")


def series_fields(view: Any, prefixes: Sequence[str] = (), suffixes: Sequence[str] = (),
                  contains: Sequence[str] = ()) -> List[str]:
    """Scalar fields of ``view`` by name prefix/suffix/substring (``step``, ``epoch``, ``wall_time`` excluded)."""
    from ._runs import fields_matching

    return fields_matching(view, prefixes, suffixes, ndim=1, contains=contains)


def union_fields(run: RunsLike, group: str, prefixes: Sequence[str] = (), suffixes: Sequence[str] = (),
                 contains: Sequence[str] = (), exclude_suffixes: Sequence[str] = ()) -> List[str]:
    """Scalar fields matching by name in the table ``group`` of any of the runs, in file order."""
    names: List[str] = []
    with opened(run) as runs:
        for one in runs:
            for name in series_fields(table(one, group), prefixes, suffixes, contains):
                if name not in names and not any(name.endswith(s) for s in exclude_suffixes):
                    names.append(name)
    return names
