"""What children spawned from one parent state have become (Frankle et al. 2020; Fort et al. 2020).

For k ≥ 2 children θ_1..θ_k trained from the parent θ_p (same weights, different SGD noise),
per pair (i < j):

* error and loss barrier on the linear path θ(α) = (1 − α) θ_i + α θ_j
  (:func:`lightning_ntk.linear_path`: max over the path minus the mean of the ends, BatchNorm
  statistics re-estimated at each point);
* weight distance ‖θ_i − θ_j‖₂ over the trainable parameters;
* disagreement: the fraction of probe examples whose predicted class differs (argmax; the
  sign of the logit for binary tasks; per position for sequences: the probe holds inputs only, so
  every position counts, padding included);
* kernel distance S(K_i, K_j) = 1 − ⟨K_i, K_j⟩_F / (‖K_i‖_F ‖K_j‖_F) of the eNTKs on the probe
  (Fort et al. 2020);

and per child: its loss and error (the path's ends), ‖θ_i − θ_p‖₂ and S(K_i, K_p).
Everything is Lightning-free: networks are any ``nn.Module`` and weights ``state_dict`` s.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import _args
from ._hygiene import measurement_mode, module_device
from .landscape import linear_path
from .landscape._evaluate import as_state, forward, kept_intact, load
from .ntk import empirical_ntk
from .spectral import kernel_distance

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ChildrenComparison:
    """Pairwise and per-child measurements of children spawned from one parent
    (:func:`compare_children`); pair p joins children ``pairs[p, 0] < pairs[p, 1]``."""

    pairs: np.ndarray  # (P, 2)
    error_barrier: np.ndarray  # (P,)
    loss_barrier: np.ndarray  # (P,)
    weight_distance: np.ndarray  # (P,)
    disagreement: np.ndarray  # (P,)
    kernel_distance: np.ndarray  # (P,)
    alpha: np.ndarray  # (points,)
    path_error: np.ndarray  # (P, points)
    path_loss: np.ndarray  # (P, points)
    child_error: np.ndarray  # (k,)
    child_loss: np.ndarray  # (k,)
    distance_to_parent: np.ndarray  # (k,)
    kernel_distance_to_parent: np.ndarray  # (k,)
    parent_norm: float
    task: str
    kernel_kind: str


def trainable_names(model: nn.Module) -> List[str]:
    """Names of ``model``'s trainable parameters (tied ones once)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def weight_distance(state_a: State, state_b: State, names: Sequence[str]) -> float:
    """‖θ_a − θ_b‖₂ over the entries ``names`` (float64)."""
    total = 0.0
    for name in names:
        diff = state_a[name].detach().double().cpu() - state_b[name].detach().double().cpu()
        total += float((diff * diff).sum())
    return float(np.sqrt(total))


def predictions(outputs: torch.Tensor, task: str) -> Optional[torch.Tensor]:
    """The predicted class of each unit (example, or token for sequences), or None when the
    task has no single predicted class (multilabel, regression)."""
    if task == "multiclass":
        return outputs.argmax(dim=1)
    if task == "binary":
        return outputs.reshape(outputs.shape[0], -1)[:, 0] > 0
    if task in ("sequence", "causal_lm"):
        return outputs.argmax(dim=-1)
    return None


def compare_children(model: nn.Module, children: Sequence[State], parent: State, data: Any, probe_x: Any, *,
                     points: int = 11, kernel: str = "trace", batchnorm_data: Any = None,
                     loss_fn: Optional[Callable[..., Any]] = None, error_fn: Optional[Callable[..., Any]] = None,
                     task: Optional[str] = None, forward_fn: Optional[Callable[..., Any]] = None,
                     kernel_dtype: Optional[torch.dtype] = None) -> ChildrenComparison:
    """Barriers, distances, disagreement and eNTK distances of ``children`` (state_dicts of
    ``model``'s architecture) spawned from ``parent`` (see the module docstring).

    Args:
        model: a network of the architecture (its weights, modes and the RNGs are restored).
        children: k ≥ 2 state_dicts.
        parent: the parent's state_dict.
        data: the set of the barriers and each child's loss and error (a test set: Frankle
            et al.); ``batchnorm_data`` (default ``data``): the set BatchNorm statistics are
            re-estimated on at each point of a path (pass the training data).
        probe_x: the inputs of the disagreement and of the eNTKs (a batch).
        points: points on each linear path (ends included).
        kernel: the eNTK kind (:func:`lightning_ntk.empirical_ntk`), ``"trace"`` by default.
        loss_fn, error_fn, task, forward_fn: as for :func:`lightning_ntk.linear_path`.
        kernel_dtype: dtype of the eNTKs (default: the parameters').
    """
    owner = "compare_children"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
    if len(children) < 2:
        raise ValueError(f"{owner}: children must hold at least 2 state_dicts (a barrier joins two networks), got "
                         f"{len(children)}")
    points = _args.integer(points, "points", owner, minimum=2)
    states = [as_state(model, c, f"children[{i}]", owner) for i, c in enumerate(children)]
    parent_state = as_state(model, parent, "parent", owner)
    names = trainable_names(model)
    pairs = np.array(list(combinations(range(len(states)), 2)), dtype=np.int64)
    P = len(pairs)
    out: Dict[str, np.ndarray] = {k: np.full(P, np.nan) for k in ("error_barrier", "loss_barrier", "weight_distance",
                                                                  "disagreement", "kernel_distance")}
    path_error, path_loss = np.full((P, points), np.nan), np.full((P, points), np.nan)
    child_error, child_loss = np.full(len(states), np.nan), np.full(len(states), np.nan)
    alpha = np.linspace(0.0, 1.0, points)
    task_name = task
    for p, (i, j) in enumerate(pairs):
        path = linear_path(model, states[i], states[j], data, points=points, loss_fn=loss_fn, error_fn=error_fn,
                           task=task_name, batchnorm_data=batchnorm_data, forward_fn=forward_fn)
        task_name = path.task
        out["error_barrier"][p], out["loss_barrier"][p] = path.error_barrier, path.loss_barrier
        path_error[p], path_loss[p], alpha = path.error, path.loss, path.alpha
        for child, end in ((i, 0), (j, -1)):
            if np.isnan(child_loss[child]):
                child_error[child], child_loss[child] = path.error[end], path.loss[end]
        out["weight_distance"][p] = weight_distance(states[i], states[j], names)
    # The network's own outputs and kernels: each child (and the parent) with its own buffers.
    outputs: List[torch.Tensor] = []
    kernels: List[np.ndarray] = []
    for state in [parent_state, *states]:
        outs, K = _outputs_and_kernel(model, state, probe_x, kernel, forward_fn, kernel_dtype)
        outputs.append(outs)
        kernels.append(K)
    predicted = [predictions(o, task_name) for o in outputs[1:]]
    for p, (i, j) in enumerate(pairs):
        if predicted[i] is not None:
            out["disagreement"][p] = float((predicted[i] != predicted[j]).double().mean())
        out["kernel_distance"][p] = kernel_distance(kernels[1 + i], kernels[1 + j])
    return ChildrenComparison(
        pairs=pairs, alpha=alpha, path_error=path_error, path_loss=path_loss, child_error=child_error,
        child_loss=child_loss,
        distance_to_parent=np.array([weight_distance(s, parent_state, names) for s in states]),
        kernel_distance_to_parent=np.array([kernel_distance(K, kernels[0]) for K in kernels[1:]]),
        parent_norm=weight_distance(parent_state, {n: torch.zeros_like(parent_state[n]) for n in names}, names),
        task=str(task_name), kernel_kind=kernel, **out)


def _outputs_and_kernel(model: nn.Module, state: Dict[str, torch.Tensor], x: Any, kernel: str,
                        forward_fn: Optional[Callable[..., Any]],
                        dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, np.ndarray]:
    """Outputs on ``x`` and the eNTK of ``model`` at ``state`` (eval mode; model restored)."""
    device = module_device(model)
    x = x.to(device) if isinstance(x, torch.Tensor) else x
    with kept_intact(model):
        load(model, state)
        with measurement_mode(model, grad=False) as measured:
            outputs = forward(measured, x, forward_fn).detach().cpu()
        with measurement_mode(model) as measured:
            net = _Predictions(measured, forward_fn)
            K = empirical_ntk(net, x, kind=kernel, dtype=dtype)
    return outputs, K.detach().double().cpu().numpy()


class _Predictions(nn.Module):
    """``model`` as a module returning the predictions tensor (for the eNTK)."""

    def __init__(self, model: nn.Module, forward_fn: Optional[Callable[..., Any]]):
        super().__init__()
        self.model = model
        self._forward_fn = forward_fn

    def forward(self, x: Any) -> torch.Tensor:
        return forward(self.model, x, self._forward_fn)


def evaluate(model: nn.Module, data: Any, *, loss_fn: Optional[Callable[..., Any]] = None,
             error_fn: Optional[Callable[..., Any]] = None, task: Optional[str] = None,
             forward_fn: Optional[Callable[..., Any]] = None) -> Tuple[float, float, str]:
    """(mean loss, mean error, task) of ``model`` as it is on ``data`` (eval mode, model and
    RNGs restored), by the task rules of :func:`lightning_ntk.linear_path`."""
    from .landscape._evaluate import Measure

    measure = Measure(data, loss_fn=loss_fn, error_fn=error_fn, task=task, batch_format=None, forward_fn=forward_fn,
                      owner="evaluate")
    with kept_intact(model) as measured:
        loss, error = measure.run(measured)
    assert measure.task is not None
    return loss, error, measure.task.name
