"""Figures of ``/codes`` (activation codes, He, Lei et al.): how many probe examples share a
linear region (redundancy ratio (N − #unique codes) / N) and how well the codes alone
classify (k-NN under Hamming distance, k = 9; logistic regression; k-means), over training.

Fields are found by name, so every variant the monitor stores is drawn: scalar fields
starting with ``redundancy_ratio`` (``redundancy_ratio_train``, ``redundancy_ratio_heldout``),
containing ``accuracy`` (``knn_accuracy``, ``logistic_accuracy``, ``kmeans_accuracy_hungarian``,
…), and starting with ``code_change_fraction`` (else ``code_change``).
"""
from __future__ import annotations

from typing import Any, List

from ._runs import RunsLike
from .series import available, has_fields, plot_series, union_fields

GROUP = "codes"


@available(has_fields([], prefixes=["redundancy_ratio"]), GROUP)
def plot_code_redundancy(run: RunsLike, ax: Any = None, *, group: str = GROUP, **kw: Any) -> Any:
    """Redundancy ratio of the activation codes over time (one line per stored variant)."""
    return plot_series(run, group, union_fields(run, group, prefixes=["redundancy_ratio"]), ax,
                       ylabel="redundancy ratio", title="Activation-code redundancy", **kw)


@available(has_fields([], contains=["accuracy"]), GROUP)
def plot_code_accuracy(run: RunsLike, ax: Any = None, *, group: str = GROUP, **kw: Any) -> Any:
    """Classification accuracy from the activation codes (k-NN, logistic, k-means) over time."""
    return plot_series(run, group, union_fields(run, group, contains=["accuracy"]), ax, ylabel="accuracy",
                       title="Categorization from activation codes", **kw)


def _change_fields(run: RunsLike, group: str) -> List[str]:
    return union_fields(run, group, prefixes=["code_change_fraction"]) or union_fields(
        run, group, prefixes=["code_change"])


@available(has_fields([], prefixes=["code_change"]), GROUP)
def plot_code_change(run: RunsLike, ax: Any = None, *, group: str = GROUP, **kw: Any) -> Any:
    """Fraction of the probe's codes that changed since the previous snapshot, over time."""
    return plot_series(run, group, _change_fields(run, group), ax, ylabel="fraction of codes changed",
                       title="Activation-code change", **kw)


__all__ = ["plot_code_accuracy", "plot_code_change", "plot_code_redundancy"]
