"""Reader of run files: ``open_run(path)`` -> :class:`Run`.

Only complete rows are shown: a row counts once its key field (``step``) was written,
which the writer does last. ``live=True`` follows a file that is still being written
(HDF5 SWMR); :meth:`Run.refresh` then shows rows appended since.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional

import h5py
import numpy as np

from ._schema import FORMAT_NAME, FORMAT_VERSION, NETCDF_DIM_ONLY


class RunFormatError(ValueError):
    """The file is not a lightning_ntk run file, or its format is newer than this reader."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_scale(ds: h5py.Dataset) -> bool:
    return _text(ds.attrs.get("CLASS", b"")) == "DIMENSION_SCALE"


def _dim_name(ds: h5py.Dataset, axis: int) -> str:
    """Name of axis ``axis`` of ``ds``: its dimension scale's name."""
    if _is_scale(ds) and ds.ndim == 1:
        name = _text(ds.attrs.get("NAME", "")).rstrip("\x00")
        return os.path.basename(ds.name) if name in ("", NETCDF_DIM_ONLY) else name
    scales = list(ds.dims[axis].values())
    if not scales:
        return f"{os.path.basename(ds.name)}_dim{axis}"
    scale = scales[0]
    name = _text(scale.attrs.get("NAME", "")).rstrip("\x00")
    return os.path.basename(scale.name) if name in ("", NETCDF_DIM_ONLY) else name


def _is_bookkeeping(name: str) -> bool:
    return name == "errors" or name.startswith("skipped/")


class TableView:
    """Read access to one group of a run file. Indexing by field name gives NumPy arrays."""

    def __init__(self, run: "Run", name: str):
        self._run = run
        self.name = name

    @property
    def group(self) -> h5py.Group:
        return self._run.file[self.name]

    @property
    def is_table(self) -> bool:
        """True for an append table (has a key field), False for a static group (probe)."""
        return "key" in self.group.attrs

    @property
    def is_fixed(self) -> bool:
        """True for a fixed table (rewritten as a whole, e.g. a per-example summary)."""
        return _text(self.group.attrs.get("kind", "")) == "fixed"

    @property
    def written_step(self) -> Optional[int]:
        """For a fixed table: the step of its last complete rewrite (None if never or mid-rewrite)."""
        if not self.is_fixed:
            return None
        step = int(self.group["written_step"][0])
        return step if step >= 0 else None

    @property
    def key(self) -> Optional[str]:
        return _text(self.group.attrs["key"]) if self.is_table else None

    @property
    def row_dim(self) -> Optional[str]:
        return _text(self.group.attrs.get("row_dim", self.key)) if self.is_table else None

    @property
    def fields(self) -> List[str]:
        """Data fields (for a table: in declaration order), excluding pure axis scales."""
        if self.is_table or self.is_fixed:
            return [f["name"] for f in json.loads(_text(self.group.attrs["fields"]))]
        return [k for k, v in self.group.items() if isinstance(v, h5py.Dataset) and not _is_scale(v)]

    @property
    def attrs(self) -> Dict[str, Any]:
        """Group attributes; JSON-encoded lists and dicts are decoded."""
        out: Dict[str, Any] = {}
        for key, value in self.group.attrs.items():
            value = _text(value) if isinstance(value, bytes) else value
            if isinstance(value, str) and value[:1] in ("[", "{"):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            out[key] = value
        return out

    def __len__(self) -> int:
        """Number of complete rows (tables) or length of the first axis (static groups)."""
        if self.is_fixed:
            return int(self.group.attrs["n_rows"]) if self.written_step is not None else 0
        if not self.is_table:
            first = self.fields[0] if self.fields else None
            return int(self.group[first].shape[0]) if first else 0
        keys = self.group[self.key][()]
        bad = np.flatnonzero(keys < 0)
        return int(bad[0]) if bad.size else int(keys.shape[0])

    def __contains__(self, field: str) -> bool:
        return field in self.group and isinstance(self.group[field], h5py.Dataset)

    def __getitem__(self, field: str) -> np.ndarray:
        if field not in self:
            raise KeyError(f"group {self.name!r} of {self._run.path} has no dataset {field!r}; it has {self.fields}")
        ds = self.group[field]
        if self.is_fixed and field != "written_step":
            return ds[: len(self)]
        if self.is_table and ds.ndim >= 1 and _dim_name(ds, 0) == self.row_dim:
            return ds[: len(self)]
        return ds[()]

    def dims(self, field: str) -> List[str]:
        ds = self.group[field]
        return [_dim_name(ds, axis) for axis in range(ds.ndim)]

    def __repr__(self) -> str:
        return f"<TableView {self.name!r}: {len(self)} rows, fields {self.fields}>"


class Run:
    """A lightning_ntk run file opened for reading. Use as a context manager."""

    def __init__(self, path: "os.PathLike[str] | str", live: bool = False):
        self.path = os.fspath(path)
        self.live = live
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"no run file at {self.path}")
        self.file = self._open(self.path, live)
        fmt = _text(self.file.attrs.get("format", ""))
        if fmt != FORMAT_NAME:
            self.file.close()
            raise RunFormatError(
                f"{self.path} is an HDF5 file but not a lightning_ntk run file (its root has no format={FORMAT_NAME!r})"
            )
        version = int(self.file.attrs.get("format_version", -1))
        if version > FORMAT_VERSION:
            self.file.close()
            raise RunFormatError(
                f"{self.path} has run-file format version {version}; this lightning_ntk reads up to "
                f"version {FORMAT_VERSION}: upgrade lightning_ntk"
            )
        self.format_version = version

    @staticmethod
    def _open(path: str, live: bool) -> h5py.File:
        if not h5py.is_hdf5(path):
            raise RunFormatError(f"{path} is not an HDF5 file, so not a lightning_ntk run file")
        if live:
            return h5py.File(path, "r", swmr=True)
        try:
            return h5py.File(path, "r")
        except OSError as exc:
            # Still being written, or its writer died: SWMR readers may open it.
            if "already open for write" in str(exc) or "consistency flags" in str(exc):
                return h5py.File(path, "r", swmr=True)
            raise

    # --------------------------------------------------------------- metadata
    def _json(self, name: str, default: Any) -> Any:
        raw = self.file.attrs.get(name)
        return default if raw is None else json.loads(_text(raw))

    @property
    def config(self) -> Dict[str, Any]:
        """Every monitor's settings, keyed by the monitor's state key."""
        return self._json("config", {})

    @property
    def versions(self) -> Dict[str, str]:
        return self._json("versions", {})

    @property
    def model(self) -> Dict[str, Any]:
        return self._json("model", {})

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self._json("history", [])

    @property
    def created_utc(self) -> str:
        return _text(self.file.attrs.get("created_utc", ""))

    # --------------------------------------------------------------- structure
    @property
    def tables(self) -> List[str]:
        """Names of the quantity tables (``ntk``, ``sharpness``, ...), in file order; the
        bookkeeping tables (``errors``, ``skipped/...``) are in :meth:`table_names`."""
        return [name for name in self.table_names() if not _is_bookkeeping(name)]

    def table_names(self, include_bookkeeping: bool = True) -> List[str]:
        """Every table of the file (with ``errors`` and ``skipped/<group>`` unless asked not)."""
        names: List[str] = []

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Group) and ("key" in obj.attrs or _text(obj.attrs.get("kind", "")) == "fixed"):
                names.append(name)

        self.file.visititems(visit)
        return names if include_bookkeeping else [n for n in names if not _is_bookkeeping(n)]

    def errors(self) -> List[Dict[str, Any]]:
        """Instrumentation failures recorded in ``/errors``: step, monitor, message."""
        if "errors" not in self.file:
            return []
        view = self["errors"]
        return [{"step": int(s), "monitor": m.decode(), "message": msg.decode("utf-8", "replace")}
                for s, m, msg in zip(view["step"], view["monitor"], view["message"])]

    @property
    def probes(self) -> List[str]:
        return list(self.file["probe"].keys()) if "probe" in self.file else []

    def probe(self, name: str = "train") -> Dict[str, np.ndarray]:
        """The probe set ``name``: ``index`` (dataset indices), ``y`` and, if stored, ``x``."""
        if name not in self.probes:
            raise KeyError(f"{self.path} has no probe {name!r}; probes: {self.probes}")
        view = TableView(self, f"probe/{name}")
        return {field: view[field] for field in view.fields}

    def __contains__(self, group: str) -> bool:
        return group in self.file and isinstance(self.file[group], h5py.Group)

    def __getitem__(self, group: str) -> TableView:
        if group not in self:
            raise KeyError(f"{self.path} has no group {group!r}; tables: {self.tables}")
        return TableView(self, group)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tables)

    # --------------------------------------------------------------- views
    def scalars(self, group: str):
        """Scalar series of a table as a pandas DataFrame indexed by its key (``step``)."""
        import pandas as pd

        view = self[group]
        if not view.is_table:
            raise ValueError(f"{group!r} is not a table with rows over time")
        columns = {}
        for field in view.fields:
            if field == view.key:
                continue
            ds = view.group[field]
            if ds.ndim == 1:
                columns[field] = view[field]
        frame = pd.DataFrame(columns, index=pd.Index(view[view.key], name=view.key))
        return frame

    def to_xarray(self, group: str):
        """A group as an ``xarray.Dataset`` (complete rows only), with its axis coordinates."""
        import xarray as xr

        view = self[group]
        grp = view.group
        data_vars: Dict[str, Any] = {}
        coords: Dict[str, Any] = {}
        n = len(view) if view.is_table else None
        if view.is_fixed and view.written_step is None:
            raise ValueError(f"table {group!r} was never completely written (or a crash interrupted its rewrite)")
        for name, ds in grp.items():
            if not isinstance(ds, h5py.Dataset):
                continue
            dims = view.dims(name)
            values = view[name] if view.is_table else ds[()]
            if _is_scale(ds):
                real = _text(ds.attrs.get("NAME", "")).rstrip("\x00") not in ("", NETCDF_DIM_ONLY)
                if real:
                    if n is not None and dims[0] == view.row_dim:
                        values = values[:n]
                    coords[dims[0]] = (dims, values)
                continue
            data_vars[name] = (dims, values)
        return xr.Dataset(data_vars=data_vars, coords=coords, attrs={k: v for k, v in view.attrs.items()
                                                                     if isinstance(v, (str, int, float))})

    def refresh(self) -> None:
        """Show rows appended since opening (``live=True`` files)."""
        if not self.live:
            return

        def visit(_name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                obj.refresh()

        self.file.visititems(visit)

    def summary(self) -> str:
        """A human-readable table of what the file holds."""
        lines = [f"run file {self.path}", f"  format {FORMAT_NAME} v{self.format_version}, created {self.created_utc}"]
        versions = self.versions
        if versions:
            lines.append("  written with " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
        model = self.model
        if model:
            lines.append(f"  model {model.get('class', '?')}: {model.get('parameters', '?')} parameters "
                         f"({model.get('trainable', '?')} trainable)")
        for name in self.probes:
            probe = self[f"probe/{name}"]
            lines.append(f"  probe {name!r}: {len(probe)} examples, fields {probe.fields}")
        sized = {c.get("group"): c.get("sizing") for c in self.config.values() if isinstance(c, dict)}
        for name in self.tables:
            view = self[name]
            lines.append(f"  /{name}: {len(view)} rows" + (f" (per example, as of step {view.written_step})"
                                                               if view.is_fixed else ""))
            if len(view) and not view.is_fixed:
                keys = view[view.key]
                lines.append(f"      {view.key} {int(keys[0])} .. {int(keys[-1])}")
                if "snapshot_seconds" in view.fields:
                    seconds = view["snapshot_seconds"]
                    lines.append(f"      snapshots took {float(np.mean(seconds)):.2f} s on average, {float(np.sum(seconds)):.1f} s "
                                 "in all")
            sizing = sized.get(name)
            if sizing:
                lines.append("      sized to the budget: " + _describe_sizing(sizing))
            width = max([len(f) for f in view.fields] + [16])
            for field in view.fields:
                ds = view.group[field]
                shape = ",".join(str(s) for s in ds.shape[1:])
                dims = view.dims(field)[1:]
                detail = f"({shape})  [{', '.join(dims)}]" if shape else ""
                lines.append(f"      {field:<{width}}  {ds.dtype}{detail}")
        return "\n".join(lines)

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Run {self.path!r}: tables {self.tables}, probes {self.probes}>"


def open_run(path: "os.PathLike[str] | str", live: bool = False) -> Run:
    """Open a run file for reading. ``live=True`` follows a training that is still writing it."""
    return Run(path, live=live)


def _describe_sizing(sizing: Dict[str, Any]) -> str:
    """One line of a monitor's ``sizing`` config (see :mod:`lightning_ntk.sizing`)."""
    work = "".join(f", {k}={v}" for k, v in (sizing.get("work") or {}).items())
    if "predicted_seconds" not in sizing:
        return str(sizing.get("note", "not sized")) + (f" (size {sizing['size']}{work})" if "size" in sizing else "")
    who = f"the user's size {sizing['size']}" if sizing.get("user_size") else \
        f"size {sizing['size']} of default {sizing.get('default')}{work}"
    seconds = (sizing.get("training") or {}).get("seconds")
    length = f" of a {seconds:.0f} s training" if isinstance(seconds, (int, float)) else ""
    return (f"{who}, predicted {sizing['predicted_seconds']:.2f} s per snapshot, {sizing['allowance_seconds']:.2f} s allowed "
            f"for the first and last{length}" + ("" if sizing.get("fits") else " (over its share)"))
