"""Stochastic trace of the Hessian: Hutch++ and Hutchinson, with a standard error (``hessian_trace``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._args import integer, one_of
from ._common import GeneratorLike, Tensor, _make_generator, _memory_guard
from ._loss_set import LossSet, accepts_model_form

TRACE_METHODS = ("hutch++", "hutchinson")


@dataclass
class HessianTraceResult:
    """Output of :func:`hessian_trace`: ``trace`` estimate, its ``stderr``, HVPs used.

    ``samples`` are the Hutchinson terms the standard error is computed from (for Hutch++:
    those of the residual part, the low-rank part being exact given the sketch).
    """

    trace: float
    stderr: float
    n_hvp: int
    method: str
    samples: Tensor
    low_rank_part: float = 0.0
    hvp_method: str = ""


@accepts_model_form()
def hessian_trace(
    loss_set: LossSet,
    *,
    n_queries: int = 60,
    method: str = "hutch++",
    hvp: str = "auto",
    generator: GeneratorLike = None,
) -> HessianTraceResult:
    """Stochastic estimate of tr(H) with a standard error, from ``n_queries`` HVPs.

    ``method="hutchinson"`` (Hutchinson 1989): ``mean_i g_i^T H g_i`` over Rademacher g_i;
    stderr = sample standard deviation / sqrt(m).

    ``method="hutch++"`` (Meyer, Musco, Musco & Woodruff 2021): with m = n_queries split in
    thirds, S (P x m/3) Rademacher, Q = orth(H S), and G (P x m/3) Rademacher,

        tr(H) ~ tr(Q^T H Q) + mean_i (P_Q g_i)^T H (P_Q g_i),     P_Q = I - Q Q^T.

    Standard error: conditionally on Q the first term is a constant (exact), and the second
    is a mean of independent, identically distributed terms whose expectation is
    tr(P_Q H P_Q) = tr(H) - tr(Q^T H Q); the estimator is therefore unbiased given Q, and
    its conditional standard deviation is estimated by the sample standard deviation of
    those terms / sqrt(#terms), which is what ``stderr`` reports. (Hutch++'s deflation
    removes the top of the spectrum from the Hutchinson part, so this stderr is smaller than
    Hutchinson's when the top few eigenvalues carry much of the trace.)

    Memory: Hutch++ keeps P x n_queries/3 float64 numbers (the sketch and its basis Q).
    Called with a :class:`LossSet` or as ``hessian_trace(model, loss_fn, batches, ...)``
    (then ``dtype=``, ``params=``, ``mode=``, ``batch_format=`` build the LossSet).
    """
    owner = "hessian_trace"
    one_of(method, "method", TRACE_METHODS, owner)
    min_q = 6 if method == "hutch++" else 2
    n_queries = integer(n_queries, "n_queries", owner, minimum=min_q, hint=f"for method={method!r}")
    ls = loss_set
    P = ls.n_params
    gen = _make_generator(generator)

    dev, dt = ls.device, ls.dtype

    def rademacher() -> Tensor:  # drawn on the CPU generator, so results do not depend on the device
        r = torch.randint(0, 2, (P,), generator=gen, dtype=torch.int8)
        return (2 * r - 1).to(device=dev, dtype=torch.float64)

    with ls.measuring(), ls.hvp_operator(hvp) as op:
        low = 0.0
        Q = None
        if method == "hutchinson":
            n_res = n_queries
        else:
            s = min(n_queries // 3, P)
            # the s sketch columns and their QR factor, float64
            _memory_guard("hessian_trace (Hutch++ sketch)", P, dev,
                          f"Lower n_queries (now {n_queries}) or use method='hutchinson' (no sketch).")(
                s, 2 * s * P * 8)
            HS = torch.stack([op(rademacher().to(dt)).double() for _ in range(s)], 1)
            Q, _ = torch.linalg.qr(HS, mode="reduced")
            del HS
            for i in range(Q.shape[1]):
                q = Q[:, i]
                low += float(q @ op(q.to(dt)).double())
            n_res = n_queries - 2 * s
        samples = torch.empty(n_res, dtype=torch.float64)
        for i in range(n_res):
            g = rademacher()
            if Q is not None:
                g = g - Q @ (Q.T @ g)
            samples[i] = float(g @ op(g.to(dt)).double())
    m = samples.numel()
    est = low + float(samples.mean()) if m else low
    stderr = float(samples.std(unbiased=True) / math.sqrt(m)) if m > 1 else float("nan")
    return HessianTraceResult(
        trace=est, stderr=stderr, n_hvp=op.count, method=method, samples=samples, low_rank_part=low,
        hvp_method=op.method,
    )
