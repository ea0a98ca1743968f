"""The HDF5 run file: a streaming writer shared by monitors, and a reader."""
from ._check import CheckReport, check_run
from ._reader import Run, RunFormatError, TableView, open_run
from ._schema import FORMAT_NAME, FORMAT_VERSION, Field, chunk_shape
from ._writer import RunStore, SchemaError, StoreError, Table, wall_time

__all__ = [
    "CheckReport", "check_run", "FORMAT_NAME", "FORMAT_VERSION", "Field", "Run", "RunFormatError", "RunStore", "SchemaError", "StoreError",
    "Table", "TableView", "chunk_shape", "open_run", "wall_time",
]
