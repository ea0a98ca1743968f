"""Loss and error along the straight line between two weight vectors, and its barriers.

For weights θ_a, θ_b of one architecture and α in [0, 1] (``points`` evenly spaced values),

    θ(α) = (1 − α) θ_a + α θ_b,

the loss L(θ(α)) and error E(θ(α)) on a data set. The error barrier (Frankle et al. 2020,
"Linear mode connectivity and the lottery ticket hypothesis"; Fort et al. 2020 use it on
parent-child spawns) is the largest increase of the error along the path over the mean of
its ends,

    barrier_E = max_α E(θ(α)) − ½ (E(θ_a) + E(θ_b)),

and the loss barrier the same on the loss. Two networks are linearly mode connected when the
barrier is about 0. The maximum is over the evaluated points: more points, a tighter value.

BatchNorm: by default each point's running statistics are re-estimated on
``batchnorm_data`` (default ``data``; see :func:`~lightning_ntk.landscape.reestimate_batchnorm`)
before it is evaluated: interpolated statistics belong to neither network, and the barrier
measured with them is largely an artefact. The evaluation itself is in eval mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from .._args import integer
from ..probe import BatchFormat
from ._evaluate import Data, ErrorFn, ForwardFn, LossFn, Measure, Weights, as_reiterable, as_state, kept_intact, load
from .batchnorm import batchnorm_layers
from .batchnorm import reestimate_batchnorm as _reestimate


@dataclass(frozen=True)
class LinearPath:
    """Loss and error along θ(α) = (1 − α) θ_a + α θ_b (:func:`linear_path`).

    alpha: (P,) the points, 0 to 1. loss, error: (P,) means over the data at each point
    (error NaN for regression without ``error_fn``). task: the task measured.
    batchnorm_reestimated: whether BatchNorm statistics were re-estimated at each point.
    """

    alpha: np.ndarray
    loss: np.ndarray
    error: np.ndarray
    task: str
    batchnorm_reestimated: bool

    @property
    def error_barrier(self) -> float:
        """max over the path of the error minus the mean of its two ends (Frankle et al. 2020)."""
        return _barrier(self.error)

    @property
    def loss_barrier(self) -> float:
        """max over the path of the loss minus the mean of its two ends."""
        return _barrier(self.loss)


def _barrier(values: np.ndarray) -> float:
    return float(np.max(values) - 0.5 * (values[0] + values[-1]))


def interpolate_state(theta_a: Dict[str, torch.Tensor], theta_b: Dict[str, torch.Tensor],
                      alpha: float) -> Dict[str, torch.Tensor]:
    """(1 − α) θ_a + α θ_b entry by entry (``torch.lerp``: exactly θ_a at 0, θ_b at 1, and θ_a
    all along when θ_a = θ_b). Integer entries (``num_batches_tracked``) come from the
    nearer end."""
    out = {}
    for key, a in theta_a.items():
        b = theta_b[key]
        if a.is_floating_point() or a.is_complex():
            out[key] = torch.lerp(a, b, float(alpha))
        else:
            out[key] = (a if alpha < 0.5 else b).clone()
    return out


def linear_path(model: nn.Module, theta_a: Weights, theta_b: Weights, data: Data, *, points: int = 11,
                loss_fn: Optional[LossFn] = None, error_fn: Optional[ErrorFn] = None, task: Optional[str] = None,
                reestimate_batchnorm: bool = True, batchnorm_data: Optional[Data] = None,
                batch_format: BatchFormat = None, forward_fn: Optional[ForwardFn] = None) -> LinearPath:
    """Loss and error of ``model``'s architecture at ``points`` evenly spaced points of the
    segment from ``theta_a`` to ``theta_b`` (see the module docstring for the barriers).

    Args:
        model: a network of the architecture; its weights are replaced point by point and
            restored afterwards, as are its modules' train/eval flags and the global RNG.
        theta_a, theta_b: ``state_dict()`` s of the architecture (every entry: parameters and
            buffers, BatchNorm statistics interpolated too), or flat vectors over
            ``model.parameters()`` (``torch.nn.utils.parameters_to_vector``; buffers then
            stay the model's, so a model with BatchNorm statistics needs
            ``reestimate_batchnorm=True``).
        data: the set the loss and error are means over: a DataLoader, a list of batches or
            one ``(x, y)`` batch, iterated once per point. Batches: ``(x, y, ...)`` tuples,
            dicts with recognised keys (``x``/``y``, ``input_ids``/``labels``, ...), or any
            layout with ``batch_format=`` ((x_key, y_key) or a function batch -> (x, y)).
        points: number of α values, ``np.linspace(0, 1, points)``, at least 2.
        loss_fn: ``loss_fn(outputs, targets)`` -> per-example losses (N,) or the batch mean;
            None: by task (cross-entropy for class labels; see :mod:`._evaluate`).
        error_fn: ``error_fn(outputs, targets)`` -> per-example errors (N,); None: by task.
        task: what outputs and targets are (:data:`lightning_ntk.TASKS`); None: detected
            from the first batch. Regression is refused unless ``task="regression"`` (its
            error is then NaN unless ``error_fn`` is given).
        reestimate_batchnorm: recompute BatchNorm running statistics at each point on
            ``batchnorm_data`` (default on; no effect without BatchNorm layers).
        batchnorm_data: the data for those statistics (default: ``data``; pass the training
            data when ``data`` is a test set).
        forward_fn: ``forward_fn(model, x)`` -> outputs, instead of ``model(x)``.

    Returns:
        :class:`LinearPath` with ``alpha``, ``loss``, ``error``, ``error_barrier``, ``loss_barrier``.
    """
    owner = "linear_path"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
    points = integer(points, "points", owner, minimum=2, hint="the number of points on the path, ends included")
    measure = Measure(data, loss_fn=loss_fn, error_fn=error_fn, task=task, batch_format=batch_format,
                      forward_fn=forward_fn, owner=owner)
    state_a = as_state(model, theta_a, "theta_a", owner)
    state_b = as_state(model, theta_b, "theta_b", owner)
    reestimate = bool(reestimate_batchnorm) and bool(batchnorm_layers(model))
    if not reestimate and batchnorm_layers(model) and set(state_a) != set(model.state_dict()):
        raise ValueError(f"{owner}: theta_a and theta_b are parameter vectors, which hold no BatchNorm statistics, "
                         "and reestimate_batchnorm=False would evaluate every point with the model's current ones; "
                         "pass state_dicts or reestimate_batchnorm=True")
    bn_data = as_reiterable(batchnorm_data if batchnorm_data is not None else data, "batchnorm_data", owner) \
        if reestimate else None
    alpha = np.linspace(0.0, 1.0, points)
    losses, errors = np.empty(points), np.empty(points)
    with kept_intact(model) as measured:
        for i, a in enumerate(alpha):
            load(model, interpolate_state(state_a, state_b, float(a)))
            if reestimate:
                _reestimate(model, bn_data, batch_format=batch_format, forward_fn=forward_fn)
            with torch.no_grad():
                losses[i], errors[i] = measure.run(measured)
    assert measure.task is not None
    return LinearPath(alpha=alpha, loss=losses, error=errors, task=measure.task.name,
                      batchnorm_reestimated=reestimate)

