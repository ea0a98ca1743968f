"""Loss-landscape geometry (functional core, no Lightning): the linear path between two
networks and its error/loss barriers (Frankle et al. 2020; Fort et al. 2020), BatchNorm
statistics re-estimated per point, loss-surface slices along filter-normalised random
directions (Li et al. 2018) and Hessian eigenvectors, and the linearised network
f(θ₀) + J(θ₀)(θ − θ₀) trainable by any optimiser (Lee et al. 2019; Fort et al. 2020).
"""
from .batchnorm import batchnorm_layers, reestimate_batchnorm
from .interpolation import LinearPath, interpolate_state, linear_path
from .linearized import Linearized, linearize
from .slices import LossSlice, filter_normalized_direction, hessian_directions, slice_1d, slice_2d

__all__ = ["LinearPath", "Linearized", "LossSlice", "filter_normalized_direction", "hessian_directions",
           "slice_1d", "slice_2d", "batchnorm_layers", "interpolate_state", "linear_path", "linearize", "reestimate_batchnorm"]
