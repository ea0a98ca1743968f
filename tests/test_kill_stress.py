"""SIGKILL at 20 moments of a training, several of them inside a snapshot write.

Each training runs in a forked child (imports paid once), writing a run file with two
monitors on every step. The child is killed at a random moment, or kills itself in the
middle of a flush (after the data of a row, before its key). Every time: the file opens,
`check` passes, and every snapshot completed before the kill equals the uninterrupted
run's. A training resumed on a killed file keeps its rows and appends after them.
"""
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from lightning_ntk.store import _writer, check_run, open_run

from .models import blob_data, loader, make_module, namespace, tiny_net, trainer

# Forked trainings killed with SIGKILL: slow (skipped by pytest -m "not slow").
pytestmark = pytest.mark.slow

N_KILLS = 20
TABLES = ("probe_metrics", "ntk")


def _train(path, L, kill_in_flush=None, ready_fd=None):
    from lightning_ntk.callbacks import NTKMonitor, ProbeMetricsMonitor
    from lightning_ntk.probe import Probe

    if kill_in_flush is not None:  # die after writing a row's data, before its key
        original = _writer.Table._write_buffer

        def dying_write(self):
            # The write that holds NTK row number ``kill_in_flush`` (1-based) dies after writing
            # its rows' data, before their keys. (The writer thread may write several rows at once.)
            if self._buffer and self.name == "ntk":
                n0, n1 = self._committed, self.n_rows
                if n0 < kill_in_flush <= n1:
                    with open(path + ".committed", "w") as f:  # rows complete before this write
                        f.write(str(n0))
                    for ds in self._ds.values():
                        ds.resize(n1, axis=0)
                    self._ds["eigvals"][n0:n1] = self._stacked("eigvals")
                    self._store.file.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(self)

        _writer.Table._write_buffer = dying_write
    torch.manual_seed(0)
    common = dict(schedule=1, on_error="raise", overwrite=True, budget=False)
    monitors = [ProbeMetricsMonitor(path, probe=Probe(size=12), **common),
                NTKMonitor(path, probe=Probe(size=12), k=3, **common)]
    t = trainer(L, monitors, max_epochs=3)
    t.fit(make_module(L, tiny_net()), loader(blob_data(n=64)))


def _fork_train(path, L, kill_in_flush=None):
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            _train(path, L, kill_in_flush)
        except BaseException:  # pragma: no cover - reported by the exit code
            code = 1
        os._exit(code)
    return pid


def _read(path):
    with open_run(path) as run:
        return {t: {f: run[t][f] for f in run[t].fields if f not in ("wall_time", "snapshot_seconds")} for t in TABLES if t in run}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)  # no intra-op threads in the parent: forking stays safe
    L = namespace("lightning.pytorch")
    path = str(tmp_path_factory.mktemp("ref") / "ref.h5")
    started = time.monotonic()
    pid = _fork_train(path, L)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    return _read(path), time.monotonic() - started


def _wait_for(path, pid, timeout=60.0):
    """Until ``path`` exists (the first training batch published it) or the child ended."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
        time.sleep(0.005)
    return True


def test_sigkill_at_twenty_moments(tmp_path, reference):
    ref, duration = reference
    L = namespace("lightning.pytorch")
    rng = random.Random(1234)
    n_rows = len(ref["ntk"]["step"])
    outcomes = []
    for i in range(N_KILLS):
        path = str(tmp_path / f"kill{i}.h5")
        expected_ntk_rows = None
        if i % 3 == 0:  # a third of the kills land inside a snapshot write
            kill_in_flush = rng.randint(2, n_rows - 2)
            pid = _fork_train(path, L, kill_in_flush=kill_in_flush)
            os.waitpid(pid, 0)
            how = "mid-write"
            with open(path + ".committed") as f:  # every snapshot written before the interrupted write
                expected_ntk_rows = int(f.read())
            assert 1 <= expected_ntk_rows <= kill_in_flush - 1
        else:
            pid = _fork_train(path, L)
            started = time.monotonic()
            if _wait_for(path, pid):
                # A random moment of the training that follows (the reference run's length
                # bounds it; the start-up before the file existed is not counted).
                time.sleep(rng.uniform(0.0, 0.8) * max(0.1, duration - (time.monotonic() - started)))
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            how = "random"
        if not os.path.exists(path):
            outcomes.append((how, "no file yet"))
            continue
        report = check_run(path)
        assert report.ok, f"kill {i} ({how}): {report}"
        got = _read(path)
        for table, fields in got.items():
            n = len(fields["step"])
            for field, values in fields.items():
                np.testing.assert_array_equal(values, ref[table][field][:n], err_msg=f"kill {i} {table}/{field}")
        if expected_ntk_rows is not None:
            assert len(got["ntk"]["step"]) == expected_ntk_rows, f"kill {i}: a completed snapshot is missing"
        outcomes.append((how, {t: len(f["step"]) for t, f in got.items()}))
    mid = [o for o in outcomes if o[0] == "mid-write"]
    assert len(mid) >= 6 and all(isinstance(o[1], dict) for o in mid)
    assert all(isinstance(o[1], dict) for o in outcomes), outcomes
    assert len({tuple(sorted(o[1].items())) for o in outcomes}) >= 8  # the kills landed at many moments
