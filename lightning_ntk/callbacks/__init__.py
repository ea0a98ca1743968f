"""Lightning callbacks ("monitors"): each records one quantity into the run file.

Every class here subclasses the ``Callback`` of each installed Lightning namespace, so
one object works with both ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``.
Subclass :class:`Monitor` for a new snapshot quantity and :class:`StreamingMonitor` for a
per-batch one (see docs/extending.md).
"""
from ._base import Monitor, TableSpec
from ._session import FitSession, set_default_budget
from ._streaming import StreamingMonitor
from .children import (
                       LinearizedResult,
                       Spawn,
                       SpawnData,
                       SpawnError,
                       SpawnResult,
                       setup_from_parent,
                       spawn_children,
                       train_child,
)
from .codes import ActivationCodeMonitor
from .forgetting import ForgettingCaptureError, ForgettingMonitor, ProbeForgettingMonitor
from .ntk import NTKMonitor
from .probe_metrics import ProbeMetricsMonitor
from .representations import RepresentationMonitor
from .sharpness import SharpnessMonitor
from .spawn import ParentStateMonitor

__all__ = ["set_default_budget", "ActivationCodeMonitor", "FitSession", "ForgettingCaptureError", "ForgettingMonitor",
           "Monitor", "NTKMonitor", "ProbeForgettingMonitor", "ProbeMetricsMonitor", "RepresentationMonitor",
           "SharpnessMonitor", "StreamingMonitor", "TableSpec",
           # spawning (Frankle et al. 2020; Fort et al. 2020)
           "LinearizedResult", "ParentStateMonitor", "Spawn", "SpawnData", "SpawnError", "SpawnResult",
           "setup_from_parent", "spawn_children", "train_child"]
