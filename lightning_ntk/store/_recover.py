"""Crash safety around the one moment HDF5 cannot protect: writing outside SWMR mode.

A SWMR writer that dies leaves a valid file (marked "open for write": plain HDF5 then
refuses it, SWMR readers open it). A writer that dies *before* switching to SWMR can leave
a file nobody can open. So the store never writes a run file in place outside SWMR:

* a new file is built at ``<file>.writing`` and renamed over ``<file>`` once it is in SWMR
  mode (or cleanly closed);
* a resumed file is first rebuilt into ``<file>.writing`` (:func:`rebuild`: every group,
  dataset, attribute and dimension scale copied; the original opened read-only), then
  modified there (truncation, new tables) and renamed the same way.

A kill at any moment leaves either the previous file or the new SWMR one at ``<file>``.
A side-car ``<file>.lock`` holds the writer's host and pid, so a file still being written
by a live process is never mistaken for a crashed one.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Dict, List, Tuple

import h5py

_SCALE_ATTRS = {"DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME", "_Netcdf4Dimid", "_Netcdf4Coordinates"}


def lock_path(path: str) -> str:
    return path + ".lock"


def writing_path(path: str) -> str:
    """Where a run file is built before it atomically replaces ``path``."""
    return path + ".writing"


def write_lock(path: str) -> None:
    with open(lock_path(path), "w") as handle:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, handle)


def remove_lock(path: str) -> None:
    try:
        os.remove(lock_path(path))
    except FileNotFoundError:
        pass


def live_writer(path: str):
    """The pid of a live process on this host that holds ``path`` open for writing, else None."""
    try:
        with open(lock_path(path)) as handle:
            info = json.load(handle)
    except (OSError, ValueError):
        return None
    if info.get("host") != socket.gethostname():
        return None
    pid = int(info.get("pid", -1))
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def open_for_reading(path: str) -> h5py.File:
    """Open a run file read-only, also when its writer died in SWMR mode."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if "already open for write" not in str(exc) and "consistency flags" not in str(exc):
            raise
        return h5py.File(path, "r", swmr=True)


def rebuild(src_path: str, dst_path: str) -> None:
    """Copy the run file ``src_path`` into a new file ``dst_path`` (opened for writing
    by nobody), datasets chunk by chunk, attributes and dimension scales re-created."""
    from ._writer import LIBVER

    with open_for_reading(src_path) as src, h5py.File(dst_path, "w", libver=LIBVER) as dst:
        _copy_attrs(src, dst)
        scales: List[Tuple[str, str]] = []
        attachments: List[Tuple[str, int, str]] = []

        def visit(name: str, obj) -> None:
            if isinstance(obj, h5py.Group):
                _copy_attrs(obj, dst.require_group(name))
                return
            parent = dst.require_group(os.path.dirname(name) or "/")
            parent.copy(obj, os.path.basename(name), without_attrs=True)
            _copy_attrs(obj, dst[name])
            if obj.attrs.get("CLASS") in (b"DIMENSION_SCALE", "DIMENSION_SCALE"):
                scale_name = obj.attrs.get("NAME", b"")
                scales.append((name, scale_name.decode() if isinstance(scale_name, bytes) else str(scale_name)))
            for axis, dim in enumerate(obj.dims):
                for scale in dim.values():
                    if scale.name.lstrip("/") != name:
                        attachments.append((name, axis, scale.name))

        src.visititems(visit)
        for name, scale_name in scales:
            dst[name].make_scale(scale_name.rstrip("\x00"))
        for name, axis, scale in attachments:
            dst[name].dims[axis].attach_scale(dst[scale])


def _copy_attrs(src, dst) -> None:
    items: Dict[str, object] = {k: v for k, v in src.attrs.items() if k not in _SCALE_ATTRS}
    for key, value in items.items():
        dst.attrs[key] = value


def fsync_directory(path: str) -> None:
    """Make a rename in ``path``'s directory durable."""
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    except OSError:  # pragma: no cover - platform-specific
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
