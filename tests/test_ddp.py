"""Real 2-process DDP (gloo, CPU) against a single-process run with the same global batch."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lightning_ntk import callbacks
from lightning_ntk.store import check_run, open_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MONITORS = ["probe", "ntk", "codes", "representations", "sharpness", "forgetting"]


def _run(path, devices, monitors, extra=(), timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LOCAL_RANK", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tests.ddp_script", path, "--devices", str(devices),
                           "--monitors", ",".join(monitors), *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - started


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    monitors = [m for m in MONITORS if m not in ("sharpness", "forgetting")
                or hasattr(callbacks, {"sharpness": "SharpnessMonitor", "forgetting": "ForgettingMonitor"}[m])]
    folder = tmp_path_factory.mktemp("ddp")
    out = {}
    for devices in (1, 2):
        path = str(folder / f"devices{devices}.h5")
        proc, _ = _run(path, devices, monitors)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[devices] = path
    return out


def test_only_rank_zero_writes_and_files_check(runs):
    folder = os.path.dirname(runs[2])
    assert sorted(os.listdir(folder)) == ["devices1.h5", "devices1.h5.weights.pt", "devices2.h5",
                                          "devices2.h5.weights.pt"]  # no lock left, no file per rank
    assert check_run(runs[2]).ok


def test_ddp_numbers_equal_single_process(runs):
    with open_run(runs[1]) as single, open_run(runs[2]) as ddp:
        assert single.tables == ddp.tables
        for table in single.tables:
            a, b = single[table], ddp[table]
            assert len(a) == len(b) > 0, table
            for field in a.fields:
                if field == "wall_time":
                    continue
                x, y = a[field], b[field]
                if x.dtype.kind in "biu":
                    np.testing.assert_array_equal(x, y, err_msg=f"{table}/{field}")
                else:
                    scale = np.nanmax(np.abs(x)) if np.isfinite(x).any() else 1.0
                    if field == "residuals":  # error bounds at rounding level: compare on the eigenvalues' scale
                        scale = np.nanmax(np.abs(a["eigvals"]))
                    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * scale, equal_nan=True,
                                               err_msg=f"{table}/{field}")
    wa, wb = torch.load(runs[1] + ".weights.pt"), torch.load(runs[2] + ".weights.pt")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_failure_on_one_rank_stops_every_rank(tmp_path):
    proc, seconds = _run(str(tmp_path / "fail.h5"), 2, ["probe"], ["--fail-rank", "1"], timeout=180)
    assert proc.returncode != 0
    assert "[rank1]: Boom: injected failure on rank 1" in proc.stderr
    assert "[rank0]: RuntimeError: Failing (probe_metrics_failing) failed on rank 1" in proc.stderr
    assert seconds < 120
    with open_run(tmp_path / "fail.h5") as run:  # what rank 0 wrote before the failure is intact
        assert list(run["probe_metrics"]["step"][:2]) == [0, 3]


def test_forgetting_padding_is_not_counted_twice(tmp_path):
    """97 examples on 2 ranks: the DistributedSampler repeats one index to pad the epoch."""
    path = str(tmp_path / "padded.h5")
    proc, _ = _run(path, 2, ["forgetting"], ["--n", "97"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open_run(path) as run:
        events = run["forgetting/events"]
        for epoch in np.unique(events["epoch"]):
            seen = events["index"][events["epoch"] == epoch]
            assert sorted(seen) == list(range(97)), "each example presented exactly once per epoch"
        examples = run["forgetting/examples"]
        np.testing.assert_array_equal(examples["presentations"], np.full(97, 2))
