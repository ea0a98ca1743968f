"""BatchNorm running statistics re-estimated for the weights a model holds now.

A network whose weights were moved (a point on the path between two trained networks, a
slice of the loss surface) keeps the running statistics of the weights it was trained
with; in eval mode it then normalises with statistics that belong to other weights, and
the measured loss is an artefact (Frankle et al. 2020 and Garipov et al. 2018 recompute
them at every point; ``torch.optim.swa_utils.update_bn`` does the same after weight
averaging).

:func:`reestimate_batchnorm` resets every BatchNorm layer's statistics and runs the data
through the model with ``momentum=None``, PyTorch's cumulative average: after batches
1..B, ``running_mean`` is the plain mean over batches of each batch's mean and
``running_var`` the mean over batches of each batch's unbiased variance (every batch
weighs the same, whatever its size; use equal batches for a per-example average). Only the
BatchNorm layers are in train mode during the pass: dropout is off.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .._hygiene import measurement_mode, module_device
from .._modules import BATCH_NORMS
from ..probe import BatchFormat, batch_to_xy
from ._evaluate import Data, ForwardFn, as_reiterable, data_pass, forward, to_device


def batchnorm_layers(model: nn.Module) -> List[nn.Module]:
    """The BatchNorm layers (1d/2d/3d, lazy, synchronised) that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, BATCH_NORMS) and m.track_running_stats]


def reestimate_batchnorm(model: nn.Module, data: Data, *, batch_format: BatchFormat = None,
                         forward_fn: Optional[ForwardFn] = None, max_batches: Optional[int] = None) -> int:
    """Recompute every BatchNorm layer's running statistics on ``data`` for the current weights.

    Statistics are reset, then accumulated over the batches of ``data`` with ``momentum=None``
    (cumulative average over batches, see the module docstring). Every module other than
    BatchNorm is in eval mode (dropout off); each module's momentum and train/eval flag and
    the global RNG are restored afterwards; the new statistics stay. The pass starts from
    a fixed torch seed, so a shuffling DataLoader yields the same batches at every call.

    Args:
        model: the network (its BatchNorm buffers are overwritten).
        data: a DataLoader, a list of batches or one ``(x, y)`` batch (targets unused); batch
            layouts of :func:`lightning_ntk.probe.batch_to_xy`, or ``batch_format=``.
        forward_fn: ``forward_fn(model, x)`` instead of ``model(x)``.
        max_batches: use only the first batches (None: all).

    Returns:
        The number of batches used (0, with no forward pass, when the model has no
        BatchNorm layer with running statistics).
    """
    owner = "reestimate_batchnorm"
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    batches = as_reiterable(data, "data", owner)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"{owner}: max_batches must be None or a positive integer, got {max_batches!r}")
    saved: List[Tuple[nn.Module, Optional[float]]] = [(m, m.momentum) for m in layers]
    device = module_device(model)
    used = 0
    try:
        with measurement_mode(model, grad=False) as measured, data_pass():
            for m in layers:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for i, batch in enumerate(batches):
                if max_batches is not None and used >= max_batches:
                    break
                try:  # a bare tensor is a batch of inputs (targets are not used here)
                    x = batch if isinstance(batch, torch.Tensor) else batch_to_xy(batch, batch_format)[0]
                except TypeError as exc:
                    raise type(exc)(f"{owner}: batch {i}: {exc}") from exc
                forward(measured, to_device(x, device), forward_fn)
                used += 1
    finally:
        for m, momentum in saved:
            m.momentum = momentum
    if used == 0:
        raise ValueError(f"{owner}: data holds no batches, and BatchNorm statistics need at least one")
    return used
