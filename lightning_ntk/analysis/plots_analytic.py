"""Figures of finite against infinite width: the eNTK snapshots of ``/ntk`` next to the
analytic NTK of the architecture stored in ``/analytic/<probe>`` by
:func:`lightning_ntk.record_analytic_kernels` (Lee et al. 2020).

* kernel distance S(K_t, Θ) (Fort et al. 2020) from each stored kernel snapshot to the
  analytic NTK, next to the distance to the initial kernel;
* scale tr(K_t) / tr(Θ): 1 at initialisation in the infinite-width limit.

Both read the kernels of the trace-like kinds (``trace``, ``pseudo``, ``sketch``: the mean
over logits, whose limit is Θ); a full or per-logit kernel is not drawn.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..spectral import kernel_distance
from ._runs import RunsLike, new_axes, opened, run_colors, run_labels, table, x_values
from .series import available

GROUP = "ntk"
ANALYTIC = "analytic"
_TRACE_KINDS = ("trace", "pseudo", "sketch")


def analytic_ntk(run: Any, group: str = GROUP) -> Optional[np.ndarray]:
    """The analytic NTK (N, N) recorded for the probe of table ``group``, or None (no such
    table, no recorded kernels for its probe, or a kernel kind that is not the mean over logits)."""
    view = table(run, group)
    if view is None:
        return None
    attrs = view.attrs
    probe = attrs.get("probe", "")
    if attrs.get("kind", "trace") not in _TRACE_KINDS or not probe:
        return None
    name = f"{ANALYTIC}/{probe}"
    if name not in run or "ntk" not in run[name]:
        return None
    return np.asarray(run[name]["ntk"], dtype=np.float64)


def _with_analytic(runs: Sequence[Any], labels: Optional[Sequence[str]], group: str, field: str):
    """(label, colour, analytic NTK, table view) of each run whose table ``group`` has
    ``field`` and whose probe has recorded analytic kernels."""
    for one, tag, color in zip(runs, run_labels(runs, labels), run_colors(len(runs))):
        theta = analytic_ntk(one, group)
        view = table(one, group)
        if theta is not None and field in view:
            yield tag, color, theta, view


def _has(field: str):
    def predicate(run: Any, group: str) -> bool:
        with opened(run) as runs:
            return any(analytic_ntk(r, group) is not None and field in table(r, group) for r in runs)
    return predicate


@available(_has("kernel"), GROUP)
def plot_distance_to_analytic(run: RunsLike, ax: Any = None, *, group: str = GROUP, x: str = "step",
                              labels: Optional[Sequence[str]] = None) -> Any:
    """S(K_t, Θ) = 1 − ⟨K_t, Θ⟩_F / (‖K_t‖_F ‖Θ‖_F) from each stored eNTK snapshot to the
    analytic NTK (solid), and S(K_t, K_0) to the first snapshot (dashed), per run. Line
    ``gid``: ``"<run>:to_analytic"`` and ``"<run>:to_init"``."""
    ax = new_axes(ax)
    drawn = 0
    with opened(run) as runs:
        for tag, color, theta, view in _with_analytic(runs, labels, group, "kernel"):
            kernels = np.asarray(view["kernel"], dtype=np.float64)
            if kernels.shape[1:] != theta.shape:
                raise ValueError(f"/{group} kernels have shape {kernels.shape[1:]} but the analytic NTK of its probe "
                                 f"{theta.shape}")
            xs, xlabel = x_values(view, x)
            to_theta = [kernel_distance(k, theta) for k in kernels]
            to_init = [kernel_distance(k, kernels[0]) for k in kernels]
            (line,) = ax.plot(xs, to_theta, color=color, marker=".", label=f"{tag}: to analytic Θ")
            line.set_gid(f"{tag}:to_analytic")
            (line,) = ax.plot(xs, to_init, color=color, ls="--", label=f"{tag}: to K₀")
            line.set_gid(f"{tag}:to_init")
            ax.set_xlabel(xlabel)
            drawn += 1
    if not drawn:
        raise ValueError(f"no run holds both stored kernels in /{group} and recorded analytic kernels of its probe "
                         "(lightning_ntk.record_analytic_kernels)")
    ax.set_ylabel("kernel distance S")
    ax.set_title("eNTK vs infinite-width NTK")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax


@available(_has("trace"), GROUP)
def plot_scale_to_analytic(run: RunsLike, ax: Any = None, *, group: str = GROUP, x: str = "step",
                           labels: Optional[Sequence[str]] = None) -> Any:
    """tr(K_t) / tr(Θ): the eNTK's size against its infinite-width limit (1 at a wide
    network's initialisation). Line ``gid``: ``"<run>:trace_ratio"``."""
    ax = new_axes(ax)
    drawn = 0
    with opened(run) as runs:
        for tag, color, theta, view in _with_analytic(runs, labels, group, "trace"):
            xs, xlabel = x_values(view, x)
            (line,) = ax.plot(xs, np.asarray(view["trace"], dtype=np.float64) / np.trace(theta), color=color,
                              marker=".", label=tag)
            line.set_gid(f"{tag}:trace_ratio")
            ax.set_xlabel(xlabel)
            drawn += 1
    if not drawn:
        raise ValueError(f"no run holds /{group} traces and recorded analytic kernels of its probe")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("tr K_t / tr Θ")
    ax.set_title("eNTK scale vs infinite width")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax
