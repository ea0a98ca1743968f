import os
import warnings

import pytest
import torch

from .models import NAMESPACES, namespace

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
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
