"""Real 2-process DDP (gloo, CPU) against a single-process run with the same global batch."""
import os

import numpy as np
import pytest
import torch

from lightning_ntk.store import check_run, open_run

from .ddp_script import launch as _run

# Every test here starts training processes: slow (run by plain `pytest`, skipped by -m "not slow").
pytestmark = pytest.mark.slow

# The single-process and 2-process runs with every monitor are the session fixture
# ``ddp_runs`` (conftest.py); tests/test_monitor_contract.py::test_ddp_equals_single_process
# compares their numbers, monitor by monitor.


def test_only_rank_zero_writes_and_files_check(ddp_runs):
    folder = os.path.dirname(ddp_runs[2])
    assert sorted(os.listdir(folder)) == ["devices1.h5", "devices1.h5.weights.pt", "devices2.h5",
                                          "devices2.h5.weights.pt"]  # no lock left, no file per rank
    assert check_run(ddp_runs[2]).ok


def test_ddp_weights_equal_single_process(ddp_runs):
    """The monitors' numbers are compared per monitor in test_monitor_contract.py."""
    wa, wb = torch.load(ddp_runs[1] + ".weights.pt"), torch.load(ddp_runs[2] + ".weights.pt")
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
