"""Post-hoc analysis of run files: figures, the HTML report, live watching, exports.

Every figure is a function ``plot_<what>(run, ax=None, **kw)`` returning the matplotlib
Axes it drew on; ``run`` is a :class:`~lightning_ntk.store.Run`, a run-file path, or a list
of them (overlaid and labelled). Each has ``.available(run)``: whether the run holds its
data. Matplotlib, pandas and xarray are needed here (``pip install lightning-ntk[analysis]``);
nothing else in the package imports this module.
"""
from .export import FORMATS as EXPORT_FORMATS
from .export import ExportError, ExportWarning, export_run
from .kernel_dynamics import EigenspaceTracking, KernelDynamics, eigenspace_tracking, kernel_dynamics
from .plots_analytic import plot_distance_to_analytic, plot_scale_to_analytic
from .plots_codes import plot_code_accuracy, plot_code_change, plot_code_redundancy
from .plots_forgetting import plot_cartography, plot_forgetting_histogram
from .plots_landscape import (
                        plot_linearized_accuracy,
                        plot_loss_slices,
                        plot_spawn_barrier,
                        plot_spawn_disagreement,
                        plot_spawn_kernel_distance,
                        plot_spawn_loss_barrier,
                        plot_spawn_paths,
)
from .plots_ntk import (
                        plot_effective_rank,
                        plot_eigen_energy,
                        plot_eigenfunctions,
                        plot_kernel_alignment,
                        plot_kernel_distance,
                        plot_kernel_matrix,
                        plot_kernel_norms,
                        plot_kernel_velocity,
                        plot_krr_accuracy,
                        plot_layer_trace,
                        plot_ntk_eigenvalues,
)
from .plots_probe import plot_grad_norm, plot_probe_accuracy, plot_probe_loss
from .plots_representations import plot_representation_accuracy
from .plots_sharpness import plot_hessian_density, plot_hessian_trace, plot_sharpness, smoothed_density
from .report import SECTIONS, Section, write_report
from .series import plot_series
from .watch import watch

__all__ = [
    "EXPORT_FORMATS", "EigenspaceTracking", "ExportError", "ExportWarning", "KernelDynamics", "eigenspace_tracking", "kernel_dynamics", "SECTIONS", "Section", "export_run", "plot_cartography", "plot_code_accuracy",
    "plot_code_change", "plot_code_redundancy", "plot_effective_rank", "plot_eigen_energy", "plot_eigenfunctions",
    "plot_forgetting_histogram", "plot_grad_norm", "plot_hessian_density", "plot_hessian_trace",
    "plot_kernel_alignment", "plot_kernel_distance", "plot_kernel_matrix", "plot_kernel_norms", "plot_kernel_velocity",
    "plot_krr_accuracy", "plot_layer_trace", "plot_ntk_eigenvalues", "plot_probe_accuracy", "plot_probe_loss",
    "plot_representation_accuracy", "plot_series", "plot_sharpness", "smoothed_density", "watch", "write_report",
    "plot_linearized_accuracy", "plot_loss_slices", "plot_spawn_barrier", "plot_spawn_disagreement",
    "plot_spawn_kernel_distance", "plot_spawn_loss_barrier", "plot_spawn_paths",
    "plot_distance_to_analytic", "plot_scale_to_analytic",
]
