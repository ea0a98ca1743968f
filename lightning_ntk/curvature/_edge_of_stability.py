"""Edge-of-stability thresholds: the sharpness at which an optimiser's step turns unstable."""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import torch


class EdgeOfStability(NamedTuple):
    """``(threshold, description)`` from :func:`edge_of_stability_threshold`."""

    threshold: Optional[float]
    description: str


#: Appended to the descriptions: what the edge-of-stability claim covers.
_FULL_BATCH_NOTE = " (Cohen et al.'s edge of stability is for full-batch GD; with mini-batches a bound, not a plateau)"

_ADAPTIVE = {
    "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam",
    "Rprop", "Adafactor",
}


def _unwrap_optimizer(optimizer: Any) -> Any:
    # Lightning's LightningOptimizer keeps the torch optimizer in ``_optimizer``.
    inner = getattr(optimizer, "_optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    return optimizer


def _group_value(groups: List[dict], key: str, default: Any = None) -> Tuple[bool, Any]:
    vals = [float(g.get(key, default)) if g.get(key, default) is not None else None for g in groups]
    same = all(v == vals[0] for v in vals)
    return same, vals[0]


def edge_of_stability_threshold(optimizer: Any) -> EdgeOfStability:
    """Sharpness at which the optimiser's step becomes unstable on a quadratic.

    On a quadratic with curvature lambda, with the current learning rate eta:

    * plain gradient descent (SGD, momentum 0): ``2 / eta``;
    * heavy-ball momentum beta (PyTorch SGD, dampening tau): ``(2 + 2 beta) / ((1 - tau) eta)``
      (``(2 + 2 beta) / eta`` for tau = 0, Cohen et al. 2021);
    * Nesterov momentum beta: ``(2 + 2 beta) / ((1 + 2 beta) eta)`` (Cohen et al. 2021);

    from the characteristic polynomial of the linear recursion (instability at the root -1).
    L2 ``weight_decay`` wd adds wd to every Hessian eigenvalue of the objective the optimiser
    follows; the threshold returned is for the Hessian of the loss *without* that term,
    i.e. the value above minus wd (said in the description).

    These are stability bounds of the full-batch step. Cohen et al.'s edge-of-stability
    finding (sharpness rises to the threshold and hovers there) is for full-batch gradient
    descent (with and without momentum); with mini-batch SGD the sharpness typically stays
    below it, so the descriptions say "full-batch" and a mini-batch run should read the
    threshold as a bound, not as a predicted plateau.

    Adaptive optimisers (Adam, AdamW, RMSprop, ...): ``(None, "adaptive optimiser: no simple
    threshold ...")`` (for Adam see :func:`preconditioned_sharpness`). Param groups with
    different learning rates or momenta: None. Accepts a Lightning ``LightningOptimizer``.
    """
    opt = _unwrap_optimizer(optimizer)
    name = type(opt).__name__
    groups = getattr(opt, "param_groups", None)
    if not groups:
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (with param_groups), got {name}")
    if name in _ADAPTIVE or isinstance(opt, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)):
        extra = "; see preconditioned_sharpness" if name in ("Adam", "AdamW") else ""
        return EdgeOfStability(None, f"adaptive optimiser: no simple threshold ({name}{extra})")
    if not isinstance(opt, torch.optim.SGD):
        return EdgeOfStability(None, f"optimiser {name}: no stability threshold known")
    same_lr, lr = _group_value(groups, "lr")
    same_mom, beta = _group_value(groups, "momentum", 0.0)
    same_damp, tau = _group_value(groups, "dampening", 0.0)
    same_wd, wd = _group_value(groups, "weight_decay", 0.0)
    nesterovs = {bool(g.get("nesterov", False)) for g in groups}
    if not (same_lr and same_mom and same_damp and same_wd) or len(nesterovs) != 1:
        return EdgeOfStability(None, f"{name}: param groups differ in lr/momentum/dampening/weight_decay: no single threshold")
    if any(g.get("maximize", False) for g in groups):
        return EdgeOfStability(None, f"{name} with maximize=True: no threshold for ascent")
    if lr is None or lr <= 0:
        return EdgeOfStability(None, f"{name}: learning rate {lr} <= 0")
    nesterov = nesterovs.pop()
    if beta == 0.0:
        thr, desc = 2.0 / lr, f"full-batch GD: 2/lr, lr={lr:g}{_FULL_BATCH_NOTE}"
    elif nesterov:
        thr = (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr)
        desc = f"full-batch Nesterov momentum: (2+2b)/((1+2b) lr), b={beta:g}, lr={lr:g}{_FULL_BATCH_NOTE}"
    else:
        thr = (2.0 + 2.0 * beta) / ((1.0 - tau) * lr)
        desc = f"full-batch heavy-ball momentum: (2+2b)/lr, b={beta:g}, lr={lr:g}{_FULL_BATCH_NOTE}"
        if tau:
            desc = (f"full-batch heavy-ball momentum with dampening: (2+2b)/((1-d) lr), b={beta:g}, d={tau:g}, "
                    f"lr={lr:g}{_FULL_BATCH_NOTE}")
    if wd:
        thr -= wd
        desc += f"; minus weight_decay={wd:g} (threshold for the loss Hessian without the L2 term)"
    return EdgeOfStability(thr, desc)
