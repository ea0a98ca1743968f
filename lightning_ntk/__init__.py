"""lightning_ntk: training-dynamics instrumentation for PyTorch Lightning.

The functional core (this namespace) is plain PyTorch/NumPy; the Lightning callbacks live
in :mod:`lightning_ntk.callbacks`.
"""
from ._version import __version__
from .probe import BatchLayoutError, Probe, ProbeSet, draw_probe
from .schedule import EveryNEpochs, EveryNSteps, LogSpacedSteps, Schedule, StepList
from .store import Field, Run, RunFormatError, RunStore, open_run

__all__ = [
    "__version__",
    "BatchLayoutError", "Probe", "ProbeSet", "draw_probe",
    "EveryNEpochs", "EveryNSteps", "LogSpacedSteps", "Schedule", "StepList",
    "Field", "Run", "RunFormatError", "RunStore", "open_run",
]
