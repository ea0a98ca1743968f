"""First-order quantities on the full set: gradient norm and SAM's rho-sharpness."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._args import number
from ._loss_set import LossSet, accepts_model_form


@dataclass
class SAMSharpnessResult:
    """Output of :func:`sam_sharpness`: ``sharpness = perturbed_loss - loss``."""

    sharpness: float
    loss: float
    perturbed_loss: float
    gradient_norm: float
    rho: float


@accepts_model_form()
def gradient_norm(loss_set: LossSet) -> float:
    """Euclidean norm ``||grad L(theta)||`` of the full-set mean-loss gradient.

    Called with a :class:`LossSet` or as ``gradient_norm(model, loss_fn, batches, ...)``.
    """
    return float(torch.linalg.vector_norm(loss_set.gradient().double()))


@accepts_model_form()
def sam_sharpness(loss_set: LossSet, rho: float = 0.05) -> SAMSharpnessResult:
    """rho-sharpness of SAM (Foret et al. 2021), first-order ascent, on the full set:

        eps = rho * g / ||g||,   g = grad L(theta),   sharpness = L(theta + eps) - L(theta).

    (Foret et al.'s ``max_{||eps|| <= rho} L(theta + eps) - L(theta)`` with their one-step
    approximation of the maximiser; m-sharpness with m = the whole set.) The perturbed
    loss is evaluated on a functional copy: the model's parameters are never modified.
    A zero gradient gives eps = 0 and sharpness 0. Called with a :class:`LossSet` or as
    ``sam_sharpness(model, loss_fn, batches, rho, ...)``.
    """
    rho = number(rho, "rho", "sam_sharpness", minimum=0, hint="the ascent radius")
    ls = loss_set
    with ls.measuring():
        loss, g = ls.loss_and_gradient()
        gn = float(torch.linalg.vector_norm(g.double()))
        if gn == 0.0 or rho == 0.0:
            return SAMSharpnessResult(0.0, loss, loss, gn, rho)
        eps = ls.unflatten(g * (rho / gn))
        theta_eps = [t + e for t, e in zip(ls.theta, eps)]
        loss_eps = ls.loss(theta_eps)
    return SAMSharpnessResult(loss_eps - loss, loss, loss_eps, gn, rho)
