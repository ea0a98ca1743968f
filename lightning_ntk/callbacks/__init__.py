"""Lightning callbacks ("monitors"): each records one quantity into the run file.

Every class here subclasses the ``Callback`` of each installed Lightning namespace, so
one object works with both ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``.
"""
from ._base import Monitor as _MonitorLogic
from ._base import set_default_budget
from ._lightning import adapter as _adapter
from .codes import ActivationCodeMonitor as _ActivationCodeLogic
from .forgetting import ForgettingCaptureError
from .forgetting import ForgettingMonitor as _ForgettingLogic
from .ntk import NTKMonitor as _NTKLogic
from .probe_metrics import ProbeMetricsMonitor as _ProbeMetricsLogic
from .representations import RepresentationMonitor as _RepresentationLogic
from .sharpness import SharpnessMonitor as _SharpnessLogic

#: Base class of every monitor, usable as a callback (subclass it for a new quantity).
Monitor = _adapter(_MonitorLogic, "Monitor")
ProbeMetricsMonitor = _adapter(_ProbeMetricsLogic, "ProbeMetricsMonitor", base=Monitor)
NTKMonitor = _adapter(_NTKLogic, "NTKMonitor", base=Monitor)
ActivationCodeMonitor = _adapter(_ActivationCodeLogic, "ActivationCodeMonitor", base=Monitor)
RepresentationMonitor = _adapter(_RepresentationLogic, "RepresentationMonitor", base=Monitor)
SharpnessMonitor = _adapter(_SharpnessLogic, "SharpnessMonitor", base=Monitor)
ForgettingMonitor = _adapter(_ForgettingLogic, "ForgettingMonitor", base=Monitor)

__all__ = ["set_default_budget", "ActivationCodeMonitor", "ForgettingCaptureError", "ForgettingMonitor", "Monitor", "NTKMonitor", "ProbeMetricsMonitor", "RepresentationMonitor", "SharpnessMonitor"]
