"""Run-store throughput: rows per second and MB/s, against plain h5py.

    .venv/bin/python benchmarks/store.py

Two row shapes: a scalar row (step, epoch, loss, accuracy, grad norm: what ProbeMetrics
writes besides logits) and an NTK row (a 256 x 256 float32 kernel, 20 eigenvalues, a
256 x 20 eigenvector block and 10 scalars: 288 KB). For each, 200 rows written to a fresh
file in a temporary directory (the local disk), one row per flush, in three ways:

* ``RunStore sync``: ``Table.append`` + ``RunStore.flush()`` (write, HDF5 flush, fsync)
  after every row, the path before SWMR and at checkpoints;
* ``RunStore async``: ``Table.append`` + ``RunStore.flush_async()`` (the writer thread
  writes, flushes and fsyncs; the caller goes on), the path of every snapshot; the time
  until the last row is on disk is reported, and the time the caller was busy;
* ``h5py plain``: the same datasets (same chunks, gzip at the store's level + shuffle), resized and
  written row by row, ``File.flush()`` and ``os.fsync`` after every row: what a hand-written
  logger that survives crashes would do (no key-last protocol, no SWMR).

Columns: rows/s and MB/s (uncompressed bytes) until every row is on disk; "caller ms/row":
time the calling (training) thread spends per row.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ntk.store import Field, RunStore  # noqa: E402
from lightning_ntk.store._schema import chunk_shape  # noqa: E402
from lightning_ntk.store._writer import COMPRESSION_LEVEL  # noqa: E402

ROWS = 200


def scalar_fields():
    return [Field("step", (), "int64"), Field("epoch"), Field("loss"), Field("accuracy"), Field("grad_norm")]


def ntk_fields():
    return ([Field("step", (), "int64"), Field("epoch"), Field("kernel", (256, 256), "float32", dims=("i", "j")),
             Field("eigvals", (20,), dims=("eigen",)), Field("eigvecs", (256, 20), "float32", dims=("row", "eigen"))]
            + [Field(f"scalar{i}") for i in range(10)])


def make_row(fields, i, rng):
    row = {}
    for f in fields:
        row[f.name] = i if f.name == "step" else rng.standard_normal(f.shape).astype(f.dtype)
    return row


def row_bytes(fields):
    return sum(int(np.prod(f.shape, dtype=np.int64)) * np.dtype(f.dtype).itemsize for f in fields)


def run_store(path, fields, rows, mode):
    store = RunStore.acquire(path, owner="bench", overwrite=True)
    table = store.declare_table("t", fields, coords={"eigen": np.arange(20)} if len(fields) > 6 else None)
    store.start_swmr()
    busy = 0.0
    started = time.perf_counter()
    for row in rows:
        t0 = time.perf_counter()
        table.append(row)
        if mode == "sync":
            store.flush()
        else:
            store.flush_async()
        busy += time.perf_counter() - t0
    store.flush()  # every row on disk
    total = time.perf_counter() - started
    store.release("bench")
    return total, busy


def run_h5py(path, fields, rows):
    busy = 0.0
    started = time.perf_counter()
    with h5py.File(path, "w", libver="latest") as f:
        ds = {}
        for fld in fields:
            ds[fld.name] = f.create_dataset(fld.name, shape=(0,) + fld.shape, maxshape=(None,) + fld.shape,
                                            dtype=fld.dtype, chunks=chunk_shape(fld.shape, np.dtype(fld.dtype).itemsize),
                                            compression="gzip", compression_opts=COMPRESSION_LEVEL, shuffle=True)
        fd = f.id.get_vfd_handle()
        for n, row in enumerate(rows):
            for name, d in ds.items():
                d.resize(n + 1, axis=0)
                d[n] = row[name]
            f.flush()
            os.fsync(fd)
    total = time.perf_counter() - started
    busy = total
    return total, busy


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"# run-store throughput: {ROWS} rows per case, one flush per row, h5py {h5py.__version__}, "
          f"HDF5 {h5py.version.hdf5_version}")
    head = f"{'rows':<8} {'method':<16} {'rows/s':>8} {'MB/s':>7} {'caller ms/row':>14} {'vs h5py':>8}"
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for label, fields in (("scalar", scalar_fields()), ("ntk", ntk_fields())):
            rows = [make_row(fields, i, rng) for i in range(ROWS)]
            nbytes = row_bytes(fields) * ROWS
            results = {}
            results["h5py plain"] = run_h5py(os.path.join(tmp, f"{label}_plain.h5"), fields, rows)
            results["RunStore sync"] = run_store(os.path.join(tmp, f"{label}_sync.h5"), fields, rows, "sync")
            results["RunStore async"] = run_store(os.path.join(tmp, f"{label}_async.h5"), fields, rows, "async")
            plain_busy = results["h5py plain"][1]
            for method, (total, busy) in results.items():
                print(f"{label:<8} {method:<16} {ROWS / total:>8.0f} {nbytes / total / 1e6:>7.1f} "
                      f"{1000 * busy / ROWS:>14.3f} {busy / plain_busy:>8.2f}")


if __name__ == "__main__":
    main()
