"""Empirical neural tangent kernels: exact, fast on every architecture, bounded in memory.

:func:`empirical_ntk` computes Theta(x1, x2) = J(x1) J(x2)^T (kinds full, trace, diagonal,
pseudo) by per-layer structured rules, ``torch.func`` Jacobian contraction or NTK-vector
products; :func:`empirical_ntk_reference` is the float64 brute force to check it against.
:func:`sketched_ntk` estimates the trace kernel from random output projections, for
models with many outputs.
See ``docs/ntk.md``.
"""
from ._empirical import KINDS, METHODS, NTKMemoryEstimate, empirical_ntk, estimate_ntk_memory
from ._memory import NTKMemoryError, parse_memory
from ._reference import empirical_ntk_reference
from ._sketch import SketchedNTK, rademacher_projections, sketched_ntk

__all__ = [
    "KINDS",
    "METHODS",
    "NTKMemoryError",
    "NTKMemoryEstimate",
    "SketchedNTK",
    "empirical_ntk",
    "empirical_ntk_reference",
    "estimate_ntk_memory",
    "parse_memory",
    "rademacher_projections",
    "sketched_ntk",
]
