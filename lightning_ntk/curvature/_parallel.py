"""Data parallelism: each process holds a shard of the fixed set; sums cross processes."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

import torch

Tensor = torch.Tensor

# Read by LossSet at construction: a LossSet built inside the block sums over processes.
_ALL_REDUCE: "contextvars.ContextVar[Optional[Callable[[Tensor], Tensor]]]" = contextvars.ContextVar(
    "lightning_ntk_curvature_all_reduce", default=None)


@contextlib.contextmanager
def data_parallel(all_reduce: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within this block, each process passes its own shard of the fixed set as ``batches``
    and every function here works on the mean loss over the union of the shards.

    ``all_reduce(t)`` must return the sum of ``t`` over the processes (every process
    calls the same functions with the same arguments besides its batches, so that the
    collectives line up). Losses, gradients and Hessian-vector products are summed over
    processes, the example count too; random start vectors come from the same seed on
    every process, so all processes compute identical results. An empty shard is allowed.

    A :class:`LossSet` takes the all-reduce in force when it is built (its example count is
    summed then) and keeps it: build it inside the block; it may be used after it.
    """
    token = _ALL_REDUCE.set(all_reduce)
    try:
        yield
    finally:
        _ALL_REDUCE.reset(token)
