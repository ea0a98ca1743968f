"""Mode hygiene for extra computations on a model that is being trained.

A monitor's measurement must leave training exactly as it found it: the same
train/eval flags on every submodule, the same RNG streams (dropout masks, data
shuffling), untouched ``.grad`` buffers and BatchNorm running statistics (eval mode).
"""
from __future__ import annotations

import contextlib
import random
import threading
from typing import Iterator, List, Optional

import numpy as np
import torch
from torch import nn


def module_device(module: nn.Module, fallback: Optional[torch.device] = None) -> torch.device:
    """The device of a module's first parameter (or buffer); ``fallback`` (CPU) if it has none."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return fallback if fallback is not None else torch.device("cpu")


def _cuda_devices(module: nn.Module) -> List[int]:
    devices = {p.device.index for p in module.parameters() if p.device.type == "cuda"}
    return sorted(d if d is not None else torch.cuda.current_device() for d in devices)


def original_module(module: nn.Module) -> Optional[nn.Module]:
    """The eager module a compiled (``torch.compile``) one wraps (None for any other module).

    torch has no public accessor: this reads ``OptimizedModule._orig_mod``, here only
    (``tests/test_hygiene.py`` fails if a torch release moves it)."""
    original = getattr(module, "_orig_mod", None)
    if type(module).__name__ == "OptimizedModule" and isinstance(original, nn.Module):
        return original
    return None


@contextlib.contextmanager
def eager(module: nn.Module) -> Iterator[nn.Module]:
    """Inside, every compiled (``torch.compile``) submodule of ``module`` is replaced by the eager
    module it wraps (same parameters): a measurement neither runs nor recompiles the
    compiled graphs (their guards, caches and RNG use stay as training left them), and
    forward hooks on the inner modules fire. ``module`` itself compiled is returned eager."""
    swaps = [(parent, name, child, original_module(child)) for parent in module.modules()
             for name, child in parent.named_children() if original_module(child) is not None]
    for parent, name, _, original in swaps:
        setattr(parent, name, original)
    try:
        yield original_module(module) or module
    finally:
        for parent, name, compiled, _ in reversed(swaps):
            setattr(parent, name, compiled)


_PLAIN_ATTENTION = {"lock": threading.Lock(), "depth": 0, "saved": None}


@contextlib.contextmanager
def plain_attention() -> Iterator[None]:
    """Attention computed from its parts, the user's settings restored afterwards: the math
    SDPA kernel (the fused CPU/CUDA kernels have no double backward, which Hessian-vector
    products need, nor vmap rules, which Jacobians use) and no ``nn.TransformerEncoderLayer``
    / ``nn.MultiheadAttention`` inference fast path (it skips the submodules' hooks, which
    activation codes and features read). The settings are process-wide: measurements in
    several threads share one switch (the first in sets it, the last out restores it)."""
    state = _PLAIN_ATTENTION
    with state["lock"]:
        if state["depth"] == 0:
            state["saved"] = (torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                              torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
                              torch.backends.cuda.cudnn_sdp_enabled())
            torch.backends.mha.set_fastpath_enabled(False)
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)
            torch.backends.cuda.enable_math_sdp(True)
        state["depth"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["depth"] -= 1
            if state["depth"] == 0:
                fastpath, flash, efficient, math, cudnn = state["saved"]
                torch.backends.mha.set_fastpath_enabled(fastpath)
                torch.backends.cuda.enable_flash_sdp(flash)
                torch.backends.cuda.enable_mem_efficient_sdp(efficient)
                torch.backends.cuda.enable_math_sdp(math)
                torch.backends.cuda.enable_cudnn_sdp(cudnn)


@contextlib.contextmanager
def measurement_mode(module: nn.Module, train: bool = False, grad: bool = True) -> Iterator[nn.Module]:
    """Run a measurement on ``module``: eval mode (unless ``train``), every RNG (torch's,
    NumPy's and Python's global ones) restored afterwards, modes restored, compiled
    submodules run eagerly (:func:`eager`), attention in its plain form (:func:`plain_attention`).

    Gradients are enabled inside (``grad=True``) so measurements can differentiate; use
    ``torch.autograd.grad`` there, never ``.backward()``, so ``.grad`` stays untouched.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "a measurement that needs gradients was requested under torch.inference_mode (e.g. from a validation "
            "hook); run it from a training hook or pass inference_mode=False to the Trainer"
        )
    with eager(module) as measured:
        modes = [(m, m.training) for m in measured.modules()]
        states = random.getstate(), np.random.get_state()  # a training_step may draw from these too
        try:
            with torch.random.fork_rng(devices=_cuda_devices(measured)), plain_attention():
                measured.train(train)
                with torch.set_grad_enabled(grad):
                    yield measured
        finally:
            for m, mode in modes:
                m.training = mode
            random.setstate(states[0])
            np.random.set_state(states[1])
