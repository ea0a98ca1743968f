"""Schema of a run file: fields, tables and the chunk-shape rule (format v1).

A *table* is one HDF5 group whose datasets share a first axis (the row axis). Rows are
appended; the table's *key* field (``step`` for time series) is written last in each row
and is filled with ``-1`` until then, so a reader can tell a complete row from one that a
crash interrupted. Every axis of every dataset has an HDF5 dimension scale, which is what
lets ``xarray.open_dataset(..., engine="h5netcdf")`` open a group directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

FORMAT_NAME = "lightning_ntk"
FORMAT_VERSION = 1

#: Chunks are sized to about this many bytes (uncompressed) when a row is small.
CHUNK_TARGET_BYTES = 64 * 1024
#: No chunk grows beyond this (the default HDF5 chunk cache is 1 MiB).
CHUNK_MAX_BYTES = 1024 * 1024

#: ``NAME`` attribute that marks a dimension scale as "a dimension but not a variable"
#: (netCDF-4 convention): the axis has a name and length but no coordinate values.
NETCDF_DIM_ONLY = "This is a netCDF dimension but not a netCDF variable."


@dataclass(frozen=True)
class Field:
    """One dataset of a table: the shape and dtype of a single row.

    ``dims`` names the per-row axes (the row axis is named by the table). Axes sharing a
    name within a group must have the same length; they share one dimension scale.
    """

    name: str
    shape: Tuple[int, ...] = ()
    dtype: str = "float64"
    dims: Optional[Tuple[str, ...]] = None
    fill: Optional[float] = None
    attrs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"field name must be a non-empty name without '/', got {self.name!r}")
        shape = tuple(int(s) for s in self.shape)
        if any(s <= 0 for s in shape):
            raise ValueError(f"field {self.name!r}: every axis length must be positive, got shape {shape}")
        object.__setattr__(self, "shape", shape)
        np.dtype(self.dtype)  # raises TypeError for an unknown dtype
        if np.dtype(self.dtype).kind not in "biufS":
            raise ValueError(
                f"field {self.name!r}: dtype {self.dtype!r} is not numeric; run files hold only "
                "bool, integer and float arrays, and fixed-length byte strings ('S<n>')"
            )
        dims = self.dims if self.dims is not None else tuple(f"{self.name}_dim{i}" for i in range(len(shape)))
        if len(dims) != len(shape):
            raise ValueError(f"field {self.name!r}: {len(dims)} dim names for a {len(shape)}-d row shape {shape}")
        object.__setattr__(self, "dims", tuple(dims))

    @property
    def fill_value(self) -> Any:
        if self.fill is not None:
            return self.fill
        kind = np.dtype(self.dtype).kind
        if kind == "S":
            return b""
        if kind == "f":
            return np.nan
        if kind == "b":
            return False
        return -1

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": np.dtype(self.dtype).str, "dims": list(self.dims)}


def chunk_shape(row_shape: Sequence[int], itemsize: int) -> Tuple[int, ...]:
    """Chunk shape for a dataset of rows of ``row_shape``: about 64 KiB, never over 1 MiB.

    Small rows are grouped (many rows per chunk); a row larger than 1 MiB is split along
    its leading axes so one chunk holds part of one row.
    """
    row_shape = tuple(int(s) for s in row_shape)
    row_bytes = itemsize * int(np.prod(row_shape, dtype=np.int64)) if row_shape else itemsize
    if row_bytes <= CHUNK_MAX_BYTES:
        rows = max(1, min(CHUNK_TARGET_BYTES // row_bytes, 1 << 16))
        return (int(rows),) + row_shape
    inner = list(row_shape)
    # Halve the leading inner axes until one chunk fits.
    axis = 0
    while itemsize * int(np.prod(inner, dtype=np.int64)) > CHUNK_MAX_BYTES:
        if inner[axis] > 1:
            inner[axis] = int(math.ceil(inner[axis] / 2))
        else:
            axis += 1
    return (1,) + tuple(inner)
