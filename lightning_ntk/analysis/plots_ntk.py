"""Figures of ``/ntk`` (empirical NTK snapshots on the probe).

* eigenvalue spectrum over time (one line per eigen index, log scale);
* kernel distance to the initial kernel and to the previous snapshot, and kernel velocity
  (Fort et al. 2020: S(K, K') = 1 − ⟨K, K'⟩_F / (‖K‖_F ‖K'‖_F), velocity = S / Δepoch);
* energy of the target / output / residual in the top-k eigenvectors
  (Kopitkov & Indelman 2020: E_k(φ) = ‖U_kᵀ φ‖² / ‖φ‖²);
* kernel-target alignment, kernel-regression accuracy, trace / Frobenius norm, effective
  rank, per-layer trace;
* eigenfunctions: the top eigenvectors of one snapshot over the probe examples, sorted by label.
"""
from __future__ import annotations

import json
from typing import Any, List, Optional, Sequence

import numpy as np

from .._args import integer
from ._runs import RunsLike, colors, find_field, new_axes, opened, run_colors, run_labels, single, table, x_values
from .series import LINESTYLES, _log_scale, available, has_fields, plot_series, union_fields

GROUP = "ntk"
EIGVALS = ("eigvals", "eigenvalues")
EIGVECS = ("eigvecs", "eigenvectors")
ENERGIES = (("target_energy", "target"), ("output_energy", "output"), ("residual_energy", "residual"))


@available(has_fields(EIGVALS), GROUP)
def plot_ntk_eigenvalues(run: RunsLike, ax: Any = None, *, group: str = GROUP, x: str = "step",
                         labels: Optional[Sequence[str]] = None, k: Optional[int] = None) -> Any:
    """Top eigenvalues of the eNTK over time: one line per eigen index (λ₁ ≥ λ₂ ≥ …), log scale.

    ``k`` limits the lines to the first ``k`` eigenvalues. One run: colours run over the
    index (viridis). Several runs: one colour per run. Line ``gid``: ``"<run>:eigvals[i]"``.
    """
    ax = new_axes(ax)
    drawn = 0
    with opened(run) as runs:
        tags = run_labels(runs, labels)
        several = len(runs) > 1
        for r, (one, tag) in enumerate(zip(runs, tags)):
            view = table(one, group)
            name = find_field(view, EIGVALS, ndim=2)
            if name is None:
                continue
            xs, xlabel = x_values(view, x)
            values = np.asarray(view[name], dtype=np.float64)
            n = values.shape[1] if k is None else min(k, values.shape[1])
            palette = [run_colors(len(runs))[r]] * n if several else colors(n)
            for i in range(n):
                if several:
                    label = tag if i == 0 else "_nolegend_"
                else:
                    label = f"λ{i + 1}" if n <= 10 or i in (0, n - 1) else "_nolegend_"
                (line,) = ax.plot(xs, values[:, i], color=palette[i], label=label, lw=1.2,
                                  marker="." if len(xs) < 60 else None)
                line.set_gid(f"{tag}:{name}[{i}]")
                drawn += 1
            ax.set_xlabel(xlabel)
    if not drawn:
        raise ValueError(f"none of the runs holds NTK eigenvalues ({' or '.join(EIGVALS)}) in /{group}")
    _log_scale(ax)
    ax.set_ylabel("eigenvalue")
    ax.set_title("NTK eigenvalue spectrum")
    ax.legend(fontsize="small", ncol=2)
    ax.grid(True, alpha=0.3, which="both")
    return ax


@available(has_fields(["distance_to_init", "distance_to_prev"]), GROUP)
def plot_kernel_distance(run: RunsLike, ax: Any = None, *, group: str = GROUP, **kw: Any) -> Any:
    """Kernel distance S(K_t, K_0) to the first snapshot and S(K_t, K_prev) to the previous one."""
    return plot_series(run, group, ["distance_to_init", "distance_to_prev"], ax, ylabel="kernel distance S",
                       title="Kernel distance", names={"distance_to_init": "to init",
                                                       "distance_to_prev": "to previous"}, **kw)


@available(has_fields(["velocity"]), GROUP)
def plot_kernel_velocity(run: RunsLike, ax: Any = None, *, group: str = GROUP, logy: bool = False, **kw: Any) -> Any:
    """Kernel velocity S(K_t, K_{t+dt}) / dt, dt in epochs (Fort et al. 2020)."""
    return plot_series(run, group, ["velocity"], ax, logy=logy, ylabel="kernel velocity (1/epoch)",
                       title="Kernel velocity", **kw)


@available(has_fields(["trace", "frobenius"]), GROUP)
def plot_kernel_norms(run: RunsLike, ax: Any = None, *, group: str = GROUP, **kw: Any) -> Any:
    """Trace and Frobenius norm of the kernel over time (log scale)."""
    return plot_series(run, group, ["trace", "frobenius"], ax, logy=True, ylabel="kernel size",
                       title="Kernel trace and Frobenius norm", names={"frobenius": "‖K‖_F", "trace": "tr K"},
                       **kw)


@available(has_fields(["effective_rank"]), GROUP)
def plot_effective_rank(run: RunsLike, ax: Any = None, *, group: str = GROUP, **kw: Any) -> Any:
    """Effective rank of the kernel over time."""
    return plot_series(run, group, ["effective_rank"], ax, ylabel="effective rank", title="Effective rank", **kw)


@available(has_fields([name for name, _ in ENERGIES]), GROUP)
def plot_eigen_energy(run: RunsLike, ax: Any = None, *, group: str = GROUP, k: Optional[int] = None,
                      baselines: bool = True, **kw: Any) -> Any:
    """Fraction of the energy of the target, the output and the residual in the top-k
    eigenvectors, E_k(φ) = ‖U_kᵀ φ‖² / ‖φ‖², over time.

    The file stores the curve E_1..E_K per snapshot; ``k`` picks its column (default: the
    largest, K). Line ``gid``: ``"<run>:target_energy[k-1]"``.

    ``baselines`` (default on) draws what the energies are to be read against
    (:func:`lightning_ntk.spectral.energy_baselines`), as dotted horizontal lines: a random
    k-dimensional subspace of the M eigenvector rows holds k/M of any vector's energy
    (gid ``"<run>:baseline_random"``), and the uncentred one-hot targets hold Σ_c p_c² (1/C
    for balanced classes) in the constant direction, which an NTK's top eigenvector is
    often close to (gid ``"<run>:baseline_constant"``, from the table's
    ``target_energy_constant`` attribute; absent in files written before it was recorded).
    """
    specs, names = [], {}
    with opened(run) as runs:
        widths = [view.group[name].shape[1] for view in (table(one, group) for one in runs) if view is not None
                  for name, _ in ENERGIES if name in view and view.group[name].ndim == 2]
        if not widths:
            raise ValueError(f"none of the runs holds target/output energies in /{group}")
        kk = min(widths) if k is None else integer(int(k), "k", "plot_eigen_energy", minimum=1, maximum=min(widths),
                                                    hint="at most the number of stored eigenvectors")
        for name, short in ENERGIES:
            specs.append((name, kk - 1))
            names[f"{name}[{kk - 1}]"] = short
        ax = plot_series(runs, group, specs, ax, ylabel=f"energy in top-{kk} eigenvectors",
                         title=f"Energy in the top-{kk} NTK eigenvectors", names=names, **kw)
        if baselines:
            _energy_baselines(ax, runs, run_labels(runs, kw.get("labels")), group, kk)
    ax.set_ylim(-0.02, 1.02)
    return ax


def _energy_baselines(ax: Any, runs: List[Any], tags: List[str], group: str, k: int) -> None:
    """Dotted lines at k/M (random subspace) and at the targets' constant share, per run;
    a value shared by several runs is drawn (and labelled) once."""
    drawn: dict = {}
    for one, tag in zip(runs, tags):
        view = table(one, group)
        if view is None:
            continue
        rows = find_field(view, EIGVECS, ndim=3)
        levels = []
        if rows is not None:
            levels.append(("random", k / view.group[rows].shape[1], f"random {k}-subspace: k/M"))
        constant = view.attrs.get("target_energy_constant")
        if constant is not None and np.isfinite(float(constant)):
            levels.append(("constant", float(constant), "targets' constant part: Σ p_c² (1/C balanced)"))
        for kind, value, text in levels:
            first = (kind, round(value, 12)) not in drawn
            line = ax.axhline(value, color="0.45" if kind == "random" else "0.2", linestyle=":", lw=1.0,
                              label=text if first else "_nolegend_")
            line.set_gid(f"{tag}:baseline_{kind}")
            drawn[(kind, round(value, 12))] = line
    if drawn:
        ax.legend(fontsize="small")


@available(has_fields([], prefixes=["kernel_target_alignment", "centered_alignment"]), GROUP)
def plot_kernel_alignment(run: RunsLike, ax: Any = None, *, group: str = GROUP, **kw: Any) -> Any:
    """Kernel-target alignment ⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F) (Cristianini et al.), plain and centred if stored."""
    return plot_series(run, group, union_fields(run, group, ["kernel_target_alignment", "centered_alignment"]), ax,
                       ylabel="alignment", title="Kernel-target alignment", **kw)


@available(has_fields([], prefixes=["krr_accuracy"]), GROUP)
def plot_krr_accuracy(run: RunsLike, ax: Any = None, *, group: str = GROUP, **kw: Any) -> Any:
    """Accuracy of kernel regression with the snapshot's kernel (Lee et al. 2020; a closed-form
    proxy for Fort et al.'s linearised-network accuracy)."""
    return plot_series(run, group, union_fields(run, group, ["krr_accuracy"]), ax, ylabel="accuracy",
                       title="Kernel regression accuracy", **kw)


def layer_names(view: Any, field: str, n: int) -> List[str]:
    """Names of the ``n`` layers of ``field`` (attributes ``layer_names``/``layers``/``names`` of
    the dataset or the group, JSON or array; else ``layer 0..n-1``)."""
    for attrs in (view.group[field].attrs, view.group.attrs):
        for key in ("layer_names", "layers", "names"):
            if key not in attrs:
                continue
            raw = attrs[key]
            if isinstance(raw, bytes):
                raw = raw.decode()
            if isinstance(raw, str):
                try:
                    raw = json.loads(raw)
                except ValueError:
                    raw = [raw]
            got = [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(np.asarray(raw, dtype=object))]
            if len(got) == n:
                return got
    return [f"layer {i}" for i in range(n)]


@available(has_fields(["layer_trace"]), GROUP)
def plot_layer_trace(run: RunsLike, ax: Any = None, *, group: str = GROUP, x: str = "step",
                     labels: Optional[Sequence[str]] = None, logy: bool = True) -> Any:
    """Each layer's contribution to the kernel trace over time (one line per layer)."""
    ax = new_axes(ax)
    drawn = 0
    with opened(run) as runs:
        tags = run_labels(runs, labels)
        for r, (one, tag) in enumerate(zip(runs, tags)):
            view = table(one, group)
            if view is None or "layer_trace" not in view or view.group["layer_trace"].ndim != 2:
                continue
            xs, xlabel = x_values(view, x)
            values = np.asarray(view["layer_trace"], dtype=np.float64)
            names = layer_names(view, "layer_trace", values.shape[1])
            palette = colors(values.shape[1], "tab10" if values.shape[1] <= 10 else "viridis")
            for i, name in enumerate(names):
                (line,) = ax.plot(xs, values[:, i], color=palette[i], linestyle=LINESTYLES[r % len(LINESTYLES)],
                                  label=name if len(runs) == 1 else f"{tag}: {name}")
                line.set_gid(f"{tag}:layer_trace[{i}]")
                drawn += 1
            ax.set_xlabel(xlabel)
    if not drawn:
        raise ValueError(f"none of the runs holds layer_trace in /{group}")
    if logy:
        _log_scale(ax)
    ax.set_ylabel("trace of the layer's kernel")
    ax.set_title("Per-layer kernel trace")
    ax.legend(fontsize="x-small", ncol=2)
    ax.grid(True, alpha=0.3)
    return ax


def probe_labels(run: Any, view: Any) -> Optional[np.ndarray]:
    """Class labels of the probe a table was measured on (its ``probe`` attribute), if stored."""
    name = view.attrs.get("probe") or ""
    candidates = [name] if name else run.probes
    for probe in candidates:
        if probe in run.probes:
            y = run.probe(probe).get("y")
            if y is None:
                continue
            y = np.asarray(y)
            if y.ndim == 2 and y.shape[1] > 1:  # one-hot or soft targets
                return np.argmax(y, axis=1)
            return y.reshape(len(y), -1)[:, 0] if y.ndim > 1 else y
    return None


@available(has_fields(EIGVECS), GROUP)
def plot_eigenfunctions(run: RunsLike, ax: Any = None, *, group: str = GROUP, snapshot: int = -1,
                        k: Optional[int] = None, colorbar: bool = True) -> Any:
    """The top eigenvectors of one NTK snapshot over the probe examples, as a heatmap.

    Rows: probe examples sorted by label (stable sort; class boundaries drawn); columns:
    eigenvectors j = 1..k (largest eigenvalue first). For a ``full`` kernel (M = N·C rows,
    example-major) each example shows the norm of its C components. ``snapshot`` indexes the
    stored snapshots (default: the last). Returns the Axes; the image is ``ax.images[0]``.
    """
    ax = new_axes(ax)
    with opened(run) as runs:
        one = single(runs, "plot_eigenfunctions")
        view = table(one, group)
        name = find_field(view, EIGVECS, ndim=3)
        if name is None:
            raise ValueError(f"{one.path} holds no NTK eigenvectors ({' or '.join(EIGVECS)}) in /{group}")
        n_rows = len(view)
        if not -n_rows <= snapshot < n_rows:
            raise IndexError(f"snapshot {snapshot} is out of range: /{group} has {n_rows} snapshots")
        vecs = np.asarray(view.group[name][snapshot % n_rows], dtype=np.float64)  # (M, k)
        step = int(view[view.key][snapshot % n_rows])
        y = probe_labels(one, view)
        n_examples = len(y) if y is not None else vecs.shape[0]
        full = y is not None and vecs.shape[0] != n_examples and vecs.shape[0] % n_examples == 0
        if full:
            vecs = np.linalg.norm(vecs.reshape(n_examples, vecs.shape[0] // n_examples, -1), axis=1)
        if k is not None:
            vecs = vecs[:, :k]
        if y is not None and len(y) == vecs.shape[0]:
            order = np.argsort(y, kind="stable")
            vecs, ys = vecs[order], y[order]
        else:
            ys = None
        vmax = float(np.nanmax(np.abs(vecs))) if vecs.size else 1.0
        image = ax.imshow(vecs, aspect="auto", interpolation="nearest", cmap="viridis" if full else "RdBu_r",
                          vmin=0.0 if full else -vmax, vmax=vmax,
                          extent=(0.5, vecs.shape[1] + 0.5, vecs.shape[0] - 0.5, -0.5))
        if ys is not None:
            _class_ticks(ax, ys, "y")
            ax.set_ylabel("probe examples, sorted by label")
        else:
            ax.set_ylabel("probe examples")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("eigenvector (largest eigenvalue first)")
        ax.set_title(f"NTK eigenfunctions on the probe (step {step})" + (" ‖·‖ over outputs" if full else ""))
        if colorbar:
            ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    return ax


def _class_ticks(ax: Any, ys: np.ndarray, axis: str) -> None:
    """Class boundaries (lines) and class names (ticks) along a label-sorted image axis."""
    bounds = np.flatnonzero(ys[1:] != ys[:-1]) + 0.5
    for b in bounds:
        (ax.axhline if axis == "y" else ax.axvline)(b, color="k", lw=0.6)
    starts = np.concatenate([[-0.5], bounds])
    ends = np.concatenate([bounds, [len(ys) - 0.5]])
    classes = ys[np.concatenate([[0], (bounds + 0.5).astype(int)])]
    if len(classes) <= 30:
        (ax.set_yticks if axis == "y" else ax.set_xticks)((starts + ends) / 2)
        (ax.set_yticklabels if axis == "y" else ax.set_xticklabels)([_fmt_label(c) for c in classes],
                                                                    fontsize="small")


@available(has_fields(["kernel"]), GROUP)
def plot_kernel_matrix(run: RunsLike, ax: Any = None, *, group: str = GROUP, snapshot: int = -1,
                       colorbar: bool = True) -> Any:
    """The stored kernel Θ(x_i, x_j) of one snapshot over the probe, rows and columns sorted by
    label (``trace``/``pseudo`` kinds: an (N, N) matrix; other kinds are summed over their
    output axes, i.e. the trace over outputs). One run; the image is ``ax.images[0]``."""
    ax = new_axes(ax)
    with opened(run) as runs:
        one = single(runs, "plot_kernel_matrix")
        view = table(one, group)
        if view is None or "kernel" not in view:
            raise ValueError(f"{one.path} holds no stored kernel in /{group} (the monitor's store_kernel option)")
        n_rows = len(view)
        if not -n_rows <= snapshot < n_rows:
            raise IndexError(f"snapshot {snapshot} is out of range: /{group} has {n_rows} snapshots")
        kernel = np.asarray(view.group["kernel"][snapshot % n_rows], dtype=np.float64)
        if kernel.ndim == 3:  # diagonal kind (N, N, C)
            kernel = kernel.sum(axis=2)
        elif kernel.ndim == 4:  # full kind (N, N, C, C): trace over outputs
            kernel = np.trace(kernel, axis1=2, axis2=3)
        step = int(view[view.key][snapshot % n_rows])
        y = probe_labels(one, view)
        if y is not None and len(y) == kernel.shape[0]:
            order = np.argsort(y, kind="stable")
            kernel, ys = kernel[np.ix_(order, order)], y[order]
        else:
            ys = None
        image = ax.imshow(kernel, interpolation="nearest", cmap="magma")
        if ys is not None:
            _class_ticks(ax, ys, "y")
            _class_ticks(ax, ys, "x")
            ax.set_xlabel("probe examples, sorted by label")
        ax.set_title(f"NTK on the probe (step {step})")
        if colorbar:
            ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    return ax


def _fmt_label(value: Any) -> str:
    v = float(value)
    return str(int(v)) if v.is_integer() else f"{v:g}"
