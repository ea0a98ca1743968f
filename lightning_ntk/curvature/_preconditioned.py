"""Adam's preconditioned sharpness ``lambda_max(P^-1/2 H P^-1/2)`` (Cohen et al. 2022)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .._args import integer, one_of
from .._lanczos import lanczos_eigs
from ._common import GeneratorLike, Tensor, _make_generator, _memory_guard
from ._edge_of_stability import _unwrap_optimizer
from ._eigs import _start_vector, _validate_common
from ._loss_set import LossSet, accepts_model_form


@dataclass
class PreconditionedSharpnessResult:
    """Output of :func:`preconditioned_sharpness` (Adam / AdamW)."""

    eigenvalues: Tensor
    residuals: Tensor
    n_hvp: int
    converged: bool
    threshold: float
    description: str


@accepts_model_form(lead=1, keywords=("dtype", "mode", "batch_format"))
def preconditioned_sharpness(
    loss_set: LossSet,
    optimizer: Any,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_hvp: Optional[int] = None,
    hvp: str = "auto",
    generator: GeneratorLike = None,
    preconditioner: str = "cohen2022",
) -> PreconditionedSharpnessResult:
    """Top eigenvalues of Adam's preconditioned Hessian ``P^{-1/2} H P^{-1/2}``.

    Cohen et al. 2022 ("Adaptive gradient methods at the edge of stability") write Adam's
    step as ``theta_{t+1} = theta_t - eta P_t^{-1} m_t`` with ``m_t`` the raw first-moment
    EMA, so both bias corrections sit in the diagonal preconditioner

        P_t = (1 - beta1^t) [diag(sqrt(v_t / (1 - beta2^t))) + eps I]

    (``max_exp_avg_sq`` in place of ``v_t`` under amsgrad), with t the optimiser's step
    count: the preconditioner of the step just taken. The preconditioned sharpness
    ``lambda_max(P^{-1} H) = lambda_max(P^{-1/2} H P^{-1/2})`` equilibrates at
    ``(2 + 2 beta1) / ((1 - beta1) eta)`` (38/eta for beta1 = 0.9), returned as ``threshold``;
    that threshold is derived for the EMA form of the step, which is why the (1 - beta1^t)
    factor belongs to P. ``preconditioner="init2winit"``: the preconditioner without it,
    ``diag(sqrt(v_t / (1 - beta2^t))) + eps I``, as in init2winit's
    ``make_diag_preconditioner`` (the authors' library; "the optimizer update without
    momentum"). The two differ early in training (1 - 0.9^t: 0.65 at t = 10, 0.995 at
    t = 50) and agree later.
    The parameters taken are those in the optimiser that have Adam state (call after at
    least one step); a :class:`LossSet` over other parameters is narrowed to them with
    :meth:`LossSet.select` (same batches). Same Lanczos and stopping rule as
    :func:`hessian_eigs`. Called as ``preconditioned_sharpness(loss_set, optimizer, k)`` or
    ``preconditioned_sharpness(model, optimizer, loss_fn, batches, k, ...)``.
    """
    owner = "preconditioned_sharpness"
    _validate_common(owner, k, "LA", tol)
    one_of(preconditioner, "preconditioner", ("cohen2022", "init2winit"), owner)
    opt = _unwrap_optimizer(optimizer)
    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"preconditioned_sharpness supports torch.optim.Adam and AdamW, got {type(opt).__name__}")
    named = dict(loss_set.model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    names, diag, groups_seen = [], [], []
    for g in opt.param_groups:
        b1, b2 = g["betas"]
        for p in g["params"]:
            if not p.requires_grad or id(p) not in by_id:
                continue
            st = opt.state.get(p, {})
            if "exp_avg_sq" not in st:
                raise ValueError(
                    "the optimizer has no Adam state for some parameters yet: call after at least one optimizer step"
                )
            step = float(st["step"])
            v = st["max_exp_avg_sq"] if g.get("amsgrad", False) else st["exp_avg_sq"]
            pre = (v.detach().double() / (1.0 - b2 ** step)).sqrt() + g["eps"]
            if preconditioner == "cohen2022":
                pre = (1.0 - b1 ** step) * pre
            names.append(by_id[id(p)])
            diag.append(pre.reshape(-1))
            groups_seen.append((float(g["lr"]), float(b1)))
    if not names:
        raise ValueError("none of the optimizer's parameters belong to the model")
    if len(set(groups_seen)) != 1:
        thr, desc = float("nan"), "param groups differ in lr or beta1: no single threshold"
    else:
        lr, b1 = groups_seen[0]
        thr = (2.0 + 2.0 * b1) / ((1.0 - b1) * lr)
        desc = f"Adam: lambda_max(P^-1 H) vs (2+2b1)/((1-b1) lr), b1={b1:g}, lr={lr:g}"
    # The optimiser's parameters, in its order (the order the start vector is drawn in).
    ls = loss_set if loss_set.names == names else loss_set.select(names)
    order = {n: i for i, n in enumerate(names)}
    d = torch.cat([diag[order[n]] for n in ls.names]).rsqrt().to(ls.dtype).to(ls.device)
    P = ls.n_params
    if max_hvp is None:
        max_hvp = min(P, 100 + 10 * k)
    max_hvp = integer(max_hvp, "max_hvp", owner, minimum=k, hint="Hessian-vector products allowed, at least k")
    gen = _make_generator(generator)
    with ls.measuring(), ls.hvp_operator(hvp) as op:
        v0 = _start_vector(P, None, ls.shapes, gen, ls.dtype, ls.device)
        reserve = _memory_guard("preconditioned_sharpness (Lanczos basis)", P, ls.device,
                                f"Lower max_hvp (now {max_hvp}) or k, or restrict params=.")
        out = lanczos_eigs(lambda v: d * op(d * v), v0, k, "LA", float(tol), None, max_hvp, gen,
                           reserve=reserve)
    return PreconditionedSharpnessResult(
        eigenvalues=out["eigenvalues"].clone(), residuals=out["residuals"].clone(), n_hvp=op.count,
        converged=bool(out["converged"].all()), threshold=thr, description=desc,
    )
