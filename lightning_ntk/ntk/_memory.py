"""Memory budget for the eNTK engines: parsing ``max_memory``, the default budget, the error.

The default budget is a fraction of the memory that is free *now* on the device the model
lives on: on CPU half of ``MemAvailable`` (``/proc/meminfo``, or ``psutil`` when installed,
capped by a cgroup v1/v2 limit when one applies), on CUDA 80 % of the free device memory plus
what PyTorch's caching allocator holds but does not use.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Union

import numpy as np
import torch

from .._args import positive_int

CPU_FRACTION = 0.5
CUDA_FRACTION = 0.8
_FALLBACK_CPU_BYTES = 4 * 2**30

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class NTKMemoryError(MemoryError):
    """The requested kernel cannot be computed within ``max_memory``, not even tiled.

    Raised before any computation, so a probe that is too large never reaches the OOM killer.
    """


def parse_memory(value: Union[int, str]) -> int:
    """Bytes from an int (bytes) or a string such as ``"2GB"``, ``"512MiB"``, ``"1.5 GiB"``.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, GiB, TiB)
    powers of 1024; a bare number is bytes.
    """
    if isinstance(value, bool):
        raise TypeError("max_memory must be a number of bytes (int) or a string such as '2GB' or '512MiB', got a bool")
    if isinstance(value, (int, np.integer)):
        return positive_int(value, "max_memory", hint="a number of bytes, or a string such as '2GB'")
    if isinstance(value, str):
        match = _PATTERN.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"max_memory={value!r} is not a size: use bytes (an int) or a number with a unit "
                "among B, kB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024), e.g. '2GB'"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
        if size <= 0:
            raise ValueError(f"max_memory={value!r} must be positive")
        return size
    raise TypeError(
        f"max_memory must be None, a number of bytes (int) or a string such as '2GB', got {type(value).__name__}"
    )


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _meminfo_available() -> Optional[int]:
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_available() -> Optional[int]:
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 2**60:
            return max(limit - usage, 0)
    return None


def available_memory(device: torch.device) -> int:
    """Bytes free now on ``device`` (CPU: system and cgroup; CUDA: driver plus allocator cache)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    candidates = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(candidates) if candidates else _FALLBACK_CPU_BYTES


def default_max_memory(device: torch.device) -> int:
    """The default budget: a fraction of :func:`available_memory` (see the module docstring)."""
    fraction = CUDA_FRACTION if device.type == "cuda" else CPU_FRACTION
    return max(int(available_memory(device) * fraction), 1)


def resolve_max_memory(max_memory: Union[None, int, str], device: torch.device) -> int:
    """The budget in bytes: ``max_memory`` parsed, or the default for ``device``."""
    return default_max_memory(device) if max_memory is None else parse_memory(max_memory)
