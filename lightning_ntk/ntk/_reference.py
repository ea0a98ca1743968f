"""Brute-force float64 eNTK: an autograd loop over examples and outputs.

Shipped so that users can check :func:`~lightning_ntk.empirical_ntk` on their own model
(the curvlinops habit). Slow (N * C backward passes, an explicit (N, C, P) Jacobian) and
meant for small models and a handful of examples.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._args import one_of
from ._model import FunctionalModel, ParamsArg, check_autograd, check_modes, prepare_input, select_parameters


def empirical_ntk_reference(
    model: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    kind: str = "full",
    params: ParamsArg = None,
) -> Tensor:
    """eNTK in float64 from explicit per-example Jacobians J[n, c] = d f_c(x_n) / d theta.

    The model is evaluated in float64 (parameters, buffers and floating inputs cast through
    ``torch.func.functional_call``; the model is not modified), one example at a time.
    ``kind`` as in :func:`~lightning_ntk.empirical_ntk`: full J1 J2^T (N1, N2, C, C),
    trace (mean over outputs of the diagonal), diagonal (N1, N2, C), pseudo
    (1/C) (sum_c J_c)(sum_c J_c)^T (Mohamadi et al. 2023).
    """
    one_of(kind, "kind", ("full", "trace", "diagonal", "pseudo"), "empirical_ntk_reference")
    check_autograd()
    check_modes(model)
    selected = select_parameters(model, params)
    device = selected[0][1].device
    fm = FunctionalModel(model, selected, torch.float64)
    x1 = prepare_input(x1, "x1", device, torch.float64)
    x2 = x1 if x2 is None else prepare_input(x2, "x2", device, torch.float64)
    leaves = list(fm.leaves.values())
    cuda = sorted({p.device.index or 0 for _, p in selected if p.device.type == "cuda"})

    def jacobian(x: Tensor) -> Tensor:
        rows = []
        for n in range(x.shape[0]):
            out = fm(x[n : n + 1])[0]
            per_output = []
            for c in range(out.shape[0]):
                grads = torch.autograd.grad(out[c], leaves, retain_graph=True, allow_unused=True)
                per_output.append(
                    torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1) for g, t in zip(grads, leaves)])
                )
            rows.append(torch.stack(per_output))
        return torch.stack(rows)  # (N, C, P)

    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        j1 = jacobian(x1)
        j2 = j1 if x2 is x1 else jacobian(x2)
    C = j1.shape[1]
    if kind == "pseudo":
        return (j1.sum(1) @ j2.sum(1).T) / C
    full = torch.einsum("nap,mbp->nmab", j1, j2)
    if kind == "full":
        return full
    diag = torch.diagonal(full, dim1=2, dim2=3)
    return diag.mean(-1) if kind == "trace" else diag.contiguous()
