"""Shared pieces of the curvature estimators: flat-vector helpers, RNG, mode hygiene, memory guard."""
from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Callable, Iterator, List, Sequence, Tuple, Union

import torch
from torch import nn

from .._hygiene import _cuda_devices, measurement_mode
from .._modules import BATCH_NORMS, DROPOUTS

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = Any  # (x, y) | iterable of (x, y) | DataLoader | ProbeSet
GeneratorLike = Union[None, int, torch.Generator]


def setting(name: str) -> Any:
    """A user-settable knob (``MEMORY_FRACTION``, ``RETAIN_FRACTION``, ...), read at call time.

    The knobs live in the package namespace, where the docs tell users to set them
    (``lightning_ntk.curvature.MEMORY_FRACTION = 0.5``); reading them there at every call keeps
    that working now that the code lives in submodules.
    """
    return getattr(sys.modules[__package__], name)


def _unflatten(v: Tensor, shapes: Sequence[Tuple[int, ...]]) -> List[Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [p.view(s) for p, s in zip(torch.split(v, sizes), shapes)]


def _flatten(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _make_generator(generator: GeneratorLike) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = 0
    # A type union (None | int | Generator): not one of the _args validators, and a TypeError.
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(
            f"generator must be None (seed 0), an int seed or a torch.Generator; got {type(generator).__name__}"
        )
    g = torch.Generator(device="cpu")
    g.manual_seed(int(generator))
    return g


#: ``mode=`` of a LossSet: which modules run in training mode during the measurement.
MODES = ("train", "eval", "current")
#: Normalisation layers that switch between batch and running statistics with their mode.
_BATCH_STATISTICS = BATCH_NORMS


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} ('train': Cohen et al.'s, BatchNorm on batch statistics; "
                         f"'eval': running statistics; 'current': the modules' own flags), got {mode!r}")
    return mode


@contextlib.contextmanager
def _hygiene(model: nn.Module, mode: str) -> Iterator[None]:
    """The modes of ``mode`` (see :class:`LossSet`), forked RNG, grad enabled; every module's
    mode restored on exit."""
    if mode in ("eval", "train"):
        with measurement_mode(model, train=False, grad=True) as measured:
            # Training mode with track_running_stats off: batch statistics, and no update of
            # the running ones (an in-place update would also break torch.func transforms).
            norms = [(m, m.track_running_stats) for m in measured.modules()
                     if mode == "train" and isinstance(m, _BATCH_STATISTICS)]
            try:
                for m, _ in norms:
                    m.training, m.track_running_stats = True, False
                yield
            finally:
                for m, tracking in norms:
                    m.track_running_stats = tracking
        return
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "curvature functions need autograd, but torch.inference_mode is active (e.g. in "
            "a Lightning validation hook): call them from a training hook or outside "
            "inference mode."
        )
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)), torch.enable_grad():
            yield
    finally:
        for m, flag in modes:
            m.training = flag


def _check_dropout(model: nn.Module, mode: str) -> None:
    if mode != "current":
        return
    drop = [n for n, m in model.named_modules() if isinstance(m, DROPOUTS) and m.training]
    if drop:
        raise ValueError(
            f"mode='current' but dropout is active in {drop[:3]}: the loss would be random and its "
            "Hessian undefined. Use mode='train' (default: BatchNorm on batch statistics, dropout off) or "
            "mode='eval', or put those modules in eval mode."
        )


def _check_sync_batchnorm(model: nn.Module, mode: str) -> None:
    """SyncBatchNorm in training mode all-reduces its statistics in every forward pass: with
    several processes, each taking its own number of batches, they would wait on each other."""
    if mode == "eval" or not (torch.distributed.is_available() and torch.distributed.is_initialized()
                              and torch.distributed.get_world_size() > 1):
        return
    sync = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm) and (mode == "train" or m.training)]
    if sync:
        raise ValueError(
            f"mode={mode!r} with SyncBatchNorm ({sync[:3]}) under {torch.distributed.get_world_size()} processes: its "
            "batch statistics would be synchronised inside every Hessian-vector product, which the processes' "
            "different batches cannot do in step. Pass mode='eval' (running statistics)."
        )


class CurvatureMemoryError(MemoryError):
    """A curvature computation would need more memory than the device has free; raised
    before the allocation (the message states the estimate and the setting to lower)."""


def _memory_guard(what: str, P: int, device: torch.device, knob: str) -> Callable[[int, int], None]:
    """``reserve(vectors, nbytes)``: raise :class:`CurvatureMemoryError` when ``nbytes`` exceed
    ``MEMORY_FRACTION`` of the memory free on ``device`` now."""
    from ..ntk._memory import available_memory, format_bytes

    def reserve(vectors: int, nbytes: int) -> None:
        if nbytes <= setting("_MEMORY_CHECK_FROM"):
            return  # reading the free memory costs ~0.5 ms: not worth it for small buffers
        free = available_memory(device)
        fraction = setting("MEMORY_FRACTION")
        if nbytes > fraction * free:
            raise CurvatureMemoryError(
                f"{what}: {vectors} vectors of P={P:,} parameters need {format_bytes(nbytes)} on {device}, more "
                f"than {fraction:.0%} of the {format_bytes(free)} free. {knob}"
            )

    return reserve
