"""Recovery of a run file whose writer died (SIGKILL, power loss, OOM killer).

A SWMR writer that dies leaves the file valid but marked "open for write" in its
superblock. HDF5 then refuses to open it for writing (and, outside SWMR, for reading)
until the mark is cleared (``h5clear -s``). Readers here open such files with
``swmr=True``; a writer that resumes rebuilds the file: every group, dataset, attribute
and dimension scale is copied into a fresh file that replaces the old one atomically.

A side-car ``<file>.lock`` holds the writer's host and pid, so that a file still being
written by a live process is never mistaken for a crashed one.
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


def is_locked_by_crashed_writer(path: str) -> bool:
    """True if HDF5 refuses ``path`` because a writer left it marked open."""
    try:
        with h5py.File(path, "r"):
            return False
    except OSError as exc:
        message = str(exc)
        if "already open for write" not in message and "consistency flags" not in message:
            raise
    pid = live_writer(path)
    if pid is not None:
        raise OSError(f"run file {path} is being written by process {pid}; stop it before writing this file again")
    return True


def recover_crashed_file(path: str) -> None:
    """Rebuild ``path`` (left marked open by a dead writer) so it opens for writing."""
    from ._writer import LIBVER

    tmp = path + ".recover.tmp"
    with h5py.File(path, "r", swmr=True) as src, h5py.File(tmp, "w", libver=LIBVER) as dst:
        _copy_attrs(src, dst)
        scales: List[Tuple[str, str]] = []
        attachments: List[Tuple[str, int, str]] = []

        def visit(name: str, obj) -> None:
            if isinstance(obj, h5py.Group):
                _copy_attrs(obj, dst.require_group(name))
                return
            parent = dst.require_group(os.path.dirname(name) or "/")
            ds = parent.create_dataset(
                os.path.basename(name), data=obj[()], maxshape=obj.maxshape, chunks=obj.chunks,
                compression=obj.compression, compression_opts=obj.compression_opts, shuffle=obj.shuffle,
                fillvalue=obj.fillvalue,
            )
            _copy_attrs(obj, ds)
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
    os.replace(tmp, path)


def _copy_attrs(src, dst) -> None:
    items: Dict[str, object] = {k: v for k, v in src.attrs.items() if k not in _SCALE_ATTRS}
    for key, value in items.items():
        dst.attrs[key] = value
