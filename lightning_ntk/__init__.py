"""lightning_ntk: training-dynamics instrumentation for PyTorch Lightning."""
from ._version import __version__
from .store import Field, Run, RunFormatError, RunStore, open_run

__all__ = ["__version__", "Field", "Run", "RunFormatError", "RunStore", "open_run"]
