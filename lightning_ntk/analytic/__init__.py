"""Infinite-width kernels next to the empirical NTK (Lee et al. 2020, "Finite versus
infinite neural networks: an empirical study").

* :func:`analytic_kernels`: the analytic NNGP and NTK (float64) of a PyTorch network built
  from Linear, Conv, ReLU/LeakyReLU/GELU/Erf (closed forms), average pooling, Flatten and
  :class:`Residual` blocks, in standard or NTK
  parameterisation, with the variances read from the module's initialisation or given.
* :func:`finite_infinite_gap`: how far a finite network's eNTK is from that limit.
* :func:`record_analytic_kernels`: the analytic kernels of a run's probe, into its run file.
"""
from ._convert import SUPPORTED, Erf, LayerVariances, Residual
from ._finite_infinite import FiniteInfiniteGap, finite_infinite_gap
from ._kernels import PARAMETERIZATIONS, AnalyticKernels, analytic_kernels
from ._record import record_analytic_kernels

__all__ = ["SUPPORTED", "PARAMETERIZATIONS", "AnalyticKernels", "Erf", "FiniteInfiniteGap", "LayerVariances",
           "Residual", "analytic_kernels", "finite_infinite_gap", "record_analytic_kernels"]
