"""Figures of ``/representations`` (RepresentationMonitor): few-shot accuracy of a layer's
features (fields ``few_shot_<n>way_<k>shot_<classifier>``, with a 95% confidence
half-width ``<field>_ci95`` drawn as a band) and linear-probe accuracy, over training."""
from __future__ import annotations

from typing import Any

import numpy as np

from ._runs import RunsLike, opened, run_labels, table, x_values
from .series import available, has_fields, plot_series, union_fields

GROUP = "representations"


@available(has_fields(["linear_probe_accuracy"], prefixes=["few_shot_"]), GROUP)
def plot_representation_accuracy(run: RunsLike, ax: Any = None, *, group: str = GROUP, band: bool = True,
                                 **kw: Any) -> Any:
    """Few-shot and linear-probe accuracy over time; ``band``: ±``<field>_ci95`` shaded."""
    fields = union_fields(run, group, prefixes=["few_shot_", "linear_probe_accuracy"], exclude_suffixes=["_ci95"])
    ax = plot_series(run, group, fields, ax, ylabel="accuracy", title="Representation probes", **kw)
    if band:
        with opened(run) as runs:
            lines = {line.get_gid(): line for line in ax.get_lines()}
            for one, tag in zip(runs, run_labels(runs, kw.get("labels"))):
                view = table(one, group)
                if view is None:
                    continue
                xs, _ = x_values(view, kw.get("x", "step"))
                for name in fields:
                    line = lines.get(f"{tag}:{name}")
                    if line is None or f"{name}_ci95" not in view:
                        continue
                    mean = np.asarray(view[name], dtype=np.float64)
                    half = np.asarray(view[f"{name}_ci95"], dtype=np.float64)
                    ax.fill_between(xs, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0,
                                    gid=f"{tag}:{name}_ci95")
    return ax
