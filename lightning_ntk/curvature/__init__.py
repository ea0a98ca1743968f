"""Loss-landscape curvature: Hessian eigenpairs, trace, spectral density, sharpness.

Everything here works on the Hessian of the *mean training loss over a fixed set of
examples* with respect to the model's trainable parameters,

    L(theta) = (1/N) sum_i l(f(x_i; theta), y_i),      H = d^2 L / d theta^2,

as in Cohen et al. 2021 ("Gradient descent on neural networks typically occurs at the edge
of stability"), who measure sharpness as the top eigenvalue of H on a fixed subset of the
training set. Batches may have different sizes: each batch's mean loss is weighted by its
size / N, so the result does not depend on how the set is cut into batches.

All functions are matrix-free (Hessian-vector products, "HVPs") and plain PyTorch. They are
safe to call in the middle of training:

* the model's parameters are never written (a functional copy is used, via
  ``torch.func.functional_call``), so they are bit-identical afterwards;
* ``.grad`` is never touched (``torch.autograd.grad`` / ``torch.func``, no ``.backward``);
* by default (``mode="train"``, Cohen et al.'s HVPs in training mode) BatchNorm layers
  normalise with the batch's statistics and every other module is in eval mode (dropout
  off; an InstanceNorm that tracks running statistics uses them); ``mode="eval"`` puts every module in eval mode. Each module's
  own train/eval flag is restored afterwards (PyHessian calls ``model.eval()`` and leaves
  it there); buffers are passed as copies, so running statistics never change;
* the global RNG is forked around the computation, and random start vectors come from a
  local ``torch.Generator`` (seeded by ``generator``; default seed 0).

Default losses (``loss_fn=None``, the package's ``per_example_loss``): integer targets ->
cross-entropy; floating targets -> Cohen et al.'s squared loss ``0.5 * ||f(x) - y||^2``
summed over the outputs (their ``SquaredLoss``, used with one-hot 0/1 targets); both
averaged over examples. A user ``loss_fn(outputs, targets)`` returns per-example losses
(N,) or their mean.

Batches: an ``(x, y)`` pair (or ``(x, y, ...)``, a dict, a :class:`ProbeSet`), an iterable
of batches or a DataLoader; layouts as in :func:`lightning_ntk.probe.batch_to_xy`
(``batch_format=`` for others).

:class:`LossSet` holds that loss once (parameters selected, batches read and cast, loss
chosen, examples counted); every estimator takes one, ``hessian_eigs(loss_set, k)``, or
builds one from ``(model, loss_fn, batches, ..., dtype=, params=)`` as before. Build one and
share it when computing several quantities on the same set.

Layout, one file per quantity: ``_loss_set`` (LossSet), ``_hvp`` (Hessian-vector
products), ``_eigs`` (Lanczos eigenpairs), ``_trace`` (Hutch++), ``_density`` (SLQ),
``_sam`` (gradient norm, SAM), ``_edge_of_stability``, ``_preconditioned`` (Adam),
``_parallel`` (data_parallel), ``_common`` (shared helpers, memory guard).
"""
from __future__ import annotations

from ._common import Batches, CurvatureMemoryError, GeneratorLike, LossFn, Tensor  # noqa: F401 - type aliases
from ._density import HessianDensityResult, hessian_density, smoothed_density
from ._edge_of_stability import EdgeOfStability, edge_of_stability_threshold
from ._eigs import WHICH, HessianEigenResult, hessian_eigs  # noqa: F401 - WHICH: the orders hessian_eigs takes
from ._hvp import _HVP, HVP_METHODS  # noqa: F401 - for benchmarks/sharpness.py
from ._loss_set import LossSet, _LossSet, squared_loss  # noqa: F401 - _LossSet: benchmarks/sharpness.py
from ._parallel import data_parallel
from ._preconditioned import PreconditionedSharpnessResult, preconditioned_sharpness
from ._sam import SAMSharpnessResult, gradient_norm, sam_sharpness
from ._trace import TRACE_METHODS, HessianTraceResult, hessian_trace  # noqa: F401 - TRACE_METHODS

# Settings, read at every call from here (``lightning_ntk.curvature.MEMORY_FRACTION = 0.5``).
#: The share of the memory free on the device one Lanczos basis or Hutch++ sketch may take.
MEMORY_FRACTION = 0.8
_MEMORY_CHECK_FROM = 64 * 2**20  # bytes: smaller allocations are not checked
#: ``hvp="auto"`` keeps the gradient graphs of several batches when they take at most this
#: share of the free memory, and at most RETAIN_MAX_BYTES.
RETAIN_FRACTION = 0.25
RETAIN_MAX_BYTES = 4 * 2**30

__all__ = [
    "CurvatureMemoryError",
    "LossSet",
    "HessianEigenResult",
    "HessianTraceResult",
    "HessianDensityResult",
    "SAMSharpnessResult",
    "EdgeOfStability",
    "PreconditionedSharpnessResult",
    "data_parallel",
    "hessian_eigs",
    "hessian_trace",
    "hessian_density",
    "smoothed_density",
    "gradient_norm",
    "sam_sharpness",
    "edge_of_stability_threshold",
    "preconditioned_sharpness",
    "squared_loss",
]
