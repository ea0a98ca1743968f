"""lightning_ntk: training-dynamics instrumentation for PyTorch Lightning.

The functional core (this namespace) is plain PyTorch/NumPy; the Lightning callbacks live
in :mod:`lightning_ntk.callbacks`.
"""
from ._version import __version__
from .probe import BatchLayoutError, Probe, ProbeSet, draw_probe
from .schedule import EveryNEpochs, EveryNSteps, LogSpacedSteps, Schedule, StepList
from .spectral import (Eigenpairs, KernelDistanceTrajectory, KernelRegressionScores, KernelRegressionSweep,
                       align_signs, effective_rank, eigen_energy, kernel_distance, kernel_distance_trajectory,
                       kernel_frobenius_norm, kernel_matrix, kernel_regression, kernel_regression_scores,
                       kernel_regression_sweep, kernel_target_alignment, kernel_trace, kernel_velocity, nngp_kernel,
                       nystrom_extension, output_energy, residual_energy, subspace_overlap, target_energy,
                       top_eigenpairs)
from .store import Field, Run, RunFormatError, RunStore, open_run

__all__ = [
    "__version__",
    "BatchLayoutError", "Probe", "ProbeSet", "draw_probe",
    "EveryNEpochs", "EveryNSteps", "LogSpacedSteps", "Schedule", "StepList",
    "Field", "Run", "RunFormatError", "RunStore", "open_run",
    # spectral (kernel dynamics on arrays)
    "Eigenpairs", "KernelDistanceTrajectory", "KernelRegressionScores", "KernelRegressionSweep", "align_signs",
    "effective_rank", "eigen_energy", "kernel_distance", "kernel_distance_trajectory", "kernel_frobenius_norm",
    "kernel_matrix", "kernel_regression", "kernel_regression_scores", "kernel_regression_sweep",
    "kernel_target_alignment", "kernel_trace", "kernel_velocity", "nngp_kernel", "nystrom_extension",
    "output_energy", "residual_energy", "subspace_overlap", "target_energy", "top_eigenpairs",
]
