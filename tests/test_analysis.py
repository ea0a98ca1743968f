"""Post-hoc analysis: figures hold the file's numbers, the report shows what the file holds,
exports round-trip, ``watch`` follows a training in another process.

The run files here are written with the store API (every group the monitors write, with
known random values) and read back with plain h5py for the expected values.
"""
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lightning_ntk.analysis import (  # noqa: E402
    ExportError,
    export_run,
    plot_cartography,
    plot_code_accuracy,
    plot_code_change,
    plot_code_redundancy,
    plot_eigen_energy,
    plot_eigenfunctions,
    plot_forgetting_histogram,
    plot_hessian_density,
    plot_hessian_trace,
    plot_kernel_alignment,
    plot_kernel_distance,
    plot_kernel_matrix,
    plot_kernel_velocity,
    plot_layer_trace,
    plot_ntk_eigenvalues,
    plot_probe_accuracy,
    plot_probe_loss,
    plot_representation_accuracy,
    plot_series,
    plot_sharpness,
    watch,
    write_report,
)
from lightning_ntk.analysis.report import SECTIONS  # noqa: E402
from lightning_ntk.cli import main  # noqa: E402
from lightning_ntk.store import Field, RunStore, open_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, C, K, L, T = 24, 3, 5, 3, 6
LAYERS = ["features.0", "features.2", "head.1"]


# ---------------------------------------------------------------------------------------------------------- files
EVERY_GROUP = ("probe_metrics", "ntk", "sharpness", "forgetting", "codes", "representations", "landscape", "analytic")


def write_full_run(path, seed=0, groups=EVERY_GROUP,
                   eos=True, write_examples=True, rows=T):
    """A run file holding every group the monitors write, with seeded random values."""
    rng = np.random.default_rng(seed)
    store = RunStore.acquire(path, owner="synthetic", overwrite=True)
    try:
        store.set_config("synthetic", {"seed": seed, "groups": list(groups)})
        store.set_model_summary({"class": "Synthetic", "module": "tests", "parameters": 1234, "trainable": 1000,
                                 "layers": [[n, "Linear", 10] for n in LAYERS]})
        index = np.sort(rng.choice(1000, N, replace=False)).astype(np.int64)
        y = rng.permutation(np.arange(N) % C).astype(np.int64)
        store.write_static("probe/train", "index", index, ("probe_example",), coords={"probe_example": index})
        store.write_static("probe/train", "y", y, ("probe_example",), coords={"probe_example": index})
        base = [Field("step", (), "int64"), Field("epoch"), Field("wall_time")]
        tables = {}
        if "probe_metrics" in groups:
            tables["probe_metrics"] = store.declare_table("probe_metrics", base + [
                Field("loss"), Field("accuracy"), Field("grad_norm"),
                Field("example_loss", (N,), "float32", dims=("probe_example",)),
                Field("logits", (N, C), "float32", dims=("probe_example", "output"))],
                coords={"probe_example": index}, attrs={"probe": "train"})
        if "ntk" in groups:
            tables["ntk"] = store.declare_table("ntk", base + [
                Field("eigvals", (K,), dims=("eigen",)), Field("eigvecs", (N, K), "float32", dims=("eigvec_row", "eigen")),
                Field("trace"), Field("frobenius"), Field("effective_rank"), Field("distance_to_init"),
                Field("distance_to_prev"), Field("velocity"), Field("kernel_target_alignment"),
                Field("kernel_target_alignment_centered"),
                Field("target_energy", (K,), dims=("eigen",)), Field("output_energy", (K,), dims=("eigen",)),
                Field("residual_energy", (K,), dims=("eigen",)), Field("krr_accuracy"), Field("krr_mse"),
                Field("layer_trace", (L,), dims=("layer",)),
                Field("kernel", (N, N), "float32", dims=("probe_i", "probe_j"))],
                coords={"eigen": np.arange(1, K + 1), "layer": np.arange(L)},
                attrs={"probe": "train", "kind": "trace", "layers": LAYERS,
                       "target_energy_constant": float(((np.bincount(y) / N) ** 2).sum())})
        if "sharpness" in groups:
            tables["sharpness"] = store.declare_table("sharpness", base + [
                Field("lr"), Field("eigvals", (3,), dims=("k",)), Field("residuals", (3,), dims=("k",)),
                Field("n_hvp", (), "int64"), Field("trace"), Field("trace_stderr")]
                + ([Field("eos_threshold")] if eos else [])
                + [Field("density_nodes", (2, 8), dims=("slq_run", "node")),
                   Field("density_weights", (2, 8), dims=("slq_run", "node"))])
        if "forgetting" in groups:
            tables["events"] = store.declare_table("forgetting/events", [
                Field("step", (), "int64"), Field("index", (), "int64"), Field("correct", (), "bool"),
                Field("loss"), Field("margin"), Field("p_true")], row_dim="event")
            examples = store.declare_fixed_table("forgetting/examples", [
                Field("presentations", (), "int64"), Field("forgetting_count", (), "int64"),
                Field("learning_count", (), "int64"), Field("first_learned_step", (), "int64"),
                Field("never_learned", (), "bool"), Field("unforgettable", (), "bool"),
                Field("confidence"), Field("variability"), Field("correctness")], 40, row_dim="example",
                coords={"example": np.arange(100, 140)})
        if "codes" in groups:
            tables["codes"] = store.declare_table("codes", base + [
                Field("n_units", (), "int64"), Field("redundancy_ratio_train"), Field("redundancy_ratio_heldout"),
                Field("knn_accuracy"), Field("logistic_accuracy"), Field("kmeans_accuracy_hungarian"),
                Field("code_change_fraction_train"), Field("code_change_hamming_train")])
        if "representations" in groups:
            tables["representations"] = store.declare_table("representations", base + [
                Field("n_features", (), "int64"), Field("few_shot_5way_1shot_euclidean"),
                Field("few_shot_5way_1shot_euclidean_ci95"), Field("linear_probe_accuracy")])
        if "probe_metrics_heldout" in groups:
            tables["probe_metrics_heldout"] = store.declare_table("probe_metrics_heldout", base + [
                Field("loss"), Field("accuracy"), Field("grad_norm")])
        store.start_swmr()
        steps = np.arange(rows) * 5
        for t, step in enumerate(steps):
            common = {"step": step, "epoch": step / 10.0, "wall_time": 1.7e9 + 3.0 * t}
            if "probe_metrics" in tables:
                tables["probe_metrics"].append(common, loss=2.0 / (t + 1), accuracy=min(1.0, 0.3 + 0.1 * t),
                                               grad_norm=rng.uniform(0.5, 2), example_loss=rng.uniform(0, 3, N),
                                               logits=rng.normal(size=(N, C)))
            if "ntk" in tables:
                vecs = np.linalg.qr(rng.normal(size=(N, K)))[0]
                tables["ntk"].append(
                    common, eigvals=np.sort(rng.uniform(0.01, 100, K))[::-1], eigvecs=vecs,
                    trace=rng.uniform(100, 200), frobenius=rng.uniform(50, 100), effective_rank=rng.uniform(1, 5),
                    distance_to_init=0.1 * t, distance_to_prev=np.nan if t == 0 else rng.uniform(0, 0.1),
                    velocity=np.nan if t == 0 else rng.uniform(0, 1), kernel_target_alignment=rng.uniform(0, 1),
                    kernel_target_alignment_centered=rng.uniform(0, 1),
                    target_energy=np.sort(rng.uniform(0, 1, K)), output_energy=np.sort(rng.uniform(0, 1, K)),
                    residual_energy=np.sort(rng.uniform(0, 1, K)), krr_accuracy=rng.uniform(0, 1),
                    krr_mse=rng.uniform(0, 1), layer_trace=rng.uniform(1, 50, L),
                    kernel=(lambda a: a @ a.T)(rng.normal(size=(N, 4))))
            if "sharpness" in tables:
                lr = 0.1 if t < 3 else 0.05
                row = dict(common, lr=lr, eigvals=np.sort(rng.uniform(1, 30, 3))[::-1],
                           residuals=rng.uniform(0, 1e-3, 3), n_hvp=40, trace=rng.uniform(50, 100),
                           trace_stderr=rng.uniform(1, 5), density_nodes=rng.normal(size=(2, 8)) * 5,
                           density_weights=rng.dirichlet(np.ones(8), size=2))
                if eos:
                    row["eos_threshold"] = 2 * 1.9 / lr  # heavy-ball β = 0.9: (2 + 2β)/η
                tables["sharpness"].append(row)
            if "codes" in tables:
                tables["codes"].append(common, n_units=200, redundancy_ratio_train=rng.uniform(0, 0.5),
                                       redundancy_ratio_heldout=rng.uniform(0, 0.5), knn_accuracy=rng.uniform(0, 1),
                                       logistic_accuracy=rng.uniform(0, 1), kmeans_accuracy_hungarian=rng.uniform(0, 1),
                                       code_change_fraction_train=rng.uniform(0, 0.2),
                                       code_change_hamming_train=rng.uniform(0, 20))
            if "representations" in tables:
                tables["representations"].append(common, n_features=64, few_shot_5way_1shot_euclidean=rng.uniform(0, 1),
                                                  few_shot_5way_1shot_euclidean_ci95=rng.uniform(0, 0.05),
                                                  linear_probe_accuracy=rng.uniform(0, 1))
            if "probe_metrics_heldout" in tables:
                tables["probe_metrics_heldout"].append(common, loss=3.0 / (t + 1), accuracy=0.2 + 0.05 * t,
                                                       grad_norm=rng.uniform(0.5, 2))
            if "events" in tables:
                n_ev = 7
                tables["events"].extend({"step": np.full(n_ev, step), "index": rng.integers(100, 140, n_ev),
                                         "correct": rng.random(n_ev) < 0.6, "loss": rng.uniform(0, 3, n_ev),
                                         "margin": rng.normal(size=n_ev), "p_true": rng.uniform(0, 1, n_ev)})
            store.flush()
        if "forgetting" in groups and write_examples:
            fc = rng.integers(0, 5, 40)
            never = np.zeros(40, bool)
            never[:6] = True
            fc[never] = 0
            conf = rng.uniform(0, 1, 40)
            conf[7] = np.nan  # no completed epoch
            examples.write({"presentations": rng.integers(1, 10, 40), "forgetting_count": fc,
                            "learning_count": fc + (~never), "first_learned_step": np.where(never, -1, 3),
                            "never_learned": never, "unforgettable": (fc == 0) & ~never, "confidence": conf,
                            "variability": rng.uniform(0, 0.5, 40), "correctness": rng.uniform(0, 1, 40)},
                           step=int(steps[-1]))
            store.flush()
    finally:
        store.release("synthetic")
    if "landscape" in groups:  # written after training, as spawn_children does
        write_synthetic_landscape(path, rng)
    if "analytic" in groups:  # recorded after training, as record_analytic_kernels does
        write_synthetic_analytic(path, rng)
    return path


def write_synthetic_analytic(path, rng):
    """/analytic/train: the analytic kernels of a small MLP on random probe inputs (the file stores no x)."""
    import torch
    from torch import nn

    from lightning_ntk import record_analytic_kernels

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, C))
    record_analytic_kernels(path, net, x=torch.as_tensor(rng.normal(size=(N, 4))), weight_var=1.0, bias_var=0.1)


def write_synthetic_landscape(path, rng, spawn_steps=(0, 5, 20), points=5, children=3):
    """/landscape/... tables of `children` children per spawn step, seeded random values."""
    from lightning_ntk.landscape_records import (
        CHILDREN,
        LINEARIZED,
        PAIRS,
        SLICES,
        LandscapeRows,
        child_fields,
        linearized_fields,
        pair_fields,
        slice_fields,
        write_landscape,
    )

    pairs = [(a, b) for a in range(children) for b in range(a + 1, children)]
    S, P = len(spawn_steps), len(pairs)
    step_p, step_c = np.repeat(spawn_steps, P), np.repeat(spawn_steps, children)
    settings = {"points": points, "kernel": "trace", "eval_set": "validation", "probe_size": 16, "task": "multiclass"}
    tables = [
        LandscapeRows(PAIRS, pair_fields(points), {
            "spawn_step": step_p, "spawn_epoch": step_p / 10.0, "trained_to": np.full(S * P, 40),
            "child_a": np.tile([a for a, _ in pairs], S), "child_b": np.tile([b for _, b in pairs], S),
            "seed_a": np.zeros(S * P), "seed_b": np.ones(S * P), "error_barrier": rng.uniform(0, 0.3, S * P),
            "loss_barrier": rng.uniform(0, 1, S * P), "weight_distance": rng.uniform(1, 5, S * P),
            "disagreement": rng.uniform(0, 0.2, S * P), "kernel_distance": rng.uniform(0, 0.1, S * P),
            "path_error": rng.uniform(0, 0.5, (S * P, points)), "path_loss": rng.uniform(0, 2, (S * P, points))},
            key="spawn_step", row_dim="pair", settings=settings),
        LandscapeRows(CHILDREN, child_fields(), {
            "spawn_step": step_c, "spawn_epoch": step_c / 10.0, "trained_to": np.full(S * children, 40),
            "child": np.tile(np.arange(children), S), "seed": np.arange(S * children), "error": rng.uniform(0, 0.2, S * children),
            "loss": rng.uniform(0, 1, S * children), "distance_to_parent": rng.uniform(1, 5, S * children),
            "kernel_distance_to_parent": rng.uniform(0, 0.3, S * children), "parent_norm": np.full(S * children, 10.0)},
            key="spawn_step", row_dim="child_row", settings=settings),
        LandscapeRows(LINEARIZED, linearized_fields(), {
            "step": np.asarray(spawn_steps), "epoch": np.asarray(spawn_steps) / 10.0, "trained_to": np.full(S, 40),
            "seed": np.zeros(S), "linear_error": rng.uniform(0, 0.5, S), "linear_loss": rng.uniform(0, 2, S),
            "real_error": rng.uniform(0, 0.2, S), "real_loss": rng.uniform(0, 1, S),
            "parent_error": rng.uniform(0, 0.9, S), "parent_loss": rng.uniform(0, 2, S)},
            key="step", row_dim="step", settings={"eval_set": "validation", "task": "multiclass"}),
        LandscapeRows(SLICES, slice_fields(7), {
            "step": np.asarray(spawn_steps), "epoch": np.asarray(spawn_steps) / 10.0,
            "loss": rng.uniform(0, 3, (S, 7)), "error": rng.uniform(0, 1, (S, 7))},
            key="step", row_dim="step", coords={"coordinate": np.linspace(-1, 1, 7)},
            settings={"eval_set": "validation", "task": "multiclass"}),
    ]
    write_landscape(path, tables)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return write_full_run(str(tmp_path_factory.mktemp("full") / "full.h5"))


@pytest.fixture(scope="module")
def second_run(tmp_path_factory):
    return write_full_run(str(tmp_path_factory.mktemp("second") / "second.h5"), seed=1)


@pytest.fixture(scope="module")
def probe_only_run(tmp_path_factory):
    """What the demo writes today: probe metrics only (and a fixed table never written)."""
    return write_full_run(str(tmp_path_factory.mktemp("partial") / "partial.h5"), groups=("probe_metrics", "forgetting"),
                          write_examples=False)


def h5(path, name):
    with h5py.File(path, "r") as f:
        return f[name][()]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def lines_by_gid(ax):
    return {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}


# ---------------------------------------------------------------------------------------------------------- plots
def test_eigenvalue_lines_equal_the_files_eigenvalues(full_run):
    ax = plot_ntk_eigenvalues(full_run)
    eig, step = h5(full_run, "ntk/eigvals"), h5(full_run, "ntk/step")
    lines = lines_by_gid(ax)
    assert sorted(lines) == sorted(f"full:eigvals[{i}]" for i in range(K))
    for i in range(K):
        np.testing.assert_array_equal(lines[f"full:eigvals[{i}]"].get_xdata(), step)
        np.testing.assert_array_equal(lines[f"full:eigvals[{i}]"].get_ydata(), eig[:, i])
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"λ{i + 1}" for i in range(K)]


def test_x_axis_epoch_and_a_run_object(full_run):
    with open_run(full_run) as run:
        ax = plot_probe_loss(run, x="epoch")
        assert run.file.id.valid  # a Run passed in stays open
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), h5(full_run, "probe_metrics/epoch"))
    np.testing.assert_array_equal(line.get_ydata(), h5(full_run, "probe_metrics/loss"))
    assert ax.get_xlabel() == "epoch"
    with pytest.raises(ValueError, match="x must be one of"):
        plot_probe_loss(full_run, x="time")


def test_sharpness_plot_draws_the_files_eos_threshold(full_run):
    ax = plot_sharpness(full_run)
    lines = lines_by_gid(ax)
    np.testing.assert_array_equal(lines["full:eos_threshold"].get_ydata(), h5(full_run, "sharpness/eos_threshold"))
    np.testing.assert_array_equal(lines["full:eos_threshold"].get_xdata(), h5(full_run, "sharpness/step"))
    eig = h5(full_run, "sharpness/eigvals")
    for i in range(3):
        np.testing.assert_array_equal(lines[f"full:eigvals[{i}]"].get_ydata(), eig[:, i])
    assert "2/η" in lines["full:eos_threshold"].get_label()


def test_sharpness_without_threshold_uses_two_over_lr(tmp_path):
    path = write_full_run(str(tmp_path / "noeos.h5"), groups=("sharpness",), eos=False)
    lines = lines_by_gid(plot_sharpness(path))
    lr = h5(path, "sharpness/lr")
    np.testing.assert_allclose(lines["noeos:eos_threshold"].get_ydata(), [2 / v for v in lr], rtol=1e-15)
    assert "plain GD" in lines["noeos:eos_threshold"].get_label()


def test_hessian_trace_error_bars_are_one_standard_error(full_run):
    ax = plot_hessian_trace(full_run)
    (container,) = ax.containers
    trace, se, step = h5(full_run, "sharpness/trace"), h5(full_run, "sharpness/trace_stderr"), h5(full_run, "sharpness/step")
    data_line, _caps, (bars,) = container.lines
    np.testing.assert_array_equal(data_line.get_ydata(), trace)
    segments = np.asarray(bars.get_segments())  # (T, 2, 2): [[x, y - se], [x, y + se]]
    np.testing.assert_allclose(segments[:, 0, 0], step)
    np.testing.assert_allclose(segments[:, 0, 1], trace - se, rtol=1e-12)
    np.testing.assert_allclose(segments[:, 1, 1], trace + se, rtol=1e-12)


def test_spectral_density_is_the_gaussian_mixture_of_the_nodes(full_run):
    sigma = 0.7
    ax = plot_hessian_density(full_run, snapshots=[0, -1], sigma=sigma, logy=False)
    nodes, weights, step = h5(full_run, "sharpness/density_nodes"), h5(full_run, "sharpness/density_weights"), \
        h5(full_run, "sharpness/step")
    lines = lines_by_gid(ax)
    assert sorted(lines) == ["full:density[0]", f"full:density[{T - 1}]"]
    for row in (0, T - 1):
        line = lines[f"full:density[{row}]"]
        grid = np.asarray(line.get_xdata())
        # mean over the 2 SLQ runs of sum_j w_j N(t; theta_j, sigma^2), written out by hand
        expected = np.zeros_like(grid)
        for r in range(2):
            for j in range(8):
                theta, w = nodes[row, r, j], weights[row, r, j]
                expected += 0.5 * w * np.exp(-(grid - theta) ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-12, atol=1e-300)
        assert line.get_label() == f"step {step[row]}"
        area = np.sum(np.asarray(line.get_ydata())[:-1] * np.diff(grid))
        assert area == pytest.approx(1.0, abs=0.01)  # the grid spans all nodes with room: a density
    # default width: 1% of the snapshot's node range
    (line,) = plot_hessian_density(full_run, snapshots=[1], logy=False).get_lines()
    grid, sigma = np.asarray(line.get_xdata()), 0.01 * (nodes[1].max() - nodes[1].min())
    expected = sum(0.5 * w * np.exp(-(grid - theta) ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
                   for theta, w in zip(nodes[1].ravel(), weights[1].ravel()))
    np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-12, atol=1e-300)
    assert np.sum(np.asarray(line.get_ydata())[:-1] * np.diff(grid)) == pytest.approx(1.0, abs=0.01)


def test_forgetting_histogram_counts_equal_bincount(full_run):
    ax = plot_forgetting_histogram(full_run)
    fc = h5(full_run, "forgetting/examples/forgetting_count")
    never = h5(full_run, "forgetting/examples/never_learned")
    learned_bars, never_bars = ax.containers
    learned = np.array([p.get_height() for p in learned_bars])
    assert never.any() and never.sum() < len(never)  # the fixture holds both kinds
    # learned examples per count; the never-learned ones (count 0, never correct) are not
    # on the 0 bar (it would read as unforgettable) but a bar of their own, after the counts
    np.testing.assert_array_equal(learned, np.bincount(fc[~never], minlength=fc.max() + 1))
    (bar,) = never_bars
    assert bar.get_height() == never.sum()
    np.testing.assert_allclose([p.get_x() + p.get_width() / 2 for p in learned_bars], np.arange(len(learned)))
    assert bar.get_x() + bar.get_width() / 2 == pytest.approx(fc.max() + 2)
    assert ax.get_xticklabels()[-1].get_text() == "never\nlearned"


def test_cartography_points_are_variability_confidence_correctness(full_run):
    ax = plot_cartography(full_run)
    (scatter,) = ax.collections
    conf = h5(full_run, "forgetting/examples/confidence")
    var = h5(full_run, "forgetting/examples/variability")
    corr = h5(full_run, "forgetting/examples/correctness")
    ok = np.isfinite(conf)
    assert (~ok).sum() == 1
    np.testing.assert_array_equal(scatter.get_offsets(), np.column_stack([var[ok], conf[ok]]))
    np.testing.assert_array_equal(scatter.get_array(), corr[ok])
    assert ax.get_xlabel().startswith("variability") and ax.get_ylabel().startswith("confidence")


def test_eigenfunction_heatmap_rows_sorted_by_label(full_run):
    ax = plot_eigenfunctions(full_run)
    (image,) = ax.images
    vecs = h5(full_run, "ntk/eigvecs")[-1]
    y = h5(full_run, "probe/train/y")
    order = np.argsort(y, kind="stable")
    np.testing.assert_array_equal(np.asarray(image.get_array()), vecs[order])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    first = plot_eigenfunctions(full_run, snapshot=0, k=2).images[0]
    np.testing.assert_array_equal(np.asarray(first.get_array()), h5(full_run, "ntk/eigvecs")[0][order][:, :2])
    with pytest.raises(IndexError, match="out of range"):
        plot_eigenfunctions(full_run, snapshot=T)


def test_kernel_matrix_sorted_by_label(full_run):
    (image,) = plot_kernel_matrix(full_run, snapshot=2).images
    kernel = h5(full_run, "ntk/kernel")[2]
    order = np.argsort(h5(full_run, "probe/train/y"), kind="stable")
    np.testing.assert_array_equal(np.asarray(image.get_array()), [[kernel[i, j] for j in order] for i in order])


def test_eigenfunctions_of_a_full_kernel_show_the_norm_over_outputs(tmp_path):
    """kind="full": M = N*C rows, example-major (row n*C + c); each example shows ‖U[n, :, j]‖."""
    path = str(tmp_path / "fullkind.h5")
    rng = np.random.default_rng(5)
    y = np.arange(N) % C
    vecs = rng.normal(size=(N * C, K))
    store = RunStore.acquire(path, owner="t", overwrite=True)
    try:
        store.write_static("probe/p", "index", np.arange(N), ("probe_example",), coords={"probe_example": np.arange(N)})
        store.write_static("probe/p", "y", y, ("probe_example",), coords={"probe_example": np.arange(N)})
        table = store.declare_table("ntk", [Field("step", (), "int64"), Field("eigvecs", (N * C, K),
                                                                              dims=("eigvec_row", "eigen"))],
                                    attrs={"probe": "p", "kind": "full"})
        table.append(step=3, eigvecs=vecs)
        store.flush()
    finally:
        store.release("t")
    image = plot_eigenfunctions(path).images[0]
    expected = np.array([[math.sqrt(sum(vecs[n * C + c, j] ** 2 for c in range(C))) for j in range(K)]
                         for n in np.argsort(y, kind="stable")])
    np.testing.assert_allclose(np.asarray(image.get_array()), expected, rtol=1e-12)


def test_wall_time_axis_starts_at_zero(full_run):
    (line,) = plot_probe_accuracy(full_run, x="wall_time").get_lines()
    np.testing.assert_allclose(line.get_xdata(), 3.0 * np.arange(T))


def test_energy_distance_velocity_layers_codes(full_run):
    step = h5(full_run, "ntk/step")
    lines = lines_by_gid(plot_eigen_energy(full_run))
    np.testing.assert_array_equal(lines[f"full:target_energy[{K - 1}]"].get_ydata(), h5(full_run, "ntk/target_energy")[:, -1])
    np.testing.assert_array_equal(lines[f"full:output_energy[{K - 1}]"].get_ydata(), h5(full_run, "ntk/output_energy")[:, -1])
    lines = lines_by_gid(plot_eigen_energy(full_run, k=2))
    np.testing.assert_array_equal(lines["full:target_energy[1]"].get_ydata(), h5(full_run, "ntk/target_energy")[:, 1])
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\]"):
        plot_eigen_energy(full_run, k=9)
    # baselines: k/M for a random k-subspace of the M = N eigenvector rows, and the balanced
    # one-hot targets' share 1/C in the constant direction
    np.testing.assert_allclose(lines["full:baseline_random"].get_ydata(), 2 / N)
    np.testing.assert_allclose(lines["full:baseline_constant"].get_ydata(), 1 / C)
    assert "full:baseline_random" not in lines_by_gid(plot_eigen_energy(full_run, baselines=False))
    lines = lines_by_gid(plot_kernel_distance(full_run))
    np.testing.assert_array_equal(lines["full:distance_to_init"].get_ydata(), h5(full_run, "ntk/distance_to_init"))
    np.testing.assert_array_equal(lines["full:distance_to_prev"].get_xdata(), step)
    lines = lines_by_gid(plot_kernel_velocity(full_run))
    np.testing.assert_array_equal(lines["full:velocity"].get_ydata(), h5(full_run, "ntk/velocity"))
    ax = plot_layer_trace(full_run)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == LAYERS
    np.testing.assert_array_equal(lines_by_gid(ax)["full:layer_trace[2]"].get_ydata(), h5(full_run, "ntk/layer_trace")[:, 2])
    lines = lines_by_gid(plot_code_redundancy(full_run))
    assert sorted(lines) == ["full:redundancy_ratio_heldout", "full:redundancy_ratio_train"]
    np.testing.assert_array_equal(lines["full:redundancy_ratio_heldout"].get_ydata(),
                                  h5(full_run, "codes/redundancy_ratio_heldout"))
    lines = lines_by_gid(plot_code_accuracy(full_run))
    assert list(lines) == ["full:knn_accuracy", "full:logistic_accuracy", "full:kmeans_accuracy_hungarian"]
    np.testing.assert_array_equal(lines["full:knn_accuracy"].get_ydata(), h5(full_run, "codes/knn_accuracy"))
    lines = lines_by_gid(plot_code_change(full_run))  # the fraction; the mean Hamming distance has another scale
    assert list(lines) == ["full:code_change_fraction_train"]
    np.testing.assert_array_equal(lines["full:code_change_fraction_train"].get_ydata(),
                                  h5(full_run, "codes/code_change_fraction_train"))
    lines = lines_by_gid(plot_kernel_alignment(full_run))
    assert list(lines) == ["full:kernel_target_alignment", "full:kernel_target_alignment_centered"]
    np.testing.assert_array_equal(lines["full:kernel_target_alignment_centered"].get_ydata(),
                                  h5(full_run, "ntk/kernel_target_alignment_centered"))


def test_representation_accuracy_with_confidence_band(full_run):
    ax = plot_representation_accuracy(full_run)
    lines = lines_by_gid(ax)
    assert list(lines) == ["full:few_shot_5way_1shot_euclidean", "full:linear_probe_accuracy"]
    mean = h5(full_run, "representations/few_shot_5way_1shot_euclidean")
    half = h5(full_run, "representations/few_shot_5way_1shot_euclidean_ci95")
    np.testing.assert_array_equal(lines["full:few_shot_5way_1shot_euclidean"].get_ydata(), mean)
    (band,) = [c for c in ax.collections if c.get_gid() == "full:few_shot_5way_1shot_euclidean_ci95"]
    vertices = band.get_paths()[0].vertices
    step = h5(full_run, "representations/step")
    for x, lo, hi in zip(step, mean - half, mean + half):  # the band's outline passes through both bounds
        at_x = vertices[np.isclose(vertices[:, 0], x)][:, 1]
        assert np.isclose(at_x, lo).any() and np.isclose(at_x, hi).any()


def test_several_runs_overlay_with_labels(full_run, second_run):
    ax = plot_ntk_eigenvalues([full_run, second_run], labels=["A", "B"])
    lines = lines_by_gid(ax)
    assert len(lines) == 2 * K
    np.testing.assert_array_equal(lines["B:eigvals[3]"].get_ydata(), h5(second_run, "ntk/eigvals")[:, 3])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B"]
    assert lines["A:eigvals[0]"].get_color() != lines["B:eigvals[0]"].get_color()
    ax = plot_probe_accuracy([full_run, second_run])
    assert sorted(lines_by_gid(ax)) == ["full:accuracy", "second:accuracy"]
    scatter = plot_cartography([full_run, second_run]).collections
    assert [s.get_label() for s in scatter] == ["full", "second"]
    bars = plot_forgetting_histogram([full_run, second_run]).containers
    assert len(bars) == 4
    with pytest.raises(ValueError, match="one run at a time"):
        plot_eigenfunctions([full_run, second_run])
    with pytest.raises(ValueError, match="one label per run"):
        plot_probe_loss([full_run, second_run], labels=["only one"])


def test_same_file_names_are_labelled_by_folder(tmp_path):
    a = write_full_run(str(tmp_path / "a" / "run.h5"), groups=("probe_metrics",))
    b = write_full_run(str(tmp_path / "b" / "run.h5"), groups=("probe_metrics",), seed=3)
    assert sorted(lines_by_gid(plot_probe_loss([a, b]))) == [f"a{os.sep}run.h5:loss", f"b{os.sep}run.h5:loss"]


def test_missing_groups_and_fields_are_not_an_error_in_the_report(probe_only_run):
    with open_run(probe_only_run) as run:
        assert plot_probe_loss.available(run)
        assert not plot_sharpness.available(run)
        assert not plot_ntk_eigenvalues.available(run)
        assert not plot_forgetting_histogram.available(run)  # declared but never written
        assert not plot_code_redundancy.available(run)
    with pytest.raises(ValueError, match="none of the runs holds Hessian eigenvalues"):
        plot_sharpness(probe_only_run)
    with pytest.raises(ValueError, match="none of the runs holds forgetting counts"):
        plot_forgetting_histogram(probe_only_run)
    with pytest.raises(ValueError, match="none of the runs holds any of the fields"):
        plot_series(probe_only_run, "probe_metrics", ["nope"])


# ---------------------------------------------------------------------------------------------------------- report
def _sections_in(page):
    return [s.anchor for s in SECTIONS if f'id="{s.anchor}"' in page]


def test_report_has_every_section_and_reports_progress(full_run, tmp_path):
    err = io.StringIO()
    path = write_report(full_run, tmp_path / "rep", progress=True, strict=True, stream=err)
    assert path == str(tmp_path / "rep" / "report.html")
    page = open(path, encoding="utf-8").read()
    assert _sections_in(page) == [s.anchor for s in SECTIONS]
    n_images = page.count("<img ")
    assert n_images == len(SECTIONS)
    assert page.count('src="data:image/png;base64,') == n_images
    lines = [line for line in err.getvalue().splitlines() if line.startswith("report: [")]
    assert [line.split("]")[0] for line in lines] == [f"report: [{i}/{n_images}" for i in range(1, n_images + 1)]
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "Synthetic · 1234 parameters (1000 trainable)" in page
    assert "/forgetting/examples: 40 rows (as of step 25)" in page
    assert "&quot;seed&quot;: 0" in page  # the monitors' config
    assert 'class="error"' not in page


def test_report_of_two_runs_and_png_files(full_run, probe_only_run, tmp_path):
    out = tmp_path / "two"
    path = write_report([full_run, probe_only_run], out, progress=False, embed=False, strict=True)
    page = open(path, encoding="utf-8").read()
    per_run = [s for s in SECTIONS if s.per_run]
    images = [part.split('"')[0] for part in page.split('<img src="')[1:]]
    assert len(images) == len(SECTIONS)  # per-run sections only for the run that has the data
    assert sorted(os.listdir(out / "figures")) == sorted(src[len("figures/"):] for src in images)
    for src in images:
        assert src.startswith("figures/")
        with open(out / src, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert page.count("<th>full</th>") == 2 and page.count("<th>partial</th>") == 2
    assert all(f"{s.title} — full" in page for s in per_run)
    write_report(probe_only_run, out, progress=False, embed=False)  # a second report replaces the figures
    assert os.listdir(out / "figures") == ["00-probe_metrics-probe.png"]


def test_report_of_a_partial_file_shows_only_its_sections(probe_only_run, tmp_path):
    page = open(write_report(probe_only_run, tmp_path, progress=False, strict=True), encoding="utf-8").read()
    assert _sections_in(page) == ["probe"]
    assert "/forgetting/examples: not written yet" in page and "/forgetting/events: 42 rows, step 0…25" in page


def test_report_draws_the_groups_of_named_monitors(tmp_path):
    """A monitor given ``name="heldout"`` writes ``/probe_metrics_heldout``: drawn in its own figure."""
    path = write_full_run(str(tmp_path / "named.h5"), groups=("probe_metrics", "probe_metrics_heldout"))
    page = open(write_report(path, tmp_path / "rep", progress=False, strict=True, embed=False),
                encoding="utf-8").read()
    assert page.count("<img ") == 2
    assert 'alt="Probe loss and accuracy"' in page and 'alt="Probe loss and accuracy (/probe_metrics_heldout)"' in page
    assert sorted(os.listdir(tmp_path / "rep" / "figures")) == ["00-probe_metrics-probe.png",
                                                                "01-probe_metrics_heldout-probe.png"]
    with open_run(path) as run:
        assert plot_probe_loss.available(run, "probe_metrics_heldout")
        assert not plot_grad_norm_missing(run)
    ax = plot_probe_loss(path, group="probe_metrics_heldout")
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), h5(path, "probe_metrics_heldout/loss"))


def plot_grad_norm_missing(run):
    return plot_probe_loss.available(run, "probe_metrics_nope")


def test_report_refuses_a_file_as_folder(full_run, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        write_report(full_run, target, progress=False)


# ---------------------------------------------------------------------------------------------------------- export
def test_csv_columns_equal_the_files_datasets(full_run, tmp_path):
    from lightning_ntk.analysis import ExportWarning

    with pytest.warns(ExportWarning) as caught:
        paths = export_run(full_run, "csv", tmp_path)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(["full.codes.csv", "full.forgetting.events.csv", "full.forgetting.examples.csv",
                            "full.ntk.csv", "full.probe_metrics.csv", "full.sharpness.csv", "full.probe.train.csv",
                            "full.representations.csv", "full.probe_metrics.example_loss.csv",
                            "full.landscape.spawn_pairs.csv", "full.landscape.spawn_children.csv",
                            "full.landscape.linearized.csv", "full.landscape.slices.csv"])
    pd = pytest.importorskip("pandas")
    # nothing is dropped silently: every per-row field is a column, a long-form file, or named in the warning
    message = str(caught[0].message)
    with h5py.File(full_run, "r") as f:
        for group in ("ntk", "probe_metrics", "sharpness", "codes", "representations"):
            for name, ds in f[group].items():
                if ds.ndim >= 3 and "DIMENSION_LIST" in ds.attrs:
                    assert f"/{group}/{name} " in message, (group, name)
        long = pd.read_csv(tmp_path / "full.probe_metrics.example_loss.csv")
        values = f["probe_metrics/example_loss"][()]
        assert list(long.columns) == ["step", "position", "example_loss"]
        np.testing.assert_array_equal(long["example_loss"].to_numpy().astype(values.dtype).reshape(values.shape), values)
        np.testing.assert_array_equal(long["step"].to_numpy().reshape(values.shape)[:, 0], f["probe_metrics/step"][()])
    sharp = pd.read_csv(tmp_path / "full.sharpness.csv")
    assert list(sharp.columns) == ["step", "epoch", "wall_time", "lr", "eigvals[0]", "eigvals[1]", "eigvals[2]",
                                   "residuals[0]", "residuals[1]", "residuals[2]", "n_hvp", "trace", "trace_stderr",
                                   "eos_threshold"]
    with h5py.File(full_run, "r") as f:
        np.testing.assert_array_equal(sharp["eigvals[0]"], f["sharpness/eigvals"][:, 0])  # the sharpness
        for col in ("step", "lr", "trace", "trace_stderr", "eos_threshold", "n_hvp", "epoch", "wall_time"):
            np.testing.assert_array_equal(sharp[col].to_numpy(), f["sharpness"][col][()])
        ntk = pd.read_csv(tmp_path / "full.ntk.csv")
        assert "eigvecs" not in " ".join(ntk.columns)  # (T, N, k) arrays go to netCDF
        np.testing.assert_array_equal(ntk["eigvals[4]"], f["ntk/eigvals"][:, 4])
        events = pd.read_csv(tmp_path / "full.forgetting.events.csv")
        assert list(events.columns) == ["step", "index", "correct", "loss", "margin", "p_true"]
        for col in events.columns:
            np.testing.assert_array_equal(events[col].to_numpy(), f["forgetting/events"][col][()])
        examples = pd.read_csv(tmp_path / "full.forgetting.examples.csv")
        assert list(examples.columns) == ["example", "presentations", "forgetting_count", "learning_count",
                                          "first_learned_step", "never_learned", "unforgettable", "confidence",
                                          "variability", "correctness"]
        np.testing.assert_array_equal(examples["example"], np.arange(100, 140))
        for col in examples.columns[1:]:
            np.testing.assert_array_equal(examples[col].to_numpy(), f["forgetting/examples"][col][()])
        probe = pd.read_csv(tmp_path / "full.probe.train.csv")
        np.testing.assert_array_equal(probe["y"], f["probe/train/y"][()])
        metrics = pd.read_csv(tmp_path / "full.probe_metrics.csv")
        assert list(metrics.columns) == ["step", "epoch", "wall_time", "loss", "accuracy", "grad_norm"]


def test_netcdf_export_round_trips(full_run, tmp_path):
    xr = pytest.importorskip("xarray")
    paths = export_run(full_run, "netcdf", tmp_path, groups=["ntk", "/forgetting/examples", "sharpness"])
    assert [os.path.basename(p) for p in paths] == ["full.ntk.nc", "full.forgetting.examples.nc", "full.sharpness.nc"]
    with h5py.File(full_run, "r") as f:
        with xr.open_dataset(paths[0], engine="h5netcdf") as ds:
            np.testing.assert_array_equal(ds["eigvecs"].values, f["ntk/eigvecs"][()])
            assert ds["eigvecs"].dims == ("step", "eigvec_row", "eigen")
            np.testing.assert_array_equal(ds["step"].values, f["ntk/step"][()])
            np.testing.assert_array_equal(ds["eigen"].values, np.arange(1, K + 1))
            np.testing.assert_array_equal(ds["layer_trace"].values, f["ntk/layer_trace"][()])
        with xr.open_dataset(paths[1], engine="h5netcdf") as ds:
            np.testing.assert_array_equal(ds["forgetting_count"].values, f["forgetting/examples/forgetting_count"][()])
            np.testing.assert_array_equal(ds["never_learned"].values.astype(bool), f["forgetting/examples/never_learned"][()])
        with xr.open_dataset(paths[2], engine="h5netcdf") as ds:
            np.testing.assert_array_equal(ds["density_weights"].values, f["sharpness/density_weights"][()])
    with pytest.raises(ExportError, match="not in"):
        export_run(full_run, "netcdf", tmp_path, groups=["nope"])
    with pytest.raises(ExportError, match="to must be one of"):
        export_run(full_run, "xlsx", tmp_path)


def test_parquet_export_or_a_clear_error(full_run, tmp_path, monkeypatch):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        have = False
    else:
        have = True
    if have:
        import pandas as pd

        (path,) = export_run(full_run, "parquet", tmp_path, groups=["sharpness"])
        frame = pd.read_parquet(path)
        np.testing.assert_array_equal(frame["eigvals[0]"], h5(full_run, "sharpness/eigvals")[:, 0])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(ExportError, match="pip install pyarrow"):
        export_run(full_run, "parquet", tmp_path)


# ---------------------------------------------------------------------------------------------------------- CLI
def test_cli_report_and_export(full_run, probe_only_run, tmp_path, capsys):
    assert main(["report", probe_only_run, "-o", str(tmp_path / "r"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "r" / "report.html") and out.err == ""
    assert main(["report", probe_only_run]) == 0  # default folder beside the run, progress on stderr
    out = capsys.readouterr()
    assert out.out.strip() == os.path.splitext(probe_only_run)[0] + "_report" + os.sep + "report.html"
    assert "report: [1/1] Probe loss and accuracy" in out.err
    assert main(["export", full_run, "--to", "csv", "-o", str(tmp_path / "e"), "--group", "codes"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "e" / "full.codes.csv")]
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = 1
    assert main(["export", str(plain), "--to", "csv"]) == 2
    assert "not a lightning_ntk run file" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.h5"), "--quiet"]) == 2
    assert "no run file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- watch
def _fake_lock(path, pid):
    import socket

    with open(path + ".lock", "w") as handle:
        json.dump({"host": socket.gethostname(), "pid": pid}, handle)


def test_watch_a_finished_run_prints_its_last_rows_and_ends(full_run):
    out = io.StringIO()
    assert watch(full_run, interval=0.01, max_rows=2, out=out) == 0
    text = out.getvalue()
    assert "[probe_metrics] ... 4 rows not shown" in text
    assert "[sharpness] step 25" in text and "[sharpness] step 20" in text and "[sharpness] step 15" not in text
    assert f"[forgetting/events] +{7 * T} rows" in text
    assert "[forgetting/examples] rewritten at step 25: 40 rows" in text
    assert text.rstrip().endswith("training finished: the writer closed the run file")


def test_watch_timeout_and_dead_writer(full_run, tmp_path):
    copy = str(tmp_path / "copy.h5")
    with open(full_run, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read())
    _fake_lock(copy, os.getpid())  # a live process: the run looks still open
    out = io.StringIO()
    started = time.monotonic()
    assert watch(copy, interval=0.05, timeout=0.3, out=out) == 1
    assert 0.3 <= time.monotonic() - started < 5
    assert "no new rows for 0.3s" in out.getvalue()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _fake_lock(copy, dead.pid)
    out = io.StringIO()
    assert watch(copy, interval=0.05, out=out) == 1
    assert f"the writing process {dead.pid} is gone" in out.getvalue()


def test_watch_exits_on_ctrl_c(full_run, tmp_path):
    copy = str(tmp_path / "live.h5")
    with open(full_run, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read())
    _fake_lock(copy, os.getpid())  # this test process: alive, so the run looks still open
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "lightning_ntk.cli", "watch", copy, "--interval", "0.1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while "[codes]" not in seen:
            assert time.monotonic() < deadline, seen
            seen += proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped watching (Ctrl-C)" in out and "Traceback" not in err


@pytest.mark.slow  # a training in a subprocess, ~6 s
def test_watch_sees_rows_of_a_concurrent_training(tmp_path):
    """A training in another process; watch prints its rows while it is still running."""
    path = str(tmp_path / "live.h5")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "tests.train_script", path, "--delay", "0.2", "--epochs", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    class Recorder(io.StringIO):
        """Notes, for each printed probe_metrics row, whether the training was still running."""

        def __init__(self):
            super().__init__()
            self.rows = []

        def write(self, text):
            for line in text.splitlines():
                if line.startswith("[probe_metrics] step "):
                    self.rows.append((int(line.split()[2]), proc.poll() is None))
            return super().write(text)

    out = Recorder()
    try:
        status = watch(path, interval=0.1, timeout=120, max_rows=100, out=out)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        err = proc.stderr.read()
        proc.stderr.close()
    assert proc.returncode == 0, err[-3000:]
    assert status == 0, out.getvalue()
    assert out.getvalue().rstrip().endswith("training finished: the writer closed the run file")
    with open_run(path) as run:
        steps = list(run["probe_metrics"]["step"])
    printed = [s for s, _ in out.rows]
    assert printed == steps  # every row, once, in order
    live = [s for s, running in out.rows if running]
    assert len(live) >= 3, out.rows  # seen while the training was running, not read after it
