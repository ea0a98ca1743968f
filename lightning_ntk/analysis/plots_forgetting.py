"""Figures of ``/forgetting/examples`` (one row per training example, rewritten each epoch).

* forgetting-count histogram (Toneva et al. 2019): examples per number of forgetting
  events among the examples learned at least once, and the never-learned examples (never
  correct; count 0 by definition, but ranked as most forgotten by Toneva et al.) as a bar
  of their own, hatched, at the right end;
* cartography map (Swayamdipta et al. 2020): confidence (mean p(gold)) against variability
  (population std of p(gold)) per example, coloured by correctness (fraction correct).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ._runs import RunsLike, new_axes, opened, run_colors, run_labels, table
from .series import available, has_fields

GROUP = "forgetting/examples"
MARKERS = ("o", "^", "s", "D", "v", "P")


@available(has_fields(["forgetting_count"]), GROUP)
def plot_forgetting_histogram(run: RunsLike, ax: Any = None, *, group: str = GROUP,
                              labels: Optional[Sequence[str]] = None) -> Any:
    """Number of examples per forgetting count (bars at 0, 1, 2, …), and the never-learned
    examples as a separate bar.

    A never-learned example has no forgetting event (count 0) although it is the least
    learned of all: Toneva et al. rank it as the most forgotten. Stacked on the 0 bar it
    would read as unforgettable, so it gets its own hatched bar, two slots right of the
    largest count, ticked "never learned". Per run, two ``BarContainer`` s join
    ``ax.containers``: the examples learned at least once, per count (label
    ``"<run>: learned"``; heights ``np.bincount`` of their counts), then the never-learned
    bar (``"<run>: never learned"``; one bar, its height their number). Several runs: bars
    side by side.
    """
    ax = new_axes(ax)
    with opened(run) as runs:
        tags = run_labels(runs, labels)
        views = [(tag, table(one, group)) for one, tag in zip(runs, tags)]
        views = [(tag, v) for tag, v in views if v is not None and "forgetting_count" in v]
        if not views:
            raise ValueError(f"none of the runs holds forgetting counts in /{group}")
        palette = run_colors(len(runs))
        width = 0.8 / len(views)
        data = []
        for tag, view in views:
            counts = np.asarray(view["forgetting_count"]).astype(np.int64)
            never = (np.asarray(view["never_learned"]).astype(bool) if "never_learned" in view
                     else np.zeros(len(counts), bool))
            keep = counts >= 0  # -1: an example not presented yet
            data.append((tag, counts[keep & ~never], int((keep & never).sum())))
        top = max((int(c.max()) if c.size else 0) for _, c, _ in data)
        never_at = top + 2
        for r, (tag, learned_counts, n_never) in enumerate(data):
            shift = (r - (len(data) - 1) / 2) * width
            head = f"{tag}: " if len(data) > 1 else ""
            learned = np.bincount(learned_counts, minlength=top + 1)
            ax.bar(np.arange(top + 1) + shift, learned, width=width, color=palette[r], label=f"{head}learned")
            ax.bar([never_at + shift], [n_never], width=width, color=palette[r], alpha=0.45, hatch="//",
                   edgecolor="k", label=f"{head}never learned")
        ticks = list(np.arange(top + 1) if top < 25 else np.linspace(0, top, 11).round())
        ax.set_xticks(ticks + [never_at])
        ax.set_xticklabels([str(int(t)) for t in ticks] + ["never\nlearned"])
    ax.set_xlabel("forgetting events")
    ax.set_ylabel("examples")
    ax.set_title("Forgetting events per example")
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    return ax


@available(has_fields(["confidence"]), GROUP)
def plot_cartography(run: RunsLike, ax: Any = None, *, group: str = GROUP,
                     labels: Optional[Sequence[str]] = None, colorbar: bool = True, size: float = 12.0) -> Any:
    """Data map: confidence (y) against variability (x), coloured by correctness.

    Examples without statistics (NaN: no completed epoch) are left out. One scatter
    (``PathCollection`` in ``ax.collections``, label: the run's label) per run; several runs
    differ by marker.
    """
    ax = new_axes(ax)
    scatter = None
    with opened(run) as runs:
        tags = run_labels(runs, labels)
        drawn = 0
        for r, (one, tag) in enumerate(zip(runs, tags)):
            view = table(one, group)
            if view is None or "confidence" not in view or "variability" not in view:
                continue
            conf = np.asarray(view["confidence"], dtype=np.float64)
            var = np.asarray(view["variability"], dtype=np.float64)
            corr = (np.asarray(view["correctness"], dtype=np.float64) if "correctness" in view
                    else np.full(conf.shape, np.nan))
            ok = np.isfinite(conf) & np.isfinite(var)
            scatter = ax.scatter(var[ok], conf[ok], c=corr[ok], cmap="viridis", vmin=0.0, vmax=1.0, s=size,
                                 marker=MARKERS[r % len(MARKERS)], alpha=0.75, linewidths=0, label=tag)
            scatter.set_gid(f"{tag}:cartography")
            drawn += 1
        if not drawn:
            raise ValueError(f"none of the runs holds confidence and variability in /{group}")
    ax.set_xlabel("variability (std of p(gold))")
    ax.set_ylabel("confidence (mean p(gold))")
    ax.set_title("Dataset cartography")
    if len(runs) > 1:
        ax.legend(fontsize="small")
    if colorbar and scatter is not None:
        ax.figure.colorbar(scatter, ax=ax, fraction=0.046, pad=0.02).set_label("correctness")
    ax.grid(True, alpha=0.3)
    return ax
