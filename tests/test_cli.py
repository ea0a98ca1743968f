"""The command line: the demo writes a file every reader opens; `info` describes it."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lightning_ntk.cli import main
from lightning_ntk.store import open_run


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo") / "demo.h5")
    assert main(["demo", "--out", path, "--epochs", "2", "--quiet"]) == 0
    return path


@pytest.mark.slow  # the demo training (module fixture, ~10 s)
def test_demo_writes_its_report(demo_file):
    report = os.path.join(os.path.dirname(demo_file), "demo_report", "report.html")
    with open(report) as handle:
        page = handle.read()
    assert "<img" in page and "probe_metrics" in page


@pytest.mark.slow  # the demo training (module fixture, ~10 s)
def test_demo_file_opens_in_every_reader(demo_file):
    with h5py.File(demo_file, "r") as f:
        assert f.attrs["format"] == "lightning_ntk"
    with open_run(demo_file) as run:
        assert "probe_metrics" in run.tables
        view = run["probe_metrics"]
        # first and last always (the 10% budget may skip the one between); learning shows
        assert len(view) >= 2 and view["step"][0] == 0 and view["loss"][-1] < view["loss"][0]
    xr = pytest.importorskip("xarray")
    with xr.open_dataset(demo_file, group="probe_metrics", engine="h5netcdf") as ds:
        np.testing.assert_array_equal(ds["step"].values, view_steps(demo_file))


def view_steps(path):
    with open_run(path) as run:
        return run["probe_metrics"]["step"]


@pytest.mark.slow  # the demo training (module fixture, ~10 s)
def test_info_console_script(demo_file):
    script = os.path.join(os.path.dirname(sys.executable), "lightning-ntk")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "lightning_ntk.cli"]
    out = subprocess.run(cmd + ["info", demo_file], capture_output=True, text=True, check=True).stdout
    with open_run(demo_file) as run:
        rows, probe = len(run["probe_metrics"]), run.config["ProbeMetricsMonitor[probe_metrics]"]["probe"]["name"]
        sizing = run.config["ProbeMetricsMonitor[probe_metrics]"]["sizing"]
    assert rows >= 2 and f"/probe_metrics: {rows} rows" in out and "logits" in out and f"probe '{probe}'" in out
    # what sizing to the budget chose, and what the snapshots cost
    assert f"size {sizing['size']} of default {sizing['default']}" in out and "snapshots took" in out


def test_info_on_a_foreign_file(tmp_path, capsys):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["x"] = 1
    assert main(["info", str(path)]) == 2
    assert "not a lightning_ntk run file" in capsys.readouterr().err
