"""Figures of ``/probe_metrics`` (ProbeMetricsMonitor): loss, accuracy and gradient norm on
the probe set over training."""
from __future__ import annotations

from typing import Any

from ._runs import RunsLike
from .series import available, has_fields, plot_series

GROUP = "probe_metrics"


@available(has_fields(["loss"]), GROUP)
def plot_probe_loss(run: RunsLike, ax: Any = None, *, group: str = GROUP, logy: bool = True, **kw: Any) -> Any:
    """Mean per-example loss on the probe (eval mode) over training; log scale by default."""
    return plot_series(run, group, ["loss"], ax, logy=logy, ylabel="probe loss", title="Probe loss", **kw)


@available(has_fields(["accuracy"]), GROUP)
def plot_probe_accuracy(run: RunsLike, ax: Any = None, *, group: str = GROUP, **kw: Any) -> Any:
    """Argmax accuracy on the probe over training."""
    return plot_series(run, group, ["accuracy"], ax, ylabel="probe accuracy", title="Probe accuracy", **kw)


@available(has_fields(["grad_norm"]), GROUP)
def plot_grad_norm(run: RunsLike, ax: Any = None, *, group: str = GROUP, logy: bool = True, **kw: Any) -> Any:
    """‖∇θ L‖₂ of the probe loss over training; log scale by default."""
    return plot_series(run, group, ["grad_norm"], ax, logy=logy, ylabel="‖∇θ L‖₂",
                       title="Gradient norm on the probe", **kw)
