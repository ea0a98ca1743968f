"""Figures of ``/landscape`` (spawning, Frankle et al. 2020; Fort et al. 2020; Li et al. 2018).

* error and loss barrier between children against the spawn step (mean over pairs, band:
  their range): high when spawned at initialisation, near 0 once the parent has settled
  into one linearly connected basin;
* kernel distance between the children's eNTKs and from each child to the parent;
  disagreement of the children's predictions on the probe;
* error along the linear path between children, one curve per spawn step;
* accuracy of the linearised network trained from θ(t) next to the real network trained
  alike, and the network at t, against t;
* 1-D loss slices around the parent states (filter-normalised direction).

The spawn step axis is symlog (step 0, initialisation, is a spawn time).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ._runs import RunsLike, colors, new_axes, opened, run_colors, run_labels, single, table
from .series import available, has_fields

PAIRS = "landscape/spawn_pairs"
CHILDREN = "landscape/spawn_children"
LINEARIZED = "landscape/linearized"
SLICES = "landscape/slices"


def _by_step(view: Any, field: str, key: str = "spawn_step") -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) of ``field`` over the rows of each step."""
    steps = np.asarray(view[key])
    values = np.asarray(view[field], dtype=np.float64)
    unique = np.unique(steps)
    rows = [values[steps == s] for s in unique]
    return (unique, np.array([np.nanmean(r) for r in rows]), np.array([np.nanmin(r) for r in rows]),
            np.array([np.nanmax(r) for r in rows]))


def _eval_set(view: Any) -> str:
    settings = view.attrs.get("settings", {})
    return settings.get("eval_set", "") if isinstance(settings, dict) else ""


def _spawn_axis(ax: Any) -> None:
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("spawn step t")


def _per_step_lines(run: RunsLike, ax: Any, group: str, fields: Sequence[Tuple[str, str, str]],
                    labels: Optional[Sequence[str]], what: str) -> List[str]:
    """Mean over pairs (line) and range (band) of each ``(field, legend, linestyle)`` against
    the spawn step, one colour per run; returns the evaluation sets named in the files."""
    ax = new_axes(ax)
    drawn, sets = 0, []
    with opened(run) as runs:
        tags = run_labels(runs, labels)
        palette = run_colors(len(runs))
        several = len(runs) > 1
        for one, tag, color in zip(runs, tags, palette):
            view = table(one, group)
            if view is None:
                continue
            sets.append(_eval_set(view))
            for field, legend, style in fields:
                if field not in view:
                    continue
                steps, mean, low, high = _by_step(view, field)
                text = f"{tag}: {legend}" if several else legend
                (line,) = ax.plot(steps, mean, color=color, linestyle=style, marker="o", ms=3, label=text)
                line.set_gid(f"{tag}:{field}")
                if np.any(high > low):
                    ax.fill_between(steps, low, high, color=color, alpha=0.15, lw=0)
                drawn += 1
    if not drawn:
        raise ValueError(f"none of the runs holds {what} in /{group}")
    _spawn_axis(ax)
    return sets


def _suffix(sets: List[str]) -> str:
    named = sorted({s for s in sets if s})
    return f" ({', '.join(named)} set)" if named else ""


def _barrier(run: RunsLike, ax: Any, group: str, labels: Optional[Sequence[str]], what: str, title: str) -> Any:
    """``<what>_barrier`` between children against the spawn step: mean over pairs, band
    from the smallest to the largest pair, a line at 0."""
    ax = new_axes(ax)
    sets = _per_step_lines(run, ax, group, [(f"{what}_barrier", f"{what} barrier", "-")], labels, f"{what} barriers")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_ylabel(f"{what} barrier" + _suffix(sets))
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


@available(has_fields(("error_barrier",)), PAIRS)
def plot_spawn_barrier(run: RunsLike, ax: Any = None, *, group: str = PAIRS,
                       labels: Optional[Sequence[str]] = None) -> Any:
    """Error barrier between children against the spawn step (Frankle et al. 2020's
    instability): mean over pairs, band from the smallest to the largest pair."""
    return _barrier(run, ax, group, labels, "error", "Barrier between children")


@available(has_fields(("loss_barrier",)), PAIRS)
def plot_spawn_loss_barrier(run: RunsLike, ax: Any = None, *, group: str = PAIRS,
                            labels: Optional[Sequence[str]] = None) -> Any:
    """Loss barrier between children against the spawn step (mean over pairs, band: range)."""
    return _barrier(run, ax, group, labels, "loss", "Loss barrier between children")


@available(has_fields(("kernel_distance",)), PAIRS)
def plot_spawn_kernel_distance(run: RunsLike, ax: Any = None, *, group: str = PAIRS,
                               labels: Optional[Sequence[str]] = None) -> Any:
    """Kernel distance S between the children's eNTKs (solid) and from each child to the
    parent at its spawn step (dashed, from the sibling ``spawn_children`` table)."""
    ax = new_axes(ax)
    _per_step_lines(run, ax, group, [("kernel_distance", "between children", "-")], labels, "kernel distances")
    children = group.replace("spawn_pairs", "spawn_children")
    with opened(run) as runs:
        tags = run_labels(runs, labels)
        for one, tag, color in zip(runs, tags, run_colors(len(runs))):
            view = table(one, children)
            if view is None or "kernel_distance_to_parent" not in view:
                continue
            steps, mean, low, high = _by_step(view, "kernel_distance_to_parent")
            text = f"{tag}: child to parent" if len(runs) > 1 else "child to parent"
            (line,) = ax.plot(steps, mean, color=color, linestyle="--", marker="s", ms=3, label=text)
            line.set_gid(f"{tag}:kernel_distance_to_parent")
    ax.set_ylabel("kernel distance S")
    ax.set_title("Children's eNTKs (Fort et al. 2020)")
    ax.legend(fontsize="small")
    return ax


@available(has_fields(("disagreement",)), PAIRS)
def plot_spawn_disagreement(run: RunsLike, ax: Any = None, *, group: str = PAIRS,
                            labels: Optional[Sequence[str]] = None) -> Any:
    """Fraction of probe examples on which two children predict different classes."""
    ax = new_axes(ax)
    _per_step_lines(run, ax, group, [("disagreement", "disagreement", "-")], labels, "disagreement")
    ax.set_ylabel("prediction disagreement (probe)")
    ax.set_title("Children's disagreement")
    ax.legend(fontsize="small")
    return ax


@available(has_fields(("path_error",)), PAIRS)
def plot_spawn_paths(run: RunsLike, ax: Any = None, *, group: str = PAIRS, labels: Optional[Sequence[str]] = None,
                     field: str = "path_error") -> Any:
    """Error (``field="path_loss"``: loss) along the linear path between children, mean over
    the pairs of each spawn step, one curve per spawn step (dark: early, light: late)."""
    ax = new_axes(ax)
    with opened(run) as runs:
        one = single(runs, "plot_spawn_paths")
        view = table(one, group)
        if view is None or field not in view:
            raise ValueError(f"the run holds no {field} in /{group}")
        paths = np.asarray(view[field], dtype=np.float64)
        steps = np.asarray(view["spawn_step"])
        unique = np.unique(steps)
        alpha = np.linspace(0.0, 1.0, paths.shape[1])
        for s, color in zip(unique, colors(len(unique))):
            (line,) = ax.plot(alpha, paths[steps == s].mean(axis=0), color=color, marker=".", label=f"t = {s}")
            line.set_gid(f"{field}:{s}")
        ax.set_ylabel(("error" if field == "path_error" else "loss") + _suffix([_eval_set(view)]))
    ax.set_xlabel("α  (θ = (1 − α) θ_a + α θ_b)")
    ax.set_title("Linear paths between children")
    ax.legend(fontsize="small", ncol=2)
    return ax


@available(has_fields(("linear_error",)), LINEARIZED)
def plot_linearized_accuracy(run: RunsLike, ax: Any = None, *, group: str = LINEARIZED,
                             labels: Optional[Sequence[str]] = None) -> Any:
    """Accuracy (1 − error) of the linearised network trained from θ(t) (solid), of the real
    network trained alike (dashed) and of the network at t itself (dotted), against t."""
    ax = new_axes(ax)
    drawn, sets = 0, []
    with opened(run) as runs:
        tags = run_labels(runs, labels)
        several = len(runs) > 1
        for one, tag, color in zip(runs, tags, run_colors(len(runs))):
            view = table(one, group)
            if view is None:
                continue
            sets.append(_eval_set(view))
            steps = np.asarray(view["step"])
            for field, legend, style in (("linear_error", "linearised at t, trained", "-"),
                                         ("real_error", "network, trained alike", "--"),
                                         ("parent_error", "network at t", ":")):
                if field in view:
                    (line,) = ax.plot(steps, 1.0 - np.asarray(view[field], dtype=np.float64), color=color,
                                      linestyle=style, marker="o" if style == "-" else None, ms=3,
                                      label=f"{tag}: {legend}" if several else legend)
                    line.set_gid(f"{tag}:{field}")
                    drawn += 1
    if not drawn:
        raise ValueError(f"none of the runs holds linearised-network errors in /{group}")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("linearisation step t")
    ax.set_ylabel("accuracy" + _suffix(sets))
    ax.set_title("Linearised vs real network")
    ax.legend(fontsize="small")
    return ax


@available(has_fields(("loss",)), SLICES)
def plot_loss_slices(run: RunsLike, ax: Any = None, *, group: str = SLICES, labels: Optional[Sequence[str]] = None,
                     field: str = "loss") -> Any:
    """1-D slices L(θ_t + a d) around the parent states along a filter-normalised direction
    (Li et al. 2018), one curve per state (dark: early, light: late)."""
    ax = new_axes(ax)
    with opened(run) as runs:
        one = single(runs, "plot_loss_slices")
        view = table(one, group)
        if view is None or field not in view:
            raise ValueError(f"the run holds no {field} slices in /{group}")
        values = np.asarray(view[field], dtype=np.float64)
        coords = np.asarray(view.group["coordinate"][()], dtype=np.float64)
        steps = np.asarray(view["step"])
        for s, curve, color in zip(steps, values, colors(len(steps))):
            (line,) = ax.plot(coords, curve, color=color, label=f"t = {s}")
            line.set_gid(f"{field}:{s}")
        ax.set_ylabel(field + _suffix([_eval_set(view)]))
    ax.set_xlabel("a  (θ_t + a d, d filter-normalised)")
    ax.set_title("Loss slices around parent states")
    ax.legend(fontsize="small", ncol=2)
    return ax

