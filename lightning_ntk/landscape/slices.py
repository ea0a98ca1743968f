"""Loss-surface slices: the loss and error on a line or plane through the model's weights,

    1-D:  L(θ* + a d),            2-D:  L(θ* + a d₁ + b d₂),

along filter-normalised random directions (Li et al. 2018, "Visualizing the loss landscape
of neural nets") or along Hessian eigenvectors (PyHessian's 1-D plot; Yao et al. 2020).

Filter normalisation (Li et al. 2018, section 4): a Gaussian direction d of the weights'
shapes is rescaled filter by filter, d_i ← d_i ‖θ_i‖ / ‖d_i‖, where a filter is one slice
along the parameter's first axis (a convolution's output channel, a linear layer's output
row), so a step of a = 1 moves every filter by its own norm and slices of networks of
different scales compare. Parameters with one axis (biases, BatchNorm's weight and bias)
get a zero direction, as in Li et al.'s published figures (their code's
``--xignore biasbn``); ``one_dimensional="copy"`` gives them their own values instead
(their code without that flag). Only the parameters move: BatchNorm running statistics
stay θ*'s (Li et al.'s ``dir_type weights``) unless ``reestimate_batchnorm=True``.

Hessian directions are unit eigenvectors of the Hessian of the mean loss over the data at
θ* (:func:`lightning_ntk.hessian_eigs`, Lanczos), over every trainable parameter; the
coordinates are then in parameter units (‖a d‖ = |a|), not filter-normalised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .._args import one_of
from .._losses import TASK_LOSSES
from ..curvature import HessianEigenResult, hessian_eigs
from ..curvature._common import GeneratorLike, _make_generator
from ..probe import BatchFormat
from ._evaluate import Data, ErrorFn, ForwardFn, LossFn, Measure, as_reiterable, data_pass, kept_intact, load, snapshot
from .batchnorm import batchnorm_layers
from .batchnorm import reestimate_batchnorm as _reestimate

Direction = Dict[str, torch.Tensor]
DEFAULT_COORDS = np.linspace(-1.0, 1.0, 21)


@dataclass(frozen=True)
class LossSlice:
    """Loss and error on a 1-D or 2-D slice (:func:`slice_1d`, :func:`slice_2d`).

    coords: one array per direction. loss, error: (n,) or (n_x, n_y), ``loss[i, j]`` at
    ``coords[0][i], coords[1][j]``. task: the task measured. batchnorm_reestimated: whether
    BatchNorm statistics were recomputed at each point.
    """

    coords: Tuple[np.ndarray, ...]
    loss: np.ndarray
    error: np.ndarray
    task: str
    batchnorm_reestimated: bool


def _trainable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def filter_normalized_direction(model: nn.Module, *, generator: GeneratorLike = None,
                                one_dimensional: str = "zero") -> Direction:
    """A random direction over ``model``'s trainable parameters, filter-normalised as in Li
    et al. 2018 (see the module docstring).

    Args:
        model: the network at θ* (its weights set each filter's norm).
        generator: None (seed 0), an int seed or a ``torch.Generator``.
        one_dimensional: ``"zero"`` (Li et al.'s figures: biases and BatchNorm parameters do
            not move) or ``"copy"`` (the direction is the parameter itself).

    Returns:
        ``{parameter name: direction tensor}`` (shapes, dtypes and devices of the parameters).
    """
    owner = "filter_normalized_direction"
    one_of(one_dimensional, "one_dimensional", ("zero", "copy"), owner)
    gen = _make_generator(generator)
    out: Direction = {}
    for name, p in _trainable(model):
        w = p.detach()
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w) if one_dimensional == "zero" else w.clone()
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        filters = d.reshape(d.shape[0], -1)
        w_norms = w.double().cpu().reshape(w.shape[0], -1).norm(dim=1, keepdim=True)
        filters = filters * (w_norms / filters.norm(dim=1, keepdim=True))
        out[name] = filters.reshape(w.shape).to(w.device, w.dtype)
    return out


def hessian_directions(model: nn.Module, data: Data, k: int = 2, *, loss_fn: Optional[LossFn] = None,
                       task: Optional[str] = None, batch_format: BatchFormat = None, which: str = "LA",
                       tol: float = 1e-3, max_hvp: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                       generator: GeneratorLike = None) -> Tuple[List[Direction], HessianEigenResult]:
    """The top-k Hessian eigenvectors at the model's weights, as slice directions.

    The Hessian is of the mean loss over ``data`` (read once, kept in memory: a fixed set)
    with respect to every trainable parameter, the loss being the one the slices measure:
    in eval mode (BatchNorm on its running statistics, as the slices evaluate it, not
    :func:`~lightning_ntk.hessian_eigs`' default ``mode="train"``), with ``loss_fn`` or the
    task's default loss (cross-entropy for class labels; the mean squared error only with
    ``task="regression"``; sequence tasks need ``loss_fn``).
    Eigenpairs by :func:`lightning_ntk.hessian_eigs` (Lanczos, residual stopping rule;
    ``which``, ``tol``, ``max_hvp``, ``dtype``, ``generator`` passed on).

    Returns:
        (directions, result): k unit vectors as ``{parameter name: tensor}``, and the
        :class:`~lightning_ntk.HessianEigenResult` (eigenvalues, residuals).
    """
    owner = "hessian_directions"
    measure = Measure(data, loss_fn=loss_fn, error_fn=None, task=task, batch_format=batch_format, forward_fn=None,
                      owner=owner)
    if loss_fn is None:
        found = measure.detect(model)
        if found.kind not in TASK_LOSSES:
            raise ValueError(f"{owner}: no default Hessian loss for task {found.name!r}; pass loss_fn=(outputs, "
                             "targets) -> per-example losses")
        loss_fn = TASK_LOSSES[found.kind]
    with data_pass():  # the set read with the seed every pass of this package uses
        result = hessian_eigs(model, loss_fn, measure.data, k, which=which, tol=tol, max_hvp=max_hvp,
                              return_eigenvectors=True, generator=generator, dtype=dtype, batch_format=batch_format,
                              mode="eval")
    params = dict(_trainable(model))
    directions = []
    for i in range(k):
        parts = result.eigenvector_params(i)
        directions.append({name: part.to(params[name].device, params[name].dtype)
                           for name, part in zip(result.param_names, parts)})
    return directions, result


def _coords(values: Union[Sequence[float], np.ndarray, None], name: str, owner: str) -> np.ndarray:
    out = DEFAULT_COORDS.copy() if values is None else np.asarray(values, dtype=np.float64).reshape(-1)
    if out.size == 0 or not np.all(np.isfinite(out)):
        raise ValueError(f"{owner}: {name} must be a non-empty sequence of finite numbers, got {values!r}")
    return out


def _check_direction(model: nn.Module, direction: Direction, name: str, owner: str) -> Direction:
    params = dict(model.named_parameters())
    if not isinstance(direction, dict):
        raise TypeError(f"{owner}: {name} must be a dict {{parameter name: tensor}} (filter_normalized_direction, "
                        f"hessian_directions), got {type(direction).__name__}")
    for key, value in direction.items():
        if key not in params:
            raise ValueError(f"{owner}: {name} has {key!r}, which is not a parameter of the model")
        if not isinstance(value, torch.Tensor) or value.shape != params[key].shape:
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{owner}: {name}[{key!r}] has shape {found}, the parameter {tuple(params[key].shape)}")
    return {k: v.detach().to(params[k].device, params[k].dtype) for k, v in direction.items()}


def _surface(model: nn.Module, data: Data, directions: List[Direction], grids: List[np.ndarray], owner: str, *,
             loss_fn: Optional[LossFn], error_fn: Optional[ErrorFn], task: Optional[str],
             reestimate_batchnorm: bool, batchnorm_data: Optional[Data], batch_format: BatchFormat,
             forward_fn: Optional[ForwardFn]) -> LossSlice:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
    directions = [_check_direction(model, d, f"direction {i + 1}", owner) for i, d in enumerate(directions)]
    measure = Measure(data, loss_fn=loss_fn, error_fn=error_fn, task=task, batch_format=batch_format,
                      forward_fn=forward_fn, owner=owner)
    reestimate = bool(reestimate_batchnorm) and bool(batchnorm_layers(model))
    bn_data = as_reiterable(batchnorm_data if batchnorm_data is not None else data, "batchnorm_data", owner) \
        if reestimate else None
    shape = tuple(len(g) for g in grids)
    losses, errors = np.empty(shape), np.empty(shape)
    center = {k: v for k, v in snapshot(model).items() if k in dict(model.named_parameters())}
    with kept_intact(model) as measured:
        for index in np.ndindex(*shape):
            point = {}
            for key, value in center.items():
                moved = value.clone()
                for d, g, i in zip(directions, grids, index):
                    if key in d:
                        moved.add_(d[key], alpha=float(g[i]))
                point[key] = moved
            load(model, point)
            if reestimate:
                _reestimate(model, bn_data, batch_format=batch_format, forward_fn=forward_fn)
            with torch.no_grad():
                losses[index], errors[index] = measure.run(measured)
    assert measure.task is not None
    return LossSlice(coords=tuple(grids), loss=losses, error=errors, task=measure.task.name,
                     batchnorm_reestimated=reestimate)


def slice_1d(model: nn.Module, data: Data, direction: Direction, *,
             coords: Union[Sequence[float], np.ndarray, None] = None, loss_fn: Optional[LossFn] = None,
             error_fn: Optional[ErrorFn] = None, task: Optional[str] = None, reestimate_batchnorm: bool = False,
             batchnorm_data: Optional[Data] = None, batch_format: BatchFormat = None,
             forward_fn: Optional[ForwardFn] = None) -> LossSlice:
    """Loss and error at θ* + a·d for a in ``coords`` (default ``np.linspace(-1, 1, 21)``),
    θ* the model's current weights (restored afterwards, with its modes and the RNG).

    ``direction``: ``{parameter name: tensor}`` (:func:`filter_normalized_direction`,
    :func:`hessian_directions`, or your own; parameters it leaves out do not move).
    ``reestimate_batchnorm``: default off, Li et al.'s setting (statistics stay θ*'s).
    The other arguments are :func:`~lightning_ntk.landscape.linear_path`'s.
    """
    owner = "slice_1d"
    return _surface(model, data, [direction], [_coords(coords, "coords", owner)], owner, loss_fn=loss_fn,
                    error_fn=error_fn, task=task, reestimate_batchnorm=reestimate_batchnorm,
                    batchnorm_data=batchnorm_data, batch_format=batch_format, forward_fn=forward_fn)


def slice_2d(model: nn.Module, data: Data, direction_x: Direction, direction_y: Direction, *,
             coords_x: Union[Sequence[float], np.ndarray, None] = None,
             coords_y: Union[Sequence[float], np.ndarray, None] = None, loss_fn: Optional[LossFn] = None,
             error_fn: Optional[ErrorFn] = None, task: Optional[str] = None, reestimate_batchnorm: bool = False,
             batchnorm_data: Optional[Data] = None, batch_format: BatchFormat = None,
             forward_fn: Optional[ForwardFn] = None) -> LossSlice:
    """Loss and error at θ* + a·d_x + b·d_y on the grid ``coords_x`` × ``coords_y`` (each
    default ``np.linspace(-1, 1, 21)``): ``loss[i, j]`` at ``(coords_x[i], coords_y[j])``.
    Each point costs one pass over ``data``. See :func:`slice_1d`."""
    owner = "slice_2d"
    return _surface(model, data, [direction_x, direction_y],
                    [_coords(coords_x, "coords_x", owner), _coords(coords_y, "coords_y", owner)], owner,
                    loss_fn=loss_fn, error_fn=error_fn, task=task, reestimate_batchnorm=reestimate_batchnorm,
                    batchnorm_data=batchnorm_data, batch_format=batch_format, forward_fn=forward_fn)
