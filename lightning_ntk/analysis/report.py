"""The HTML report: every figure the run files can feed, on one self-contained page.

``write_report(paths, out_dir)`` writes ``out_dir/report.html``: a table of each run's
metadata (file, creation time, versions, model, tables, probes), its monitors' settings,
the latest scalar values, then one section per quantity the files hold (a section whose
data no run holds is left out). Figures are PNG images, inline as base64 by default
(``embed=False``: written beside the page under ``figures/``). The page has no script and
loads nothing from the network. Several runs overlay in each figure; figures that show one
run at a time (eigenfunction heatmap, cartography map, per-layer trace) repeat per run.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import IO, Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ._runs import RunsLike, _as_list, opened, run_labels, table
from .plots_analytic import plot_distance_to_analytic, plot_scale_to_analytic
from .plots_codes import plot_code_accuracy, plot_code_change, plot_code_redundancy
from .plots_forgetting import plot_cartography, plot_forgetting_histogram
from .plots_landscape import (
    plot_linearized_accuracy,
    plot_loss_slices,
    plot_spawn_barrier,
    plot_spawn_disagreement,
    plot_spawn_kernel_distance,
    plot_spawn_loss_barrier,
    plot_spawn_paths,
)
from .plots_ntk import (
    plot_effective_rank,
    plot_eigen_energy,
    plot_eigenfunctions,
    plot_kernel_alignment,
    plot_kernel_distance,
    plot_kernel_matrix,
    plot_kernel_norms,
    plot_kernel_velocity,
    plot_krr_accuracy,
    plot_layer_trace,
    plot_ntk_eigenvalues,
)
from .plots_probe import plot_grad_norm, plot_probe_accuracy, plot_probe_loss
from .plots_representations import plot_representation_accuracy
from .plots_sharpness import plot_hessian_density, plot_hessian_trace, plot_sharpness

REPORT_NAME = "report.html"


@dataclass(frozen=True)
class Section:
    """One section of the report: a figure with one panel per plot function that has data."""

    title: str
    anchor: str
    plots: Tuple[Callable[..., Any], ...]
    text: str = ""
    per_run: bool = False


SECTIONS: Tuple[Section, ...] = (
    Section("Probe loss and accuracy", "probe", (plot_probe_loss, plot_probe_accuracy, plot_grad_norm),
            "Loss, accuracy and gradient norm on the fixed probe set (eval mode)."),
    Section("NTK eigenvalue spectrum", "ntk-spectrum", (plot_ntk_eigenvalues,),
            "Top eigenvalues of the empirical NTK on the probe, one line per eigen index."),
    Section("Kernel distance and velocity", "ntk-distance", (plot_kernel_distance, plot_kernel_velocity),
            "Fort et al. (2020): S(K, K') = 1 − ⟨K, K'⟩_F / (‖K‖_F ‖K'‖_F); velocity = S(K_t, K_t+dt) / dt, "
            "dt in epochs."),
    Section("Kernel size and effective rank", "ntk-size", (plot_kernel_norms, plot_effective_rank)),
    Section("Energy in the top-k eigenvectors", "ntk-energy", (plot_eigen_energy,),
            "Kopitkov & Indelman (2020): E_k(φ) = ‖U_kᵀ φ‖² / ‖φ‖² for the target, the network output and the "
            "residual."),
    Section("Kernel-target alignment and kernel regression", "ntk-alignment",
            (plot_kernel_alignment, plot_krr_accuracy),
            "Alignment ⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F) (Cristianini et al.); accuracy of kernel regression with the "
            "snapshot's kernel (closed form, a proxy for the linearised network's accuracy)."),
    Section("Per-layer kernel trace", "ntk-layers", (plot_layer_trace,), per_run=True),
    Section("NTK eigenfunctions on the probe", "ntk-eigenfunctions", (plot_eigenfunctions, plot_kernel_matrix),
            "Top eigenvectors of the last snapshot over the probe examples, sorted by label, and the kernel "
            "itself when the file stores it.", per_run=True),
    Section("Finite vs infinite width", "analytic", (plot_distance_to_analytic, plot_scale_to_analytic),
            "The eNTK snapshots against the analytic NTK of the architecture at infinite width, recorded after "
            "training by lightning_ntk.record_analytic_kernels (Lee et al. 2020): kernel distance S to it (solid) "
            "and to the first snapshot (dashed), and the trace ratio tr K_t / tr Θ."),
    Section("Sharpness and the edge of stability", "sharpness", (plot_sharpness,),
            "Top Hessian eigenvalue(s) of the training loss on a fixed set (Cohen et al. 2021) and the threshold "
            "2/η ((2 + 2β)/η with momentum β)."),
    Section("Hessian trace", "hessian-trace", (plot_hessian_trace,), "Error bars: ±1 standard error."),
    Section("Hessian spectral density", "hessian-density", (plot_hessian_density,),
            "Stochastic Lanczos quadrature, Gaussian-smoothed."),
    Section("Forgetting events", "forgetting", (plot_forgetting_histogram,),
            "Toneva et al. (2019): a forgetting event is a correct → incorrect change between consecutive "
            "presentations of an example in training."),
    Section("Dataset cartography", "cartography", (plot_cartography,),
            "Swayamdipta et al. (2020): per example over epochs, confidence = mean p(gold), variability = std "
            "p(gold), colour = fraction of epochs correct.", per_run=True),
    Section("Activation codes", "codes", (plot_code_redundancy, plot_code_accuracy, plot_code_change),
            "He, Lei et al.: redundancy ratio (N − #unique codes) / N and categorization from the codes."),
    Section("Representation probes", "representations", (plot_representation_accuracy,),
            "Few-shot accuracy of a layer's features (band: 95% confidence interval over episodes) and "
            "linear-probe accuracy."),
    Section("Barriers between spawned children", "spawn-barrier", (plot_spawn_barrier, plot_spawn_loss_barrier),
            "Frankle et al. (2020), Fort et al. (2020): children trained from the parent's state at step t with "
            "different SGD noise; barrier = max over the linear path between two children minus the mean of its "
            "ends (mean over pairs, band: range)."),
    Section("Spawned children: kernels and predictions", "spawn-kernel",
            (plot_spawn_kernel_distance, plot_spawn_disagreement),
            "Kernel distance S between the children's eNTKs on the probe and to the parent's; fraction of probe "
            "examples on which two children disagree."),
    Section("Linear paths between children", "spawn-paths", (plot_spawn_paths,),
            "Error along θ(α) = (1 − α) θ_a + α θ_b, mean over the pairs of each spawn step.", per_run=True),
    Section("Linearised vs real network", "linearized", (plot_linearized_accuracy,),
            "The first-order Taylor model around θ(t), trained with the same optimiser state, data order and "
            "budget as the network itself (Fort et al. 2020)."),
    Section("Loss slices around parent states", "slices", (plot_loss_slices,),
            "L(θ_t + a d) along one filter-normalised random direction (Li et al. 2018).", per_run=True),
)


def instance_groups(runs: Sequence[Any], group: str) -> List[str]:
    """The groups of the runs that hold ``group``'s quantity: ``group`` itself and those of
    named monitors, ``<quantity>_<name>`` (e.g. ``ntk_heldout``, ``forgetting_probe/examples``),
    in order of first appearance."""
    head, _, rest = group.partition("/")
    found: List[str] = []
    for run in runs:
        for name in run.tables:
            first, _, tail = name.partition("/")
            if tail == rest and (first == head or first.startswith(head + "_")) and name not in found:
                found.append(name)
    if group in found:  # the default group first
        found.remove(group)
        found.insert(0, group)
    return found


class _Progress:
    """A counter on ``stream``: one line per figure, or one updated line on a terminal."""

    def __init__(self, total: int, enabled: bool, stream: Optional[IO[str]] = None):
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        text = f"report: [{self.done}/{self.total}] {what}"
        if self.tty:
            self.stream.write("\r\033[K" + text)
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _figure(ncols: int, per_run: bool) -> Any:
    from matplotlib.figure import Figure

    width = 6.0 if per_run and ncols == 1 else 5.2
    fig = Figure(figsize=(width * ncols, 3.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig: Any, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _metadata_rows(runs: Sequence[Any]) -> List[Tuple[str, List[str]]]:
    def fmt_versions(run: Any) -> str:
        v = run.versions
        keys = [k for k in ("lightning_ntk", "torch", "lightning", "pytorch_lightning", "h5py", "hdf5", "numpy") if k in v]
        return ", ".join(f"{k} {v[k]}" for k in keys)

    def fmt_model(run: Any) -> str:
        m = run.model
        if not m:
            return ""
        return f"{m.get('class', '?')} · {m.get('parameters', '?')} parameters ({m.get('trainable', '?')} trainable)"

    def fmt_tables(run: Any) -> str:
        parts = []
        for name in run.tables:
            view = run[name]
            rows = len(view)
            if view.is_fixed:
                parts.append(f"/{name}: {rows} rows (as of step {view.written_step})" if view.written_step is not None
                             else f"/{name}: not written yet")
            elif rows:
                keys = view[view.key]
                parts.append(f"/{name}: {rows} rows, {view.key} {int(keys[0])}…{int(keys[-1])}")
            else:
                parts.append(f"/{name}: empty")
        return "\n".join(parts)

    def fmt_history(run: Any) -> str:
        return "\n".join(f"{h.get('event', '?')} {h.get('utc', '')}" for h in run.history)

    def size(run: Any) -> str:
        try:
            return f"{os.path.getsize(run.path) / 1e6:.2f} MB"
        except OSError:
            return "?"

    return [
        ("file", [os.path.abspath(r.path) for r in runs]),
        ("size", [size(r) for r in runs]),
        ("created (UTC)", [r.created_utc for r in runs]),
        ("format", [f"lightning_ntk v{r.format_version}" for r in runs]),
        ("written with", [fmt_versions(r) for r in runs]),
        ("history", [fmt_history(r) for r in runs]),
        ("model", [fmt_model(r) for r in runs]),
        ("probes", ["\n".join(f"{p}: {len(r['probe/' + p])} examples" for p in r.probes) for r in runs]),
        ("tables", [fmt_tables(r) for r in runs]),
        ("monitors", ["\n".join(sorted(r.config)) for r in runs]),
    ]


def _latest_values(runs: Sequence[Any]) -> List[Tuple[str, str, List[str]]]:
    """(table, field, [value per run]) of the last complete row of each time-series table."""
    rows: List[Tuple[str, str, List[str]]] = []
    seen: List[Tuple[str, str]] = []
    for run in runs:
        for name in run.tables:
            view = table(run, name)
            if view is None or view.is_fixed or view.row_dim != view.key:
                continue
            for field in view.fields:
                if field in ("wall_time",) or view.group[field].ndim != 1:
                    continue
                if (name, field) not in seen:
                    seen.append((name, field))
    for name, field in seen:
        values = []
        for run in runs:
            view = table(run, name)
            if view is None or field not in view:
                values.append("")
                continue
            value = view.group[field][len(view) - 1]
            values.append(_fmt(value))
        rows.append((name, field, values))
    return rows


def _fmt(value: Any) -> str:
    value = np.asarray(value).item()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
     color:#1d1d1f;padding:0 1rem;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
.sub{color:#666;font-size:.9rem} table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
td,th{border:1px solid #ddd;padding:.25rem .5rem;vertical-align:top;text-align:left;white-space:pre-line}
th{background:#f5f5f7} td.num{text-align:right;font-family:ui-monospace,monospace}
img{max-width:100%;height:auto;display:block;margin:.5rem 0;border:1px solid #eee}
pre{background:#f5f5f7;padding:.5rem;overflow:auto;font-size:.8rem} .error{color:#b00020}
nav a{margin-right:.8rem;font-size:.9rem} details{margin:.3rem 0}
"""


def write_report(run_paths: RunsLike, out_dir: "os.PathLike[str] | str", progress: bool = True, *,
                 labels: Optional[Sequence[str]] = None, title: Optional[str] = None, embed: bool = True,
                 dpi: int = 100, strict: bool = False, stream: Optional[IO[str]] = None) -> str:
    """Write the HTML report of one or several runs into ``out_dir``; returns the page's path.

    Args:
        run_paths: a run file path or :class:`~lightning_ntk.store.Run`, or a list of them
            (overlaid in each figure, labelled by ``labels`` or their file names).
        out_dir: folder for ``report.html`` (created if missing).
        progress: print a counter of the figures rendered to ``stream`` (stderr).
        embed: images inline (base64, one self-contained file); False writes PNG files
            under ``out_dir/figures/`` and links them.
        strict: raise when a figure fails to draw (default: the section shows the error
            and the report goes on).
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"out_dir {out_dir} exists and is not a folder; pass a folder for the report")
    os.makedirs(out_dir, exist_ok=True)
    items = _as_list(run_paths)
    with opened(items) as runs:
        tags = run_labels(runs, labels)
        plan: List[Tuple[Section, str, List[Callable[..., Any]], List[int]]] = []
        for section in SECTIONS:
            for group in instance_groups(runs, section.plots[0].group):
                if section.per_run:
                    for i, run in enumerate(runs):
                        plots = [p for p in section.plots if p.available(run, group)]
                        if plots:
                            plan.append((section, group, plots, [i]))
                else:
                    plots = [p for p in section.plots if any(p.available(run, group) for run in runs)]
                    members = [i for i, run in enumerate(runs) if any(p.available(run, group) for p in plots)]
                    if plots:
                        plan.append((section, group, plots, members))
        counter = _Progress(len(plan), progress, stream)
        figures_dir = os.path.join(out_dir, "figures")
        if not embed:
            os.makedirs(figures_dir, exist_ok=True)
            for stale in os.listdir(figures_dir):  # figures of an earlier report in this folder
                if re.fullmatch(r"\d{2,}-.+\.png", stale):
                    os.remove(os.path.join(figures_dir, stale))
        body: List[str] = []
        current = None
        toc: List[Tuple[str, str]] = []
        for number, (section, group, plots, members) in enumerate(plan):
            if section is not current:
                current = section
                toc.append((section.anchor, section.title))
                body.append(f'<h2 id="{section.anchor}">{html.escape(section.title)}</h2>')
                if section.text:
                    body.append(f'<p class="sub">{html.escape(section.text)}</p>')
            subset = [runs[i] for i in members]
            subset_tags = [tags[i] for i in members]
            caption = section.title
            if group != section.plots[0].group:
                caption += f" (/{group})"
            if section.per_run and len(runs) > 1:
                caption += f" — {subset_tags[0]}"
            fig, axes = _figure(len(plots), section.per_run)
            errors = []
            for plot, ax in zip(plots, axes):
                try:
                    if section.per_run:
                        plot(subset[0], ax=ax, group=group)
                        if len(runs) > 1:
                            ax.set_title(f"{ax.get_title()}\n{subset_tags[0]}", fontsize="medium")
                    else:
                        plot(subset, ax=ax, group=group, labels=subset_tags)
                    if group != plot.group:
                        ax.set_title(f"{ax.get_title()} (/{group})", fontsize="medium")
                except Exception as exc:  # one bad figure must not sink the report
                    if strict:
                        raise
                    errors.append(f"{plot.__name__}: {type(exc).__name__}: {exc}")
                    ax.set_axis_off()
                    ax.text(0.5, 0.5, f"{plot.__name__} failed:\n{exc}", ha="center", va="center", wrap=True,
                            transform=ax.transAxes, fontsize="small", color="#b00020")
                    print(f"report: {plot.__name__} failed: {exc}\n{traceback.format_exc(limit=3)}",
                          file=stream or sys.stderr)
            data = _png(fig, dpi)
            alt = html.escape(caption, quote=True)
            if embed:
                src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            else:
                name = f"{number:02d}-{group.replace('/', '-')}-{section.anchor}" + (
                    f"-{members[0]}" if section.per_run else "") + ".png"
                with open(os.path.join(figures_dir, name), "wb") as handle:
                    handle.write(data)
                src = "figures/" + name
            body.append(f'<figure><img src="{src}" alt="{alt}" title="{alt}"></figure>')
            for error in errors:
                body.append(f'<p class="error">{html.escape(error)}</p>')
            counter.step(caption)
        page = _page(runs, tags, body, toc, title)
    path = os.path.join(out_dir, REPORT_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(page)
    os.replace(tmp, path)
    if progress:
        print(f"report: wrote {path}", file=stream or sys.stderr)
    return path


def _page(runs: Sequence[Any], tags: Sequence[str], body: List[str], toc: List[Tuple[str, str]],
          title: Optional[str]) -> str:
    from .._version import __version__

    esc = html.escape
    title = title or ("lightning_ntk report: " + ", ".join(tags))
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    head = "".join(f"<th>{esc(t)}</th>" for t in tags)
    meta = "".join(f"<tr><th>{esc(name)}</th>" + "".join(f"<td>{esc(v)}</td>" for v in values) + "</tr>"
                   for name, values in _metadata_rows(runs))
    latest = "".join(
        f"<tr><td>/{esc(tbl)}</td><td>{esc(field)}</td>" + "".join(f'<td class="num">{esc(v)}</td>' for v in values)
        + "</tr>" for tbl, field, values in _latest_values(runs))
    configs = "".join(
        f"<details><summary>settings of {esc(tag)}</summary><pre>"
        f"{esc(json.dumps({'config': run.config, 'model': run.model}, indent=2, sort_keys=True, default=str))}"
        "</pre></details>" for run, tag in zip(runs, tags))
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in [("runs", "Runs"), ("latest", "Latest values")] + toc)
    empty = "" if body else '<p class="sub">The run files hold no quantity to draw yet.</p>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="icon" href="data:,">
<style>{_CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="sub">written {esc(now)} by lightning_ntk {esc(__version__)}</p>
<nav>{nav}</nav>
<h2 id="runs">Runs</h2>
<table><tr><th></th>{head}</tr>{meta}</table>
{configs}
<h2 id="latest">Latest values</h2>
<table><tr><th>table</th><th>field</th>{head}</tr>{latest}</table>
{''.join(body)}{empty}
</body></html>
"""
