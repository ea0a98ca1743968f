"""Collectives the monitors add under distributed training, with bounded waits.

Lightning's strategies (DDP and friends) initialise ``torch.distributed``; monitors then
create their own gloo process group with a short timeout, so that a rank that died or
stopped answering surfaces as an error on the others within ``timeout`` seconds instead
of a hang at the default 30-minute timeout. Everything goes through CPU tensors and
pickled objects (small: decisions, error messages, per-batch records). With one process
every operation is the identity.
"""
from __future__ import annotations

import datetime
from typing import Any, List, Optional

import torch
import torch.distributed as dist


class Collectives:
    """The monitor's view of the process group: rank, world size, gather, broadcast."""

    def __init__(self, timeout: float = 300.0):
        if not timeout > 0:
            raise ValueError(f"collective timeout must be positive seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.group: Any = None
        self.rank = 0
        self.world_size = 1

    def setup(self) -> None:
        """Create the monitor's group. Call on every rank, in the same order (a setup hook)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.rank = dist.get_rank()
            self.world_size = dist.get_world_size()
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout))
        else:
            self.group, self.rank, self.world_size = None, 0, 1

    @property
    def active(self) -> bool:
        return self.group is not None

    def gather_object(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (through a CPU copy for the gloo group); returns a new tensor."""
        if not self.active:
            return tensor
        buffer = tensor.detach().to("cpu", copy=True).contiguous()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer.to(tensor.device)

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (ranks differ in size by at most one)."""
        if not self.active:
            return slice(0, n)
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def agree_on_error(self, error: Optional[BaseException], what: str) -> Optional[BaseException]:
        """Make one rank's failure every rank's failure (None when every rank succeeded)."""
        if not self.active:
            return error
        messages = self.gather_object(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(rank, msg) for rank, msg in enumerate(messages) if msg is not None]
        if not failed:
            return None
        if error is not None:
            return error
        rank, msg = failed[0]
        return RuntimeError(f"{what} failed on rank {rank}: {msg}")
