"""Streaming writer of a run file (format v1).

One :class:`RunStore` per file and process, shared by every monitor that names the same
path (``RunStore.acquire``). The store owns the h5py file; monitors declare their tables
(one group each), append rows, and call :meth:`RunStore.flush` after each snapshot.

Life cycle::

    acquire(path)        opens or creates the file (refuses an existing one unless
                         ``overwrite`` or ``resume``), writes the root attributes
    declare_table(...)   before SWMR: creates the group (or, on resume, checks it and
                         truncates rows written after the checkpoint)
    write_static(...)    before SWMR: fixed arrays such as the probe's dataset indices
    start_swmr()         no new objects after this; readers may follow the file live
    Table.append(row)    buffered in memory
    flush()              buffered rows written (key field last), h5 flush, fsync
    release(owner)       the last owner closes the file
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np

from ._recover import fsync_directory, live_writer, rebuild, remove_lock, write_lock, writing_path
from ._schema import FORMAT_NAME, FORMAT_VERSION, NETCDF_DIM_ONLY, Field, chunk_shape

log = logging.getLogger(__name__)

#: Files are written in the HDF5 1.10 format (or newer where a feature needs it): the
#: oldest format that supports SWMR, readable by every HDF5 >= 1.10.
LIBVER = ("v110", "latest")
_CHUNK_CACHE_BYTES = 32 * 1024 * 1024


#: gzip level of every table (1: the fastest; kernels and eigenvectors, float data with
#: little redundancy, compress barely better at higher levels, at several times the cost).
COMPRESSION_LEVEL = 1


class StoreError(RuntimeError):
    """A run file cannot be created, opened or written as asked."""


class SchemaError(StoreError):
    """A table or static array does not match what the file already holds."""


def _versions() -> Dict[str, str]:
    import torch

    from .._version import __version__

    versions = {"lightning_ntk": __version__, "torch": torch.__version__, "h5py": h5py.__version__,
                "hdf5": h5py.version.hdf5_version, "numpy": np.__version__}
    for module in ("lightning", "pytorch_lightning"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # pragma: no cover - depends on the environment
            pass
    return versions


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _json_attr(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    if len(text.encode()) > 60_000:
        raise StoreError(f"attribute of {len(text)} characters is too large for an HDF5 attribute (limit 64 KiB)")
    return text


class Table:
    """An append-only table: one group, datasets sharing the row axis.

    Rows are buffered by :meth:`append` and written by the store's :meth:`RunStore.flush`;
    the key field is written last, so a reader that sees ``key >= 0`` sees a complete row.
    """

    def __init__(self, store: "RunStore", group: h5py.Group, fields: Sequence[Field], key: str, row_dim: str):
        self._store = store
        self._group = group
        self.name = group.name.lstrip("/")
        self.fields: Dict[str, Field] = {f.name: f for f in fields}
        self.key = key
        self.row_dim = row_dim
        self._buffer: List[Dict[str, Any]] = []
        self._buffered_rows = 0  # rows in the buffer beyond one per entry (blocks from extend)
        # Datasets stay open: closing one flushes its chunk cache, and an error there (a full
        # disk) would surface only as an unraisable warning instead of from flush().
        self._ds: Dict[str, h5py.Dataset] = {name: group[name] for name in self.fields}
        if row_dim != key and row_dim in group:
            self._ds[row_dim] = group[row_dim]
        self._committed = int(group[key].shape[0])
        self._in_flight = 0  # rows taken from the buffer by a write in progress (writer thread)

    @property
    def n_committed(self) -> int:
        """Rows in the file (written and flushed)."""
        return self._committed

    @property
    def n_rows(self) -> int:
        """Rows in the file plus rows buffered for the next flush."""
        return self._committed + self._in_flight + len(self._buffer) + self._buffered_rows

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the rows waiting in the buffer."""
        with self._store._buffer_lock:
            return sum(a.nbytes for entry in self._buffer for a in entry.values() if isinstance(a, np.ndarray))

    def append(self, row: Optional[Mapping[str, Any]] = None, **values: Any) -> None:
        """Buffer one row. Every field must be given, with its declared row shape."""
        data = dict(row or {}, **values)
        unknown = set(data) - set(self.fields)
        if unknown:
            raise KeyError(f"table {self.name!r} has no field(s) {sorted(unknown)}; fields: {sorted(self.fields)}")
        missing = set(self.fields) - set(data)
        if missing:
            raise KeyError(f"row for table {self.name!r} is missing field(s) {sorted(missing)}")
        checked: Dict[str, np.ndarray] = {}
        for name, spec in self.fields.items():
            value = data[name]
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            array = np.asarray(value)
            if array.shape != spec.shape:
                raise ValueError(
                    f"table {self.name!r}, field {name!r}: a row has shape {spec.shape}, got {array.shape}"
                )
            checked[name] = array.astype(spec.dtype, copy=False)
        key_value = int(checked[self.key]) if checked[self.key].shape == () else None
        if key_value is not None and key_value < 0:
            raise ValueError(f"table {self.name!r}: key {self.key!r} must be >= 0 (negative marks incomplete rows)")
        with self._store._buffer_lock:
            self._buffer.append(checked)

    def extend(self, columns: Mapping[str, Any]) -> None:
        """Buffer many rows at once: each field given as an array with a leading row axis."""
        arrays = {}
        for name, value in columns.items():
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            arrays[name] = np.asarray(value)
        unknown = set(arrays) - set(self.fields)
        missing = set(self.fields) - set(arrays)
        if unknown or missing:
            raise KeyError(f"table {self.name!r}: unknown field(s) {sorted(unknown)}, missing {sorted(missing)}")
        lengths = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise ValueError(f"table {self.name!r}: every column needs the same number of rows, got "
                             f"{ {k: a.shape for k, a in arrays.items()} }")
        (n,) = lengths
        for name, spec in self.fields.items():
            if arrays[name].shape[1:] != spec.shape:
                raise ValueError(f"table {self.name!r}, field {name!r}: rows have shape {spec.shape}, "
                                 f"got {arrays[name].shape[1:]}")
        if n and np.any(arrays[self.key] < 0):
            raise ValueError(f"table {self.name!r}: key {self.key!r} must be >= 0 (negative marks incomplete rows)")
        if n:
            block = {"__block__": True, **{k: a.astype(self.fields[k].dtype, copy=False) for k, a in arrays.items()}}
            with self._store._buffer_lock:
                self._buffer.append(block)
                self._buffered_rows += n - 1  # a block counts as n rows

    def _write_buffer(self) -> None:
        # Take the buffered rows (the training thread may append more meanwhile).
        with self._store._buffer_lock:
            if not self._buffer:
                return
            buffer, extra = self._buffer, self._buffered_rows
            self._buffer, self._buffered_rows = [], 0
            self._in_flight = len(buffer) + extra
        try:
            n0 = self._committed
            n1 = n0 + len(buffer) + extra
            for ds in self._ds.values():
                ds.resize(n1, axis=0)
            for name in self.fields:
                if name == self.key:
                    continue
                self._ds[name][n0:n1] = self._stacked(name, buffer)
            # The key goes last: until it is written the row reads as incomplete (-1). HDF5
            # writes its cached chunks and extents out in no set order, so the data reaches
            # the OS first: a process killed in the middle of the final flush cannot leave a
            # key on disk without its row.
            self._store.file.flush()
            self._ds[self.key][n0:n1] = self._stacked(self.key, buffer)
            self._committed = n1
        finally:
            self._in_flight = 0

    def _stacked(self, name: str, buffer: Optional[List[Dict[str, Any]]] = None) -> np.ndarray:
        entries = self._buffer if buffer is None else buffer
        parts = [entry[name] if entry.get("__block__") else entry[name][None] for entry in entries]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def truncate(self, n_rows: int) -> None:
        """Drop rows past ``n_rows`` (used on resume, before SWMR starts)."""
        if self._store.swmr:
            raise StoreError("rows cannot be truncated after the file switched to SWMR mode")
        with self._store._buffer_lock:
            self._buffer.clear()
            self._buffered_rows = 0
        if n_rows >= self._committed:
            return
        for ds in self._ds.values():
            ds.resize(n_rows, axis=0)
        self._committed = n_rows

    def complete_rows(self) -> int:
        """Rows whose key was written (leading run of ``key >= 0``)."""
        keys = self._group[self.key][: self._committed]
        bad = np.flatnonzero(keys < 0)
        return int(bad[0]) if bad.size else int(keys.shape[0])


class FixedTable:
    """A table of a fixed number of rows, rewritten as a whole (e.g. a per-example summary).

    ``written_step`` (one value) is set to -1 before a rewrite and to the step after it, so
    a reader can tell a table caught mid-rewrite (by a crash) from a complete one.
    """

    def __init__(self, store: "RunStore", group: h5py.Group, fields: Sequence[Field], n_rows: int):
        self._store = store
        self._group = group
        self.name = group.name.lstrip("/")
        self.fields: Dict[str, Field] = {f.name: f for f in fields}
        self.n_rows = n_rows
        self._pending: Optional[Tuple[Dict[str, np.ndarray], int]] = None
        self._ds: Dict[str, h5py.Dataset] = {name: group[name] for name in list(self.fields) + ["written_step"]}

    @property
    def written_step(self) -> int:
        return int(self._ds["written_step"][0])

    def write(self, columns: Mapping[str, Any], step: int) -> None:
        """Buffer a complete rewrite (every field, ``n_rows`` rows); written at the next flush."""
        arrays: Dict[str, np.ndarray] = {}
        if set(columns) != set(self.fields):
            raise KeyError(f"table {self.name!r}: a rewrite needs exactly the fields {sorted(self.fields)}, "
                           f"got {sorted(columns)}")
        for name, spec in self.fields.items():
            value = columns[name]
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            array = np.asarray(value)
            if array.shape != (self.n_rows,) + spec.shape:
                raise ValueError(f"table {self.name!r}, field {name!r}: expected shape "
                                 f"{(self.n_rows,) + spec.shape}, got {array.shape}")
            arrays[name] = array.astype(spec.dtype, copy=False)
        if int(step) < 0:
            raise ValueError(f"table {self.name!r}: step must be >= 0")
        with self._store._buffer_lock:
            self._pending = (arrays, int(step))

    @property
    def buffered_bytes(self) -> int:
        pending = self._pending
        return 0 if pending is None else sum(a.nbytes for a in pending[0].values())

    def _write_buffer(self) -> None:
        with self._store._buffer_lock:
            if self._pending is None:
                return
            (arrays, step), self._pending = self._pending, None
        self._ds["written_step"][0] = -1
        self._store.file.flush()
        for name, array in arrays.items():
            self._ds[name][...] = array
        self._ds["written_step"][0] = step


class RunStore:
    """The run file of one training run, shared by the monitors that name its path."""

    _registry: Dict[str, "RunStore"] = {}
    _registry_lock = threading.Lock()
    #: Per closed file (real path): seconds its writer thread spent writing
    #: (``background_s``, wall; ``background_cpu_s``, that thread's CPU time) and seconds
    #: writes blocked a caller (``blocking_s``), for benchmarks.
    closed_stats: Dict[str, Dict[str, float]] = {}

    def __init__(self, path: str, file: h5py.File, *, fsync: bool = True, background: bool = True):
        self.path = path
        self.file = file
        self.fsync = fsync
        #: Whether :meth:`flush_async` hands writes to a writer thread (after SWMR starts).
        self.background = background
        self.tables: Dict[str, Any] = {}
        self._owners: List[str] = []
        self._lock = threading.RLock()
        self._buffer_lock = threading.Lock()  # guards the tables' row buffers (short sections only)
        self._background: Optional[_BackgroundWriter] = None
        self._background_seconds = 0.0
        self._background_cpu_seconds = 0.0
        self._blocking_seconds = 0.0
        self.swmr = False
        #: The first write error (full disk, I/O), if any: later flushes may fail too.
        self.write_error: Optional[BaseException] = None
        self._published = False

    # ------------------------------------------------------------------ open / close
    @classmethod
    def acquire(cls, path: "os.PathLike[str] | str", *, owner: str, overwrite: bool = False, resume: bool = False,
                fsync: bool = True) -> "RunStore":
        """Open (or join) the run file at ``path`` on behalf of ``owner``.

        A file that exists and is not already open in this process is refused unless
        ``overwrite`` (it is replaced) or ``resume`` (it is appended to after truncation).
        """
        real = os.path.realpath(os.fspath(path))
        with cls._registry_lock:
            store = cls._registry.get(real)
            if store is None:
                store = cls(real, cls._open_file(real, overwrite=overwrite, resume=resume), fsync=fsync)
                try:
                    store._declare_errors_table()
                except Exception:
                    store.close()
                    raise
                cls._registry[real] = store
            if owner in store._owners:
                raise StoreError(
                    f"two monitors writing {real} share the name {owner!r}; give each a distinct `name=`"
                )
            store._owners.append(owner)
            return store

    @classmethod
    def is_open(cls, path: "os.PathLike[str] | str") -> bool:
        return os.path.realpath(os.fspath(path)) in cls._registry

    @staticmethod
    def check_path(path: "os.PathLike[str] | str", *, overwrite: bool, resume: bool, check_exists: bool = True) -> None:
        """Raise a clear error now if ``path`` cannot become this run's file.

        ``check_exists=False`` checks only that the location is writable (used in ``setup``,
        before Lightning has told whether the run resumes).
        """
        real = os.path.realpath(os.fspath(path))
        if RunStore.is_open(real):
            return
        if os.path.isdir(real):
            raise StoreError(f"run file path {real} is a directory; pass a file path such as {os.path.join(real, 'run.h5')}")
        if check_exists and os.path.exists(real) and not (overwrite or resume):
            raise FileExistsError(
                f"run file {real} already exists. Pass overwrite=True to replace it, resume training from a "
                "checkpoint to append to it, or choose another path="
            )
        parent = os.path.dirname(real) or "."
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory {parent} for run file {real}: {exc.strerror}") from exc
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StoreError(f"cannot write run file {real}: directory {parent} is not writable; choose another path=")
        if os.path.exists(real) and not os.access(real, os.W_OK):
            raise StoreError(f"cannot write run file {real}: the file is read-only; choose another path=")

    @classmethod
    def _open_file(cls, real: str, *, overwrite: bool, resume: bool) -> h5py.File:
        """Open the file that will replace ``real``: built at ``<real>.writing`` (see
        :mod:`._recover`), renamed over ``real`` by :meth:`start_swmr` or :meth:`close`."""
        cls.check_path(real, overwrite=overwrite, resume=resume)
        pid = live_writer(real)
        if pid is not None:
            raise StoreError(f"run file {real} is being written by process {pid}; stop it before writing this "
                             "file again, or choose another path=")
        tmp = writing_path(real)
        if os.path.exists(tmp):  # left by a writer killed before its first training batch
            os.remove(tmp)
        exists = os.path.exists(real)
        try:
            if exists and resume:
                with _open_existing(real) as existing:
                    _check_is_run_file(existing, real)
                rebuild(real, tmp)
                file = h5py.File(tmp, "r+", libver=LIBVER, rdcc_nbytes=_CHUNK_CACHE_BYTES)
                history = json.loads(file.attrs.get("history", "[]"))
                history.append({"event": "resumed", "utc": _utc_now()})
                file.attrs["history"] = _json_attr(history)
                file.attrs["versions"] = _json_attr(_versions())
            else:
                file = h5py.File(tmp, "w", libver=LIBVER, rdcc_nbytes=_CHUNK_CACHE_BYTES)
                file.attrs["format"] = FORMAT_NAME
                file.attrs["format_version"] = FORMAT_VERSION
                file.attrs["created_utc"] = _utc_now()
                file.attrs["versions"] = _json_attr(_versions())
                file.attrs["config"] = _json_attr({})
                file.attrs["model"] = _json_attr({})
                file.attrs["history"] = _json_attr([{"event": "created", "utc": _utc_now()}])
        except OSError as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise StoreError(f"cannot open run file {real}: {exc}") from exc
        write_lock(real)
        return file

    #: Longest error message kept in ``/errors`` (longer ones are cut, with a marker).
    ERROR_MESSAGE_BYTES = 512

    def _declare_errors_table(self) -> None:
        """``/errors``: one row per instrumentation failure (step, monitor, message)."""
        if "errors" in self.tables:
            return
        fields = [Field("step", (), "int64"), Field("monitor", (), "S64"),
                  Field("message", (), f"S{self.ERROR_MESSAGE_BYTES}")]
        self.declare_table("errors", fields, key="step", row_dim="error")

    def record_error(self, step: int, monitor: str, message: str) -> None:
        """Record a failure in ``/errors`` and flush (best effort: never raises)."""
        table = self.tables.get("errors")
        if table is None:
            return
        limit = self.ERROR_MESSAGE_BYTES
        data = message.encode("utf-8", "replace")
        if len(data) > limit:
            data = data[: limit - len(" [cut]".encode())] + b" [cut]"
        try:
            table.append(step=max(int(step), 0), monitor=monitor.encode()[:64], message=data)
            self.flush()
        except Exception as exc:  # the file itself may be what failed
            log.error("run file %s: could not record the error of %s: %s", self.path, monitor, exc)

    def _publish(self) -> None:
        """Atomically replace the run file with the one being written (once)."""
        if self._published:
            return
        os.replace(writing_path(self.path), self.path)
        fsync_directory(self.path)
        self._published = True

    def release(self, owner: str) -> None:
        """Give up ``owner``'s share; the last owner flushes and closes the file."""
        with self._registry_lock:
            if owner in self._owners:
                self._owners.remove(owner)
            if self._owners:
                return
            self._registry.pop(self.path, None)
        self.close()

    def abandon(self) -> None:
        """Close without putting the file being written in place (for a post-hoc rewrite that
        failed half-way): the copy at ``<path>.writing`` is deleted, ``path`` stays as it was,
        and every owner's share is dropped. Refused once the new file is in place (SWMR)."""
        if self._published:
            raise StoreError(f"run file {self.path} is already in place (its training started); it cannot be "
                             "abandoned, only closed")
        with self._registry_lock:
            self._owners.clear()
            if self._registry.get(self.path) is self:
                del self._registry[self.path]
        background, self._background = self._background, None
        if background is not None:
            background.stop()
        try:
            if self.file.id.valid:
                self.file.close()
        finally:
            tmp = writing_path(self.path)
            if os.path.exists(tmp):
                os.remove(tmp)
            remove_lock(self.path)

    def close(self) -> None:
        """Flush and close. After a write error, closing still releases the file (and the
        error is logged, not raised again)."""
        background, self._background = self._background, None
        if background is not None:
            background.stop()  # waits for a write in progress; a pending error goes to write_error
            self._background_seconds += background.seconds
            self._background_cpu_seconds += background.cpu_seconds
        with self._lock:
            if not self.file.id.valid:
                return
            try:
                self.flush()
            except StoreError:
                if self.write_error is None:
                    raise
                log.error("run file %s: buffered rows lost after a write error: %s", self.path, self.write_error)
                for table in self.tables.values():
                    getattr(table, "_buffer", []).clear()
            finally:
                try:
                    self.file.close()
                except (OSError, RuntimeError) as exc:  # pragma: no cover - depends on the failure
                    log.error("run file %s: closing failed: %s", self.path, exc)
                try:
                    self._publish()  # closed before SWMR (no training batch): still the new file
                finally:
                    remove_lock(self.path)
                    RunStore.closed_stats[self.path] = {"background_s": self._background_seconds,
                                                        "background_cpu_s": self._background_cpu_seconds,
                                                        "blocking_s": self._blocking_seconds}

    @property
    def owners(self) -> List[str]:
        """The monitors (state keys) that share this file now."""
        return list(self._owners)

    @property
    def closed(self) -> bool:
        return not self.file.id.valid

    # ------------------------------------------------------------------ schema
    def _require_schema_phase(self, what: str) -> None:
        if self.swmr:
            raise StoreError(
                f"cannot {what} after the run file switched to SWMR mode (first training batch): "
                "declare every table and static array in setup/on_train_start"
            )

    def set_config(self, owner: str, config: Mapping[str, Any]) -> None:
        """Record ``owner``'s settings in the root ``config`` attribute (JSON)."""
        self._require_schema_phase("record a monitor's config")
        with self._lock:
            merged = json.loads(self.file.attrs.get("config", "{}"))
            merged[owner] = config
            self.file.attrs["config"] = _json_attr(merged)

    def set_model_summary(self, summary: Mapping[str, Any]) -> None:
        self._require_schema_phase("record the model summary")
        with self._lock:
            self.file.attrs["model"] = _json_attr(summary)

    def declare_table(self, group: str, fields: Sequence[Field], *, key: str = "step", row_dim: Optional[str] = None,
                      coords: Optional[Mapping[str, Any]] = None, attrs: Optional[Mapping[str, Any]] = None,
                      rows: Optional[int] = None) -> Table:
        """Create the table ``group`` (or check it against the file, on resume).

        ``key`` names the field written last in each row (an int field, scalar per row);
        ``row_dim`` names the row axis (default: the key, which then is its coordinate).
        ``coords`` gives values for per-row axes (by dim name); other axes get a
        dimension-only scale. ``rows`` (on resume) truncates the table to that many rows.
        """
        self._require_schema_phase(f"declare table {group!r}")
        row_dim = row_dim or key
        fields = list(fields)
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise SchemaError(f"table {group!r} declares a field twice: {names}")
        if key not in names:
            raise SchemaError(f"table {group!r}: key field {key!r} is not among its fields {names}")
        key_field = next(f for f in fields if f.name == key)
        if key_field.shape != () or np.dtype(key_field.dtype).kind not in "iu":
            raise SchemaError(f"table {group!r}: key field {key!r} must be a scalar integer field")
        if row_dim != key and row_dim in names:
            raise SchemaError(f"table {group!r}: row axis {row_dim!r} may not also be a field name")
        coords = dict(coords or {})
        with self._lock:
            if group in self.tables:
                raise SchemaError(f"table {group!r} is declared twice in {self.path}")
            if group in self.file:
                table = self._check_existing_table(group, fields, key, row_dim)
                if rows is not None:
                    present = table.complete_rows()
                    if rows > present:
                        log.warning("table %s in %s holds %d complete rows, the checkpoint expected %d; "
                                    "keeping the %d present", group, self.path, present, rows, present)
                    table.truncate(min(rows, present))
                else:
                    table.truncate(table.complete_rows())
            else:
                table = self._create_table(group, fields, key, row_dim, coords, attrs or {})
            self.tables[group] = table
            return table

    def declare_fixed_table(self, group: str, fields: Sequence[Field], n_rows: int, *, row_dim: str,
                            coords: Optional[Mapping[str, Any]] = None,
                            attrs: Optional[Mapping[str, Any]] = None) -> FixedTable:
        """Create (or, on resume, check) a table of ``n_rows`` rows rewritten as a whole.

        ``coords[row_dim]`` (e.g. dataset indices) labels the rows.
        """
        self._require_schema_phase(f"declare table {group!r}")
        fields = list(fields)
        coords = dict(coords or {})
        if n_rows < 1:
            raise SchemaError(f"table {group!r}: n_rows must be >= 1, got {n_rows}")
        with self._lock:
            if group in self.tables:
                raise SchemaError(f"table {group!r} is declared twice in {self.path}")
            if group in self.file:
                grp = self.file[group]
                stored = json.loads(grp.attrs.get("fields", "[]"))
                if stored != [f.to_json() for f in fields] or int(grp.attrs.get("n_rows", -1)) != n_rows:
                    raise SchemaError(
                        f"table {group!r} in {self.path} was written with different fields or row count; resume "
                        "with the same settings and data, or write to a new path="
                    )
            else:
                grp = self.file.require_group(group)
                grp.attrs["kind"] = "fixed"
                grp.attrs["row_dim"] = row_dim
                grp.attrs["n_rows"] = int(n_rows)
                grp.attrs["fields"] = _json_attr([f.to_json() for f in fields])
                for name, value in (attrs or {}).items():
                    grp.attrs[name] = value if isinstance(value, (int, float, str)) else _json_attr(value)
                if row_dim in coords:
                    grp.create_dataset(row_dim, data=np.asarray(coords[row_dim])).make_scale(row_dim)
                else:
                    grp.create_dataset(row_dim, shape=(n_rows,), dtype="i4").make_scale(NETCDF_DIM_ONLY)
                grp.create_dataset("version", shape=(1,), dtype="i4").make_scale(NETCDF_DIM_ONLY)
                written = grp.create_dataset("written_step", shape=(1,), dtype="int64", fillvalue=-1)
                written.dims[0].attach_scale(grp["version"])
                for f in fields:
                    dtype = np.dtype(f.dtype)
                    chunks = chunk_shape(f.shape, dtype.itemsize)
                    chunks = (min(chunks[0], n_rows),) + chunks[1:]
                    ds = grp.create_dataset(f.name, shape=(n_rows,) + f.shape, dtype=dtype, chunks=chunks,
                                            fillvalue=f.fill_value, compression="gzip", compression_opts=COMPRESSION_LEVEL,
                                            shuffle=dtype.itemsize > 1)
                    ds.dims[0].attach_scale(grp[row_dim])
                    for axis, (dim, length) in enumerate(zip(f.dims, f.shape), start=1):
                        if dim not in grp:
                            grp.create_dataset(dim, shape=(length,), dtype="i4").make_scale(NETCDF_DIM_ONLY)
                        ds.dims[axis].attach_scale(grp[dim])
            table = FixedTable(self, grp, fields, n_rows)
            self.tables[group] = table
            return table

    def _create_table(self, group: str, fields: List[Field], key: str, row_dim: str,
                      coords: Mapping[str, Any], attrs: Mapping[str, Any]) -> Table:
        grp = self.file.require_group(group)
        grp.attrs["kind"] = "append"
        grp.attrs["key"] = key
        grp.attrs["row_dim"] = row_dim
        grp.attrs["fields"] = _json_attr([f.to_json() for f in fields])
        for name, value in attrs.items():
            grp.attrs[name] = value if isinstance(value, (int, float, str)) else _json_attr(value)
        dim_lengths: Dict[str, int] = {}
        for f in fields:
            for dim, length in zip(f.dims, f.shape):
                if dim in (row_dim, key) or dim in names_of(fields):
                    raise SchemaError(f"table {group!r}: axis name {dim!r} of field {f.name!r} clashes with a field or the row axis")
                if dim_lengths.setdefault(dim, length) != length:
                    raise SchemaError(f"table {group!r}: axis {dim!r} has length {dim_lengths[dim]} in one field and {length} in {f.name!r}")
        for f in fields:
            dtype = np.dtype(f.dtype)
            chunks = chunk_shape(f.shape, dtype.itemsize)
            ds = grp.create_dataset(f.name, shape=(0,) + f.shape, maxshape=(None,) + f.shape, dtype=dtype,
                                    chunks=chunks, fillvalue=f.fill_value, compression="gzip",
                                    compression_opts=COMPRESSION_LEVEL, shuffle=dtype.itemsize > 1)
            for attr, value in f.attrs.items():
                ds.attrs[attr] = value
        # Row axis scale.
        if row_dim == key:
            grp[key].make_scale(row_dim)
        else:
            scale = grp.create_dataset(row_dim, shape=(0,), maxshape=(None,), dtype="i4", chunks=(16384,))
            scale.make_scale(NETCDF_DIM_ONLY)
        # Per-row axes: coordinates when given, dimension-only scales otherwise.
        for dim, length in dim_lengths.items():
            if dim in coords:
                values = np.asarray(coords[dim])
                if values.shape != (length,):
                    raise SchemaError(f"table {group!r}: coordinate {dim!r} has shape {values.shape}, the axis has length {length}")
                grp.create_dataset(dim, data=values).make_scale(dim)
            else:
                grp.create_dataset(dim, shape=(length,), dtype="i4").make_scale(NETCDF_DIM_ONLY)
        for f in fields:
            ds = grp[f.name]
            if f.name != row_dim:
                ds.dims[0].attach_scale(grp[row_dim])
            for axis, dim in enumerate(f.dims, start=1):
                ds.dims[axis].attach_scale(grp[dim])
        return Table(self, grp, fields, key, row_dim)

    def _check_existing_table(self, group: str, fields: List[Field], key: str, row_dim: str) -> Table:
        grp = self.file[group]
        stored = {d["name"]: d for d in json.loads(grp.attrs.get("fields", "[]"))}
        wanted = {f.name: f.to_json() for f in fields}
        if stored != wanted or grp.attrs.get("key") != key:
            raise SchemaError(
                f"table {group!r} in {self.path} was written with different fields or shapes "
                f"(file: {sorted(stored)}, now: {sorted(wanted)}). Resume with the same monitor settings, "
                "or write to a new path="
            )
        return Table(self, grp, fields, key, row_dim)

    def write_static(self, group: str, name: str, data: Any, dims: Sequence[str],
                     coords: Optional[Mapping[str, Any]] = None, attrs: Optional[Mapping[str, Any]] = None) -> None:
        """Write a fixed array (e.g. a probe's dataset indices) with named axes.

        On resume the array must equal the one in the file (a probe is fixed for a run).
        """
        self._require_schema_phase(f"write {group}/{name}")
        if hasattr(data, "detach"):
            data = data.detach().cpu().numpy()
        array = np.asarray(data)
        if array.dtype.kind not in "biuf":
            raise SchemaError(f"{group}/{name}: only numeric arrays can be stored, got dtype {array.dtype}")
        if len(dims) != array.ndim:
            raise SchemaError(f"{group}/{name}: {len(dims)} dim names for a {array.ndim}-d array")
        coords = dict(coords or {})
        with self._lock:
            grp = self.file.require_group(group)
            if name in grp:
                existing = grp[name][()]
                if existing.shape != array.shape or not np.array_equal(existing, array, equal_nan=array.dtype.kind == "f"):
                    raise SchemaError(
                        f"{group}/{name} in {self.path} differs from the value of this run (a probe set is fixed "
                        "for the life of a run file). Resume with the same settings or write to a new path="
                    )
                return
            for dim, length in zip(dims, array.shape):
                if dim in grp:
                    if grp[dim].shape != (length,):
                        raise SchemaError(f"{group}: axis {dim!r} already has length {grp[dim].shape[0]}, not {length}")
                    continue
                if dim in coords:
                    grp.create_dataset(dim, data=np.asarray(coords[dim])).make_scale(dim)
                else:
                    grp.create_dataset(dim, shape=(length,), dtype="i4").make_scale(NETCDF_DIM_ONLY)
            chunks = chunk_shape(array.shape[1:], array.dtype.itemsize) if array.ndim else None
            if chunks is not None:
                chunks = (min(chunks[0], max(1, array.shape[0])),) + chunks[1:]
            ds = grp.create_dataset(name, data=array, chunks=chunks if array.size else None,
                                    compression="gzip" if array.size else None,
                                    shuffle=bool(array.size) and array.dtype.itemsize > 1)
            for axis, dim in enumerate(dims):
                if dim != name:
                    ds.dims[axis].attach_scale(grp[dim])
            for attr, value in (attrs or {}).items():
                ds.attrs[attr] = value if isinstance(value, (int, float, str)) else _json_attr(value)

    # ------------------------------------------------------------------ streaming
    def start_swmr(self) -> None:
        """Switch to single-writer/multiple-reader mode (idempotent)."""
        with self._lock:
            if self.swmr:
                return
            self.flush()
            self.file.swmr_mode = True
            self.swmr = True
            self._publish()

    #: Rows waiting for the writer thread beyond this many bytes make :meth:`flush_async`
    #: wait for it (bounded memory when snapshots come faster than the disk takes them).
    MAX_BUFFERED_BYTES = 256 * 2**20

    def flush_async(self) -> None:
        """Hand the buffered rows to the store's writer thread and return at once.

        Before SWMR starts (and with ``background=False``) this is :meth:`flush`. A write
        error of the writer thread is raised here (or by the next :meth:`flush`), in the
        training thread, as the :class:`StoreError` it was.
        """
        if not self.swmr or not self.background:
            self.flush()
            return
        if self._background is None:
            self._background = _BackgroundWriter(self)
        self._background.raise_error()
        if sum(t.buffered_bytes for t in self.tables.values()) > self.MAX_BUFFERED_BYTES:
            self._background.wait_idle()
            self._background.raise_error()
        self._background.request()

    def flush(self) -> None:
        """Write buffered rows (key last), flush HDF5, and fsync when durable; waits for the
        writer thread first.

        A write error (full disk, I/O error) raises :class:`StoreError` naming the file and
        the cause; rows flushed before it stay readable.
        """
        background = self._background
        started = time.perf_counter()
        try:
            if background is not None and threading.current_thread() is not background.thread:
                background.wait_idle()
                background.raise_error()
            self._flush_now()
        finally:
            self._blocking_seconds += time.perf_counter() - started

    def _flush_now(self) -> None:
        with self._lock:
            if not self.file.id.valid:
                return
            try:
                for table in self.tables.values():
                    table._write_buffer()
                self.file.flush()
                if self.fsync:
                    try:
                        os.fsync(self.file.id.get_vfd_handle())
                    except (ValueError, TypeError, AttributeError):  # pragma: no cover - driver without a fd
                        pass
            except (OSError, RuntimeError) as exc:
                self.write_error = exc
                raise StoreError(f"writing run file {self.path} failed: {_cause(exc)}") from exc


class _BackgroundWriter:
    """One daemon thread per run file that runs :meth:`RunStore._flush_now` on request.

    Requests coalesce (one write takes every row buffered so far). The first error is kept
    and raised in the training thread by :meth:`raise_error` (called from ``flush`` and
    ``flush_async``); :meth:`stop` drains and joins the thread.
    """

    def __init__(self, store: RunStore):
        self.store = store
        self._cond = threading.Condition()
        self._pending = False
        self._busy = False
        self._stopping = False
        self._error: Optional[BaseException] = None
        self.seconds = 0.0  # time spent writing, for benchmarks
        self.cpu_seconds = 0.0  # CPU time of this thread spent writing
        self.thread = threading.Thread(target=self._run, name=f"lightning_ntk writer ({os.path.basename(store.path)})",
                                       daemon=True)
        self.thread.start()

    def request(self) -> None:
        with self._cond:
            self._pending = True
            self._cond.notify_all()

    def wait_idle(self) -> None:
        with self._cond:
            while self._pending or self._busy:
                self._cond.wait()

    def raise_error(self) -> None:
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def stop(self) -> None:
        self.wait_idle()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.thread.join()
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            self.store.write_error = self.store.write_error or error
            log.error("run file %s: %s", self.store.path, error)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                self._pending, self._busy = False, True
            started, started_cpu = time.perf_counter(), time.thread_time()
            try:
                self.store._flush_now()
            except BaseException as exc:  # kept for the training thread
                with self._cond:
                    self._error = self._error or exc
            finally:
                self.seconds += time.perf_counter() - started
                self.cpu_seconds += time.thread_time() - started_cpu
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return str(exc)


def names_of(fields: Iterable[Field]) -> List[str]:
    return [f.name for f in fields]


def _open_existing(path: str) -> h5py.File:
    from ._recover import open_for_reading

    try:
        return open_for_reading(path)
    except OSError as exc:
        raise StoreError(f"cannot read run file {path} to resume it: {exc}") from exc


def _check_is_run_file(file: h5py.File, path: str) -> None:
    fmt = file.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT_NAME:
        raise StoreError(f"{path} is an HDF5 file but not a lightning_ntk run file (no format={FORMAT_NAME!r} attribute)")
    version = int(file.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} has run-file format version {version}, newer than this lightning_ntk understands "
            f"({FORMAT_VERSION}); upgrade lightning_ntk"
        )


def wall_time() -> float:
    """Seconds since the epoch, as stored in every table's ``wall_time`` field."""
    return time.time()
