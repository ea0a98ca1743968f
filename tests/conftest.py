import warnings

import pytest
import torch

from .models import NAMESPACES, namespace

# One intra-op thread. The models here are tiny, and on a 2-core machine that other processes
# keep busy, two OpenMP threads wait at a barrier on every op: measured here, a 12-step fit
# with a SharpnessMonitor took 11 s with two threads and 0.1 s with one, and the quick loop
# (-m "not slow") 7.5 min against 65 s. The DDP, kill and subprocess trainings use one too.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
warnings.filterwarnings("ignore", message=".*number of training batches.*")


@pytest.fixture(autouse=True, scope="session")
def no_default_budget():
    """Tests check measurements against exact schedules: the default 5% governor (which
    would thin snapshots of these millisecond trainings) is off unless a test sets a budget."""
    from lightning_ntk.callbacks import set_default_budget

    previous = set_default_budget(None)
    yield
    set_default_budget(previous)


@pytest.fixture(params=NAMESPACES)
def L(request):
    """Each Lightning namespace in turn: the callbacks must work with both Trainers."""
    return namespace(request.param)


@pytest.fixture
def run_path(tmp_path):
    return str(tmp_path / "run.h5")


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory):
    """One training with every monitor in one process and under 2-process DDP (gloo, CPU),
    same global batch (tests/ddp_script.py): {devices: run file}. Shared by tests/test_ddp.py
    and the DDP contract of tests/test_monitor_contract.py (two subprocess trainings in all)."""
    from .ddp_script import MONITORS, launch

    folder = tmp_path_factory.mktemp("ddp")
    out = {}
    for devices in (1, 2):
        path = str(folder / f"devices{devices}.h5")
        proc, _ = launch(path, devices, MONITORS)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[devices] = path
    return out
