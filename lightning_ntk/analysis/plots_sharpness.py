"""Figures of ``/sharpness`` (loss-landscape curvature on a fixed set of examples).

* sharpness: the top Hessian eigenvalues over time with the edge-of-stability line 2/η
  (Cohen et al. 2021; (2 + 2β)/η under heavy-ball momentum β, as the file's
  ``eos_threshold`` says);
* Hessian trace (Hutchinson / Hutch++) with ±1 standard-error bars;
* spectral density by stochastic Lanczos quadrature, Gaussian-smoothed:
  φ_σ(t) = mean_r Σ_j w_rj · N(t; θ_rj, σ²).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ._runs import RunsLike, colors, find_field, new_axes, opened, run_colors, run_labels, table, x_values
from .series import available, has_fields

GROUP = "sharpness"
EIGVALS = ("eigvals", "eigenvalues")
TOP = ("sharpness", "top_eigval", "lambda_max")
EOS = ("eos_threshold", "eos", "edge_of_stability")
TRACE_STDERR = ("trace_stderr", "trace_se", "trace_std_err")
DENSITY_NODES = ("density_nodes", "slq_nodes", "nodes")
DENSITY_WEIGHTS = ("density_weights", "slq_weights", "weights")


def _has_density(run: Any, group: str) -> bool:
    view = table(run, group)
    return find_field(view, DENSITY_NODES) is not None and find_field(view, DENSITY_WEIGHTS) is not None


@available(has_fields(EIGVALS + TOP), GROUP)
def plot_sharpness(run: RunsLike, ax: Any = None, *, group: str = GROUP, x: str = "step",
                   labels: Optional[Sequence[str]] = None, k: Optional[int] = None, eos: bool = True) -> Any:
    """Top Hessian eigenvalue(s) over time, with the edge-of-stability threshold 2/η.

    λ₁ is drawn bold, further eigenvalues thin (``k`` limits them). The threshold is the
    file's ``eos_threshold`` field; a file without it but with ``lr`` gets 2/lr (plain
    gradient descent), labelled so. Line gids: ``"<run>:eigvals[i]"``, ``"<run>:eos_threshold"``.
    """
    ax = new_axes(ax)
    drawn = 0
    with opened(run) as runs:
        tags = run_labels(runs, labels)
        several = len(runs) > 1
        palette = run_colors(len(runs))
        for r, (one, tag) in enumerate(zip(runs, tags)):
            view = table(one, group)
            name = find_field(view, EIGVALS, ndim=2)
            if name is not None:
                values = np.asarray(view[name], dtype=np.float64)
            else:
                name = find_field(view, TOP, ndim=1)
                if name is None:
                    continue
                values = np.asarray(view[name], dtype=np.float64)[:, None]
            xs, xlabel = x_values(view, x)
            n = values.shape[1] if k is None else min(k, values.shape[1])
            shades = colors(n, "viridis") if not several else [palette[r]] * n
            for i in range(n):
                head = f"{tag}: " if several else ""
                label = f"{head}λ{i + 1}" if i == 0 or not several else "_nolegend_"
                (line,) = ax.plot(xs, values[:, i], color=palette[r] if i == 0 else shades[i],
                                  lw=2.0 if i == 0 else 0.8, alpha=1.0 if i == 0 else 0.7, label=label,
                                  marker="." if len(xs) < 60 and i == 0 else None)
                line.set_gid(f"{tag}:{name}[{i}]" if values.shape[1] > 1 or name in EIGVALS else f"{tag}:{name}")
                drawn += 1
            if eos:
                threshold, which = _eos(view)
                if threshold is not None:
                    (line,) = ax.plot(xs, threshold, color=palette[r] if several else "k", linestyle="--", lw=1.2,
                                      label=f"{tag}: {which}" if several else which)
                    line.set_gid(f"{tag}:eos_threshold")
            ax.set_xlabel(xlabel)
    if not drawn:
        raise ValueError(f"none of the runs holds Hessian eigenvalues ({' or '.join(EIGVALS + TOP)}) in /{group}")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_title("Sharpness and the edge of stability")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax


def _eos(view: Any) -> Tuple[Optional[np.ndarray], str]:
    name = find_field(view, EOS, ndim=1)
    if name is not None:
        return np.asarray(view[name], dtype=np.float64), "2/η (edge of stability)"
    if "lr" in view and view.group["lr"].ndim == 1:
        lr = np.asarray(view["lr"], dtype=np.float64)
        with np.errstate(divide="ignore"):
            return np.where(lr > 0, 2.0 / lr, np.nan), "2/η (plain GD, from lr)"
    return None, ""


@available(has_fields(["trace"]), GROUP)
def plot_hessian_trace(run: RunsLike, ax: Any = None, *, group: str = GROUP, x: str = "step",
                       labels: Optional[Sequence[str]] = None) -> Any:
    """Hessian trace estimate over time with ±1 standard-error bars (``trace_stderr``).

    Each run adds one ``ErrorbarContainer`` to ``ax.containers`` (label: the run's label).
    """
    ax = new_axes(ax)
    drawn = 0
    with opened(run) as runs:
        tags = run_labels(runs, labels)
        palette = run_colors(len(runs))
        for r, (one, tag) in enumerate(zip(runs, tags)):
            view = table(one, group)
            if view is None or "trace" not in view:
                continue
            xs, xlabel = x_values(view, x)
            trace = np.asarray(view["trace"], dtype=np.float64)
            se_name = find_field(view, TRACE_STDERR, ndim=1)
            stderr = np.asarray(view[se_name], dtype=np.float64) if se_name else None
            container = ax.errorbar(xs, trace, yerr=stderr, color=palette[r], marker="o", markersize=3,
                                    capsize=3, lw=1.2, label=tag if len(runs) > 1 else "trace ± 1 s.e.")
            container.lines[0].set_gid(f"{tag}:trace")
            drawn += 1
            ax.set_xlabel(xlabel)
    if not drawn:
        raise ValueError(f"none of the runs holds a Hessian trace in /{group}")
    ax.set_ylabel("tr H")
    ax.set_title("Hessian trace")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax


def smoothed_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray,
                     sigma: Optional[float] = None) -> np.ndarray:
    """Gaussian-smoothed SLQ density on ``grid``: mean over runs (all axes but the last) of
    Σ_j w_j exp(−(t − θ_j)² / 2σ²) / (σ √(2π)). ``sigma=None``: 1% of the node range (NaN
    nodes, e.g. padding, are ignored)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if nodes.shape != weights.shape:
        raise ValueError(f"density nodes and weights must have the same shape, got {nodes.shape} and {weights.shape}")
    nodes = nodes.reshape(-1, nodes.shape[-1]) if nodes.ndim else nodes.reshape(1, 1)
    weights = weights.reshape(nodes.shape)
    ok = np.isfinite(nodes) & np.isfinite(weights)
    if sigma is None:
        sigma = _default_sigma(np.where(ok, nodes, np.nan))
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    grid = np.asarray(grid, dtype=np.float64).reshape(-1)
    z = (grid[:, None, None] - np.where(ok, nodes, 0.0)[None]) / sigma
    dens = (np.where(ok, weights, 0.0)[None] * np.exp(-0.5 * z * z)).sum(-1).mean(-1)
    return dens / (sigma * math.sqrt(2.0 * math.pi))


def _default_sigma(nodes: np.ndarray) -> float:
    """1% of the range of the finite nodes (1.0 when they do not spread)."""
    finite = np.asarray(nodes, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    span = float(np.ptp(finite)) if finite.size else 0.0
    return 0.01 * span if span > 0 else 1.0


@available(_has_density, GROUP)
def plot_hessian_density(run: RunsLike, ax: Any = None, *, group: str = GROUP,
                         snapshots: Optional[Sequence[int]] = None, sigma: Optional[float] = None,
                         points: int = 400, labels: Optional[Sequence[str]] = None, logy: bool = True) -> Any:
    """Hessian spectral density (SLQ nodes/weights, Gaussian-smoothed) at some snapshots.

    One run: ``snapshots`` (indices into the stored rows; default up to four spread over the
    run, the last included), coloured by time. Several runs: the last snapshot of each.
    Line gid: ``"<run>:density[<row>]"``; the x data are the grid, the y data the density.
    """
    ax = new_axes(ax)
    with opened(run) as runs:
        tags = run_labels(runs, labels)
        several = len(runs) > 1
        palette = run_colors(len(runs))
        picked = []
        for r, (one, tag) in enumerate(zip(runs, tags)):
            view = table(one, group)
            nn, wn = find_field(view, DENSITY_NODES), find_field(view, DENSITY_WEIGHTS)
            if nn is None or wn is None:
                continue
            n_rows = len(view)
            rows = [n_rows - 1] if several else (
                list(snapshots) if snapshots is not None else _spread(n_rows, 4))
            rows = [row % n_rows for row in rows if -n_rows <= row < n_rows]
            steps = view[view.key]
            shades = colors(len(rows), "viridis")
            for j, row in enumerate(rows):
                nodes = np.asarray(view.group[nn][row], dtype=np.float64)
                weights = np.asarray(view.group[wn][row], dtype=np.float64)
                label = f"{tag} (step {int(steps[row])})" if several else f"step {int(steps[row])}"
                picked.append((f"{tag}:density[{row}]", label, nodes, weights, palette[r] if several else shades[j]))
        if not picked:
            raise ValueError(f"none of the runs holds a spectral density ({'/'.join(DENSITY_NODES)} and "
                             f"{'/'.join(DENSITY_WEIGHTS)}) in /{group}")
        finite = np.concatenate([p[2][np.isfinite(p[2])].ravel() for p in picked])
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
        sigmas = [sigma if sigma is not None else _default_sigma(p[2]) for p in picked]
        pad = max(0.05 * (hi - lo), 4.0 * max(sigmas))  # every Gaussian fully on the grid
        grid = np.linspace(lo - pad, hi + pad, points)
        peak = 0.0
        for (gid, label, nodes, weights, color), width in zip(picked, sigmas):
            dens = smoothed_density(nodes, weights, grid, width)
            (line,) = ax.plot(grid, dens, color=color, label=label, lw=1.2)
            line.set_gid(gid)
            peak = max(peak, float(np.nanmax(dens)))
    if logy and peak > 0:
        ax.set_yscale("log", nonpositive="mask")
        ax.set_ylim(peak * 1e-6, peak * 3)
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (smoothed)")
    ax.set_title("Hessian spectral density (SLQ)")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax


def _spread(n: int, most: int) -> List[int]:
    """Up to ``most`` row indices spread evenly over ``n`` rows, the first and the last included."""
    if n <= most:
        return list(range(n))
    return sorted(set(int(round(v)) for v in np.linspace(0, n - 1, most)))
