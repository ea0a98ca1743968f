"""A table of bad inputs across monitors, store, probes, schedules, engines and CLI:
each must fail with a message that names the problem (issue 11)."""
import h5py
import numpy as np
import pytest
import torch

from lightning_ntk import callbacks
from lightning_ntk.budget import Governor
from lightning_ntk.cli import main
from lightning_ntk.ntk import empirical_ntk
from lightning_ntk.probe import Probe
from lightning_ntk.schedule import EveryNSteps, LogSpacedSteps, StepList
from lightning_ntk.store import Field, RunFormatError, RunStore, StoreError, open_run

P = "run.h5"

CASES = [
    # monitors: construction-time validation
    ("probe_metrics path", lambda: callbacks.ProbeMetricsMonitor(3), TypeError, "path must be a file path"),
    ("monitor name", lambda: callbacks.ProbeMetricsMonitor(P, name="a/b"), ValueError, "name must be"),
    ("on_error", lambda: callbacks.ProbeMetricsMonitor(P, on_error="ignore"), ValueError, "on_error must be one of 'warn', 'raise', got 'ignore'"),
    ("batch_size", lambda: callbacks.ProbeMetricsMonitor(P, batch_size=0), ValueError, "batch_size must be a positive integer"),
    ("schedule type", lambda: callbacks.ProbeMetricsMonitor(P, schedule="often"), TypeError, "schedule must be"),
    ("probe type", lambda: callbacks.ProbeMetricsMonitor(P, probe="train"), TypeError, "probe must be"),
    ("budget zero", lambda: callbacks.ProbeMetricsMonitor(P, budget=0.0), ValueError,
     "budget must be a finite number > 0"),
    ("budget text", lambda: callbacks.ProbeMetricsMonitor(P, budget="5%"), ValueError,
     "budget must be a finite number > 0"),
    ("collective timeout", lambda: callbacks.ProbeMetricsMonitor(P, collective_timeout=0), ValueError,
     "collective_timeout must be a finite number > 0, got 0"),
    ("loss_fn", lambda: callbacks.ProbeMetricsMonitor(P, loss_fn="mse"), TypeError, "ProbeMetricsMonitor: loss_fn must be None or a callable"),
    ("ntk kind", lambda: callbacks.NTKMonitor(P, kind="sum"), ValueError, "kind must be one of"),
    ("ntk k", lambda: callbacks.NTKMonitor(P, k=0), ValueError, r"NTKMonitor: k must be a positive integer, got 0; the number of eigenpairs kept"),
    ("ntk method", lambda: callbacks.NTKMonitor(P, method="magic"), ValueError, "method must be one of"),
    ("ntk krr_eps", lambda: callbacks.NTKMonitor(P, krr_eps=-1.0), ValueError, "krr_eps must be a finite number"),
    ("codes capture", lambda: callbacks.ActivationCodeMonitor(P, capture="guess"), ValueError,
     "capture must be 'modules' or 'functional'"),
    ("codes measures", lambda: callbacks.ActivationCodeMonitor(P, measures="knn"), TypeError, "measures must be a sequence"),
    # probes and schedules
    ("probe size", lambda: Probe(size=0), ValueError, "Probe: size must be None or a positive integer"),
    ("probe source", lambda: Probe(source="test"), ValueError, "source must be one of 'train', 'val'"),
    ("every n steps", lambda: EveryNSteps(0), ValueError, "n must be a positive integer"),
    ("log spacing", lambda: LogSpacedSteps(per_decade=0), ValueError, "per_decade must be a positive integer"),
    ("step list", lambda: StepList([-3]), ValueError, "step must be an integer >= 0"),
    ("governor", lambda: Governor(-0.1), ValueError, "budget must be a finite number > 0"),
    # store schema
    ("field name", lambda: Field("a/b"), ValueError, "field name must be a non-empty name without '/'"),
    ("field dtype", lambda: Field("text", dtype="U10"), ValueError, "is not numeric"),
    ("field shape", lambda: Field("x", shape=(0,)), ValueError, "every axis length must be positive"),
    # engines
    ("ntk engine kind", lambda: empirical_ntk(torch.nn.Linear(2, 2), torch.zeros(3, 2), kind="bogus"), ValueError,
     "kind"),
]


@pytest.mark.parametrize("name, make, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named(name, make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_files_and_paths(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(RunFormatError, match="not an HDF5 file"):
        open_run(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(RunFormatError, match="not a lightning_ntk run file"):
        open_run(foreign)
    with pytest.raises(StoreError, match="is a directory"):
        RunStore.check_path(str(tmp_path), overwrite=False, resume=False)
    with pytest.raises(FileExistsError, match="already exists. Pass overwrite=True"):
        RunStore.check_path(str(foreign), overwrite=False, resume=False)
    with pytest.raises(StoreError, match="not a lightning_ntk run file"):
        RunStore.acquire(str(foreign), owner="m", resume=True)


def test_cli_bad_input(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.h5")]) == 2
    assert "no run file" in capsys.readouterr().err
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    assert main(["check", str(foreign)]) == 1
    assert "not a lightning_ntk run file" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(foreign), "--to", "xlsx"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'xlsx'" in capsys.readouterr().err
