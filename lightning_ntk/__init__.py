"""lightning_ntk: training-dynamics instrumentation for PyTorch Lightning.

The functional core (this namespace) is plain PyTorch/NumPy; the Lightning callbacks live
in :mod:`lightning_ntk.callbacks`.
"""
from ._version import __version__
from .analytic import (
                    AnalyticKernels,
                    FiniteInfiniteGap,
                    analytic_kernels,
                    finite_infinite_gap,
                    record_analytic_kernels,
)
from .children import ChildrenComparison, compare_children
from .codes import (
                    RELU_MODULE_TYPES,
                    ActivationCodes,
                    CodeChange,
                    activation_codes,
                    cluster_accuracy,
                    code_change,
                    hamming_distances,
                    kmeans_accuracy,
                    knn_accuracy,
                    logistic_accuracy,
                    redundancy_ratio,
)
from .curvature import (
                    CurvatureMemoryError,
                    EdgeOfStability,
                    HessianDensityResult,
                    HessianEigenResult,
                    HessianTraceResult,
                    LossSet,
                    PreconditionedSharpnessResult,
                    SAMSharpnessResult,
                    edge_of_stability_threshold,
                    gradient_norm,
                    hessian_density,
                    hessian_eigs,
                    hessian_trace,
                    preconditioned_sharpness,
                    sam_sharpness,
                    smoothed_density,
                    squared_loss,
)
from .forgetting import (
                    CartographyRegions,
                    ForgettingRanking,
                    ForgettingTracker,
                    PresentationOutcomes,
                    WithIndex,
                    cartography_regions,
                    presentation_outcomes,
                    regression_outcomes,
)
from .forgetting import rank as forgetting_rank
from .forgetting import read_examples as read_forgetting_examples
from .landscape import (
                    Linearized,
                    LinearPath,
                    LossSlice,
                    filter_normalized_direction,
                    hessian_directions,
                    interpolate_state,
                    linear_path,
                    linearize,
                    reestimate_batchnorm,
                    slice_1d,
                    slice_2d,
)
from .ntk import (
                    NTKMemoryError,
                    SketchedNTK,
                    empirical_ntk,
                    empirical_ntk_reference,
                    estimate_ntk_memory,
                    rademacher_projections,
                    sketched_ntk,
)
from .parent_states import ParentState, read_parent_states
from .probe import BatchLayoutError, Probe, ProbeSet, draw_probe
from .representations import FewShotResult, extract_features, few_shot_accuracy, linear_probe_accuracy
from .schedule import EveryNEpochs, EveryNSteps, LogSpacedSteps, Schedule, StepList
from .spectral import (
                    Eigenpairs,
                    EnergyBaselines,
                    KernelDistanceTrajectory,
                    KernelRegressionScores,
                    KernelRegressionSweep,
                    align_signs,
                    effective_rank,
                    eigen_energy,
                    energy_baselines,
                    kernel_angle,
                    kernel_distance,
                    kernel_distance_trajectory,
                    kernel_frobenius_norm,
                    kernel_matrix,
                    kernel_regression,
                    kernel_regression_scores,
                    kernel_regression_sweep,
                    kernel_target_alignment,
                    kernel_trace,
                    kernel_velocity,
                    nngp_kernel,
                    nystrom_extension,
                    output_energy,
                    residual_energy,
                    subspace_overlap,
                    target_energy,
                    top_eigenpairs,
)
from .store import Field, Run, RunFormatError, RunStore, open_run
from .task import TASKS, Task, TaskError, detect_task

__all__ = [
    "__version__",
    # eNTK
    "CurvatureMemoryError", "NTKMemoryError", "empirical_ntk", "empirical_ntk_reference", "estimate_ntk_memory",
    "SketchedNTK", "rademacher_projections", "sketched_ntk",
    # infinite-width kernels (finite versus infinite)
    "AnalyticKernels", "FiniteInfiniteGap", "analytic_kernels", "finite_infinite_gap", "record_analytic_kernels",
    # curvature
    "EdgeOfStability", "HessianDensityResult", "HessianEigenResult", "HessianTraceResult", "LossSet",
    "PreconditionedSharpnessResult", "SAMSharpnessResult", "edge_of_stability_threshold", "gradient_norm",
    "hessian_density", "hessian_eigs", "hessian_trace", "preconditioned_sharpness", "sam_sharpness",
    "smoothed_density", "squared_loss",
    "BatchLayoutError", "Probe", "ProbeSet", "draw_probe",
    "EveryNEpochs", "EveryNSteps", "LogSpacedSteps", "Schedule", "StepList",
    "Field", "Run", "RunFormatError", "RunStore", "open_run",
    # what outputs and targets mean
    "TASKS", "Task", "TaskError", "detect_task",
    # spectral (kernel dynamics on arrays)
    "Eigenpairs", "EnergyBaselines", "KernelDistanceTrajectory", "KernelRegressionScores", "KernelRegressionSweep",
    "align_signs", "effective_rank", "eigen_energy", "energy_baselines", "kernel_angle", "kernel_distance",
    "kernel_distance_trajectory", "kernel_frobenius_norm", "kernel_matrix", "kernel_regression",
    "kernel_regression_scores", "kernel_regression_sweep", "kernel_target_alignment", "kernel_trace", "kernel_velocity", "nngp_kernel", "nystrom_extension",
    "output_energy", "residual_energy", "subspace_overlap", "target_energy", "top_eigenpairs",
    # forgetting and cartography
    "CartographyRegions", "ForgettingRanking", "ForgettingTracker", "PresentationOutcomes", "cartography_regions",
    "forgetting_rank", "presentation_outcomes", "regression_outcomes", "WithIndex", "read_forgetting_examples",
    # activation codes and representation probes
    "RELU_MODULE_TYPES", "ActivationCodes", "CodeChange", "activation_codes", "cluster_accuracy", "code_change",
    "hamming_distances", "kmeans_accuracy", "knn_accuracy", "logistic_accuracy", "redundancy_ratio",
    "FewShotResult", "extract_features", "few_shot_accuracy", "linear_probe_accuracy",
    # loss landscape: linear paths and barriers, slices, linearised networks
    "LinearPath", "interpolate_state", "linear_path", "reestimate_batchnorm", "LossSlice",
    "filter_normalized_direction", "hessian_directions", "slice_1d", "slice_2d", "Linearized", "linearize",
    # spawning: parent states and what children become (Frankle et al. 2020; Fort et al. 2020)
    "ChildrenComparison", "ParentState", "compare_children", "read_parent_states",
]
