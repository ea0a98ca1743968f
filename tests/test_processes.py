"""Run files seen from other processes: live reading (SWMR) and a training killed by SIGKILL."""
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from lightning_ntk.store import open_run

# Trainings in subprocesses (one killed with SIGKILL): slow (skipped by pytest -m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(path, delay, epochs=3):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "tests.train_script", path, "--delay", str(delay),
                             "--epochs", str(epochs)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_snapshots(proc, count, timeout=120.0):
    """Read the child's stdout until it reported ``count`` flushed snapshots; return their steps."""
    steps = []
    deadline = time.monotonic() + timeout
    while len(steps) < count:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training process reported only {steps} before the timeout")
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            pytest.fail(f"training process ended early: {proc.stderr.read()[-2000:]}")
        if line.startswith("SNAPSHOT"):
            steps.append(int(line.split()[1]))
    return steps


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The same training, uninterrupted (deterministic CPU run)."""
    path = str(tmp_path_factory.mktemp("ref") / "reference.h5")
    proc = _start(path, delay=0.0)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    with open_run(path) as run:
        return {k: run["probe_metrics"][k] for k in ("step", "loss", "logits", "grad_norm")}


def test_live_reader_sees_rows_grow(tmp_path):
    path = str(tmp_path / "live.h5")
    proc = _start(path, delay=0.05)
    try:
        _wait_for_snapshots(proc, 3)
        with open_run(path, live=True) as run:
            first = len(run["probe_metrics"])
            assert first >= 3
            _wait_for_snapshots(proc, 5)
            run.refresh()
            second = len(run["probe_metrics"])
            assert second > first
            steps = run["probe_metrics"]["step"]
            assert np.all(np.diff(steps) == 1)
            assert run["probe_metrics"]["logits"].shape[0] == second
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_mid_run_keeps_every_flushed_snapshot(tmp_path, reference_run):
    path = str(tmp_path / "killed.h5")
    proc = _start(path, delay=0.02)
    reported = _wait_for_snapshots(proc, 7)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(OSError):  # plain HDF5 refuses a file its writer left open...
        h5py.File(path, "r").close()
    with open_run(path) as run:  # ...our reader opens it (SWMR read)
        view = run["probe_metrics"]
        n = len(view)
        assert n >= len(reported)
        np.testing.assert_array_equal(view["step"], reference_run["step"][:n])
        for key in ("loss", "logits", "grad_norm"):
            np.testing.assert_array_equal(view[key], reference_run[key][:n])
