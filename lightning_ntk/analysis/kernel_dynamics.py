"""Kernel dynamics over every snapshot of a run file, recomputed post hoc from what
:class:`~lightning_ntk.callbacks.NTKMonitor` stored.

The array functions live in :mod:`lightning_ntk.spectral`; these helpers read a
:class:`~lightning_ntk.store.Run` (or a path), walk its NTK table and apply them to each
snapshot, so a user can recompute a measurement with other settings (another k, another ε,
a probe split) without training again.

* :func:`eigenspace_tracking` needs only the stored eigenvectors (always stored);
* :func:`kernel_dynamics` needs the stored kernels (``NTKMonitor(store_kernel=True)``, the
  default for ``kind="trace"``/``"pseudo"`` up to N = 1024).

Rows whose kernel was not finite (``finite`` False: a diverged snapshot) are skipped.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

from .. import spectral
from .._args import fraction
from ..store import Run, TableView
from ._runs import RunLike, opened, table


class EigenspaceTracking(NamedTuple):
    """Per snapshot: overlap of the top-k eigenspace with the previous snapshot's (NaN at
    the first) and with the first snapshot's (:func:`lightning_ntk.spectral.subspace_overlap`)."""

    step: np.ndarray
    epoch: np.ndarray
    overlap_to_prev: np.ndarray
    overlap_to_init: np.ndarray
    k: int


class KernelDynamics(NamedTuple):
    """Per-snapshot measurements recomputed from the stored kernels (arrays over T snapshots).

    distance_to_init / distance_to_prev / velocity: Fort et al. (2020), S(K, K') = 1 −
    ⟨K, K'⟩_F / (‖K‖_F ‖K'‖_F), velocity = distance to the previous snapshot per epoch;
    kernel_target_alignment(_centered): Cristianini et al. / Cortes et al.;
    target_energy (T, k): Kopitkov & Indelman (2020) energy curve of the one-hot targets
    over the top k eigenvectors; krr_accuracy / krr_mse: kernel regression (Lee et al. 2020) trained on the
    probe's ``train_index`` examples and tested on the others, with this snapshot's kernel.
    """

    step: np.ndarray
    epoch: np.ndarray
    distance_to_init: np.ndarray
    distance_to_prev: np.ndarray
    velocity: np.ndarray
    kernel_target_alignment: np.ndarray
    kernel_target_alignment_centered: np.ndarray
    target_energy: np.ndarray
    krr_accuracy: np.ndarray
    krr_mse: np.ndarray
    train_index: np.ndarray
    test_index: np.ndarray
    k: int


def _ntk_view(run: Run, group: str) -> TableView:
    view = table(run, group)
    if view is None or "eigvecs" not in view:
        raise KeyError(
            f"{run.path} has no NTK table {group!r} with eigenvectors (tables: {run.tables}); "
            f"pass group= the name NTKMonitor wrote (e.g. 'ntk_<name>')"
        )
    if len(view) == 0:
        raise ValueError(f"{run.path}: table {group!r} holds no snapshot yet")
    return view


def _finite_rows(view: TableView) -> np.ndarray:
    if "finite" in view:
        return np.flatnonzero(np.asarray(view["finite"], dtype=bool))
    return np.arange(len(view))


def _epochs(view: TableView, rows: np.ndarray) -> np.ndarray:
    if "epoch" in view:
        return np.asarray(view["epoch"], dtype=np.float64)[rows]
    return np.full(rows.size, np.nan)


def eigenspace_tracking(run: RunLike, group: str = "ntk", k: Optional[int] = None) -> EigenspaceTracking:
    """Top-k eigenspace overlap between consecutive snapshots and to the first snapshot.

    ``k``: eigenvectors compared (default: all stored). The overlap ‖U_aᵀ U_b‖_F² / k is 1
    when the spans agree whatever the rotation inside them, 0 when orthogonal.
    """
    with opened(run) as (run,):
        view = _ntk_view(run, group)
        rows = _finite_rows(view)
        if rows.size == 0:
            raise ValueError(f"{run.path}: every snapshot of {group!r} has a non-finite kernel")
        U = np.asarray(view["eigvecs"], dtype=np.float64)[rows]
        k = spectral._check_k(k, U.shape[2], owner="eigenspace_tracking")
        to_prev = np.full(rows.size, np.nan)
        to_init = np.empty(rows.size)
        for t in range(rows.size):
            to_init[t] = spectral.subspace_overlap(U[0], U[t], k)
            if t > 0:
                to_prev[t] = spectral.subspace_overlap(U[t - 1], U[t], k)
        step = np.asarray(view["step"], dtype=np.int64)[rows]
        return EigenspaceTracking(step, _epochs(view, rows), to_prev, to_init, k)


def _split_probe(labels: np.ndarray, test_fraction: float, seed: int) -> tuple:
    """A stratified split of probe positions into (train, test) position arrays."""
    test_fraction = fraction(float(test_fraction), "test_fraction", "kernel_dynamics")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * where.size))
        if where.size >= 2:
            n_test = min(max(n_test, 1), where.size - 1)
        else:
            n_test = 0
        test.extend(rng.permutation(where)[:n_test].tolist())
    test_index = np.sort(np.asarray(test, dtype=np.int64))
    train_index = np.setdiff1d(np.arange(labels.size), test_index)
    if test_index.size == 0 or train_index.size == 0:
        raise ValueError(f"a probe of {labels.size} examples is too small to split with test_fraction={test_fraction}")
    return train_index, test_index


def kernel_dynamics(run: RunLike, group: str = "ntk", *, k: int = 10, eps: float = 1e-4,
                    test_fraction: float = 0.25, seed: int = 0,
                    ks: Optional[Sequence[int]] = None) -> KernelDynamics:
    """Recompute distance, velocity, alignment, target energy and a probe-split kernel
    regression for every finite snapshot of the NTK table ``group`` (stored kernels needed).

    ``k``: eigenvectors for the energy curves (recomputed from each kernel in float64);
    ``eps``: the kernel regression's diagonal regulariser ε·tr(K)/n;
    ``test_fraction``/``seed``: the stratified split of the probe into regression training
    and test examples (classification probes; the same split for every snapshot, so the
    numbers compare the kernels only). ``ks`` (1-based): return the energy curves at these k
    only (default: 1..k).
    """
    with opened(run) as (run,):
        view = _ntk_view(run, group)
        if "kernel" not in view:
            raise ValueError(
                f"{run.path}: table {group!r} stores no kernels; train with NTKMonitor(store_kernel=True) "
                f"to recompute dynamics post hoc (the online scalars are in run[{group!r}])"
            )
        probe_name = view.attrs.get("probe") or "train"
        y = np.asarray(run.probe(probe_name)["y"])
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"probe {probe_name!r} holds no class labels (shape {y.shape}, {y.dtype}); "
                             "kernel_dynamics needs a classification probe")
        rows = _finite_rows(view)
        if rows.size == 0:
            raise ValueError(f"{run.path}: every snapshot of {group!r} has a non-finite kernel")
        kernels = view.group["kernel"]
        epochs = _epochs(view, rows)
        first = np.asarray(kernels[int(rows[0])], dtype=np.float64)
        num_classes = int(max(int(y.max()) + 1, first.shape[-1] if first.ndim > 2 else 0))
        train_index, test_index = _split_probe(y, test_fraction, seed)
        T = rows.size
        out = {name: np.full(T, np.nan) for name in (
            "distance_to_init", "distance_to_prev", "velocity", "kernel_target_alignment",
            "kernel_target_alignment_centered", "krr_accuracy", "krr_mse")}
        curves = []
        k_used = 0
        prev = None
        for t, row in enumerate(rows):
            K = first if t == 0 else np.asarray(kernels[int(row)], dtype=np.float64)
            out["distance_to_init"][t] = spectral.kernel_distance(first, K)
            if prev is not None:
                out["distance_to_prev"][t] = spectral.kernel_distance(prev, K)
                dt = epochs[t] - epochs[t - 1]
                if dt > 0:
                    out["velocity"][t] = out["distance_to_prev"][t] / dt
            out["kernel_target_alignment"][t] = spectral.kernel_target_alignment(K, y, num_classes=num_classes)
            out["kernel_target_alignment_centered"][t] = spectral.kernel_target_alignment(
                K, y, centered=True, num_classes=num_classes)
            eig = spectral.top_eigenpairs(K, k)
            k_used = eig.eigvecs.shape[1]
            curves.append(spectral.target_energy(eig.eigvecs, y, ks, num_classes=num_classes))
            K_train = K[np.ix_(train_index, train_index)]
            K_test = K[np.ix_(test_index, train_index)]
            try:
                scores = spectral.kernel_regression_scores(K_train, y[train_index], K_test, y[test_index], eps=eps,
                                                           num_classes=num_classes)
                out["krr_accuracy"][t], out["krr_mse"][t] = scores.accuracy, scores.mse
            except ValueError as err:  # not positive definite at this ε: NaN, as in kernel_regression_sweep
                if not isinstance(err.__cause__, np.linalg.LinAlgError):
                    raise
            prev = K
        step = np.asarray(view["step"], dtype=np.int64)[rows]
        return KernelDynamics(step=step, epoch=epochs, target_energy=np.stack(curves),
                              train_index=train_index, test_index=test_index, k=k_used,
                              **out)
