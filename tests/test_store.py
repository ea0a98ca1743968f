"""The run store: schema, chunking, key-last rows, resume truncation, crash recovery, readers."""
import json
import os
import subprocess
import sys
import textwrap
import threading

import h5py
import numpy as np
import pytest

from lightning_ntk.store import Field, RunFormatError, RunStore, SchemaError, StoreError, chunk_shape, open_run
from lightning_ntk.store._schema import CHUNK_MAX_BYTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fields(k=3):
    return [Field("step", (), "int64"), Field("loss"), Field("eigvals", (k,), dims=("k",)),
            Field("kernel", (4, 4), "float32", dims=("probe_i", "probe_j"))]


def _write(path, rows=3, owner="m", **kwargs):
    store = RunStore.acquire(path, owner=owner, **kwargs)
    table = store.declare_table("ntk", _fields(), coords={"k": np.arange(3)})
    store.start_swmr()
    for i in range(rows):
        table.append(step=10 * i, loss=1.0 / (i + 1), eigvals=np.arange(3) + i, kernel=np.full((4, 4), i))
        store.flush()
    return store, table


def test_roundtrip_attrs_and_views(run_path):
    store, _ = _write(run_path)
    store.release("m")
    with open_run(run_path) as run:
        assert run.format_version == 1
        assert run.tables == ["ntk"]
        assert json.loads(h5py.File(run_path, "r").attrs["versions"])["h5py"] == h5py.__version__
        np.testing.assert_array_equal(run["ntk"]["step"], [0, 10, 20])
        np.testing.assert_array_equal(run["ntk"]["eigvals"][2], [2, 3, 4])
        frame = run.scalars("ntk")
        assert list(frame.index) == [0, 10, 20] and list(frame.columns) == ["loss"]
        np.testing.assert_allclose(frame["loss"], [1, 0.5, 1 / 3])
        ds = run.to_xarray("ntk")
        assert ds["kernel"].dims == ("step", "probe_i", "probe_j")
        assert list(ds["k"].values) == [0, 1, 2]


def test_xarray_opens_group_directly(run_path):
    xr = pytest.importorskip("xarray")
    store, _ = _write(run_path)
    store.release("m")
    with xr.open_dataset(run_path, group="ntk", engine="h5netcdf") as ds:
        assert ds.sizes["step"] == 3
        np.testing.assert_array_equal(ds["step"].values, [0, 10, 20])
        np.testing.assert_array_equal(ds["kernel"].values[1], np.full((4, 4), 1.0))


def test_every_axis_has_a_dimension_scale(run_path):
    store, _ = _write(run_path)
    store.release("m")
    with h5py.File(run_path, "r") as f:
        for name, ds in f["ntk"].items():
            for axis in range(ds.ndim):
                assert len(ds.dims[axis]) == 1 or ds.attrs.get("CLASS") == b"DIMENSION_SCALE", (name, axis)


def test_chunk_shapes_are_chosen():
    assert chunk_shape((), 8) == (8192,)
    assert chunk_shape((10,), 8) == (819, 10)
    big = chunk_shape((1024, 1024), 4)  # a 4 MiB row is split
    assert big[0] == 1 and 4 * np.prod(big[1:]) <= CHUNK_MAX_BYTES
    assert chunk_shape((300_000,), 8)[0] == 1


def test_chunks_gzip_shuffle_in_file(run_path):
    store, _ = _write(run_path)
    store.release("m")
    with h5py.File(run_path, "r") as f:
        ds = f["ntk/kernel"]
        assert ds.compression == "gzip" and ds.shuffle and ds.chunks == chunk_shape((4, 4), 4)
        assert ds.maxshape[0] is None


def test_incomplete_row_is_not_shown(run_path):
    store, table = _write(run_path, rows=2)
    # Simulate a crash between writing the data and the key: resize with the key left at -1.
    grp = store.file["ntk"]
    for name in ("step", "loss", "eigvals", "kernel"):
        grp[name].resize(3, axis=0)
    grp["loss"][2] = 9.0
    store.file.flush()
    assert table.complete_rows() == 2
    store.file.close()
    with open_run(run_path) as run:
        assert len(run["ntk"]) == 2
        assert run["ntk"]["loss"].shape == (2,)


def test_row_validation_names_the_field(run_path):
    store = RunStore.acquire(run_path, owner="m")
    table = store.declare_table("ntk", _fields())
    with pytest.raises(ValueError, match="field 'eigvals'.*shape"):
        table.append(step=0, loss=1.0, eigvals=np.zeros(4), kernel=np.zeros((4, 4)))
    with pytest.raises(KeyError, match="missing field"):
        table.append(step=0, loss=1.0)
    with pytest.raises(KeyError, match="no field"):
        table.append(step=0, loss=1.0, eigvals=np.zeros(3), kernel=np.zeros((4, 4)), extra=1)
    store.release("m")


def test_existing_file_refused_unless_overwrite(run_path):
    store, _ = _write(run_path)
    store.release("m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        RunStore.acquire(run_path, owner="m")
    store = RunStore.acquire(run_path, owner="m", overwrite=True)
    assert "ntk" not in store.file
    store.release("m")


def test_monitors_share_one_store(run_path):
    a = RunStore.acquire(run_path, owner="a")
    b = RunStore.acquire(run_path, owner="b")
    assert a is b
    with pytest.raises(StoreError, match="distinct `name=`"):
        RunStore.acquire(run_path, owner="a")
    a.release("a")
    assert not a.closed
    b.release("b")
    assert a.closed and not RunStore.is_open(run_path)


def test_resume_truncates_rows_after_checkpoint(run_path):
    store, _ = _write(run_path, rows=5)
    store.release("m")
    store = RunStore.acquire(run_path, owner="m", resume=True)
    table = store.declare_table("ntk", _fields(), coords={"k": np.arange(3)}, rows=3)
    assert table.n_committed == 3
    store.start_swmr()
    table.append(step=25, loss=0.0, eigvals=np.zeros(3), kernel=np.zeros((4, 4)))
    store.release("m")
    with open_run(run_path) as run:
        np.testing.assert_array_equal(run["ntk"]["step"], [0, 10, 20, 25])
        assert [h["event"] for h in run.history] == ["created", "resumed"]


def test_resume_with_different_schema_is_refused(run_path):
    store, _ = _write(run_path)
    store.release("m")
    store = RunStore.acquire(run_path, owner="m", resume=True)
    with pytest.raises(SchemaError, match="different fields"):
        store.declare_table("ntk", _fields(k=5))
    store.release("m")


def test_no_new_objects_after_swmr(run_path):
    store, _ = _write(run_path)
    with pytest.raises(StoreError, match="SWMR"):
        store.declare_table("other", [Field("step", (), "int64")])
    with pytest.raises(StoreError, match="SWMR"):
        store.set_config("m", {})
    store.release("m")


def test_static_arrays_fixed_for_the_run(run_path):
    store = RunStore.acquire(run_path, owner="m")
    store.write_static("probe/train", "index", np.array([3, 5, 7]), ("probe_example",),
                       coords={"probe_example": np.array([3, 5, 7])})
    store.release("m")
    store = RunStore.acquire(run_path, owner="m", resume=True)
    store.write_static("probe/train", "index", np.array([3, 5, 7]), ("probe_example",))  # same: accepted
    with pytest.raises(SchemaError, match="probe set is fixed"):
        store.write_static("probe/train", "index", np.array([3, 5, 8]), ("probe_example",))
    store.release("m")
    with open_run(run_path) as run:
        np.testing.assert_array_equal(run.probe("train")["index"], [3, 5, 7])


def test_reader_rejects_foreign_and_newer_files(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(RunFormatError, match="not a lightning_ntk run file"):
        open_run(plain)
    newer = tmp_path / "newer.h5"
    with h5py.File(newer, "w") as f:
        f.attrs["format"] = "lightning_ntk"
        f.attrs["format_version"] = 99
    with pytest.raises(RunFormatError, match="upgrade lightning_ntk"):
        open_run(newer)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(RunFormatError, match="not an HDF5 file"):
        open_run(text)
    with pytest.raises(FileNotFoundError):
        open_run(tmp_path / "missing.h5")
    with pytest.raises(StoreError, match="not a lightning_ntk run file"):
        RunStore.acquire(plain, owner="m", resume=True)


def test_unwritable_paths_are_refused(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create the directory"):
        RunStore.check_path(str(blocker / "run.h5"), overwrite=False, resume=False)
    with pytest.raises(StoreError, match="is a directory"):
        RunStore.check_path(str(tmp_path), overwrite=False, resume=False)


_CRASHING_WRITER = textwrap.dedent("""
    import os, sys, numpy as np
    from lightning_ntk.store import RunStore, Field
    store = RunStore.acquire(sys.argv[1], owner="m")
    table = store.declare_table("ntk", [Field("step", (), "int64"), Field("loss")])
    store.start_swmr()
    for i in range(5):
        table.append(step=i, loss=float(i))
        store.flush()
    os.kill(os.getpid(), 9)
""")


@pytest.mark.slow  # a writer subprocess killed with SIGKILL
def test_file_of_a_killed_writer_opens_and_resumes(run_path):
    proc = subprocess.run([sys.executable, "-c", _CRASHING_WRITER, run_path], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    with pytest.raises(OSError):  # plain HDF5 refuses it: marked open by a dead writer
        h5py.File(run_path, "r").close()
    with open_run(run_path) as run:  # our reader falls back to SWMR read
        np.testing.assert_array_equal(run["ntk"]["loss"], np.arange(5.0))
    store = RunStore.acquire(run_path, owner="m", resume=True)  # rebuilt, then appended to
    table = store.declare_table("ntk", [Field("step", (), "int64"), Field("loss")], rows=4)
    store.start_swmr()
    table.append(step=4, loss=40.0)
    store.release("m")
    with h5py.File(run_path, "r") as f:
        np.testing.assert_array_equal(f["ntk/loss"][()], [0, 1, 2, 3, 40])
    xr = pytest.importorskip("xarray")
    with xr.open_dataset(run_path, group="ntk", engine="h5netcdf") as ds:
        np.testing.assert_array_equal(ds["step"].values, np.arange(5))


def test_extend_appends_blocks_of_rows(run_path):
    store = RunStore.acquire(run_path, owner="m")
    table = store.declare_table("events", [Field("step", (), "int64"), Field("index", (), "int64"),
                                           Field("correct", (), "bool")], row_dim="event")
    store.start_swmr()
    table.extend({"step": [0, 0, 0], "index": [5, 1, 2], "correct": [True, False, True]})
    table.append(step=1, index=7, correct=False)
    table.extend({"step": [2, 2], "index": [3, 4], "correct": [False, False]})
    assert table.n_rows == 6 and table.n_committed == 0
    store.flush()
    with pytest.raises(ValueError, match="same number of rows"):
        table.extend({"step": [3], "index": [1, 2], "correct": [True]})
    store.release("m")
    with open_run(run_path) as run:
        view = run["events"]
        assert view.row_dim == "event" and len(view) == 6
        np.testing.assert_array_equal(view["index"], [5, 1, 2, 7, 3, 4])
        np.testing.assert_array_equal(view["step"], [0, 0, 0, 1, 2, 2])
    xr = pytest.importorskip("xarray")
    with xr.open_dataset(run_path, group="events", engine="h5netcdf") as ds:
        assert ds["index"].dims == ("event",)


def test_fixed_table_rewrites_and_detects_interrupted_rewrite(run_path):
    store = RunStore.acquire(run_path, owner="m")
    fields = [Field("count", (), "int64"), Field("confidence", (), "float32")]
    table = store.declare_fixed_table("forgetting/examples", fields, 4, row_dim="example",
                                      coords={"example": np.array([10, 11, 12, 13])})
    store.start_swmr()
    table.write({"count": [0, 1, 2, 3], "confidence": [0.5] * 4}, step=10)
    store.flush()
    table.write({"count": [4, 4, 4, 4], "confidence": [0.25] * 4}, step=20)
    store.flush()
    assert table.written_step == 20
    with pytest.raises(ValueError, match="expected shape"):
        table.write({"count": [1], "confidence": [1.0]}, step=30)
    # A rewrite interrupted after the marker was cleared reads as empty, not as mixed data.
    store.file["forgetting/examples/written_step"][0] = -1
    store.release("m")
    with open_run(run_path) as run:
        assert "forgetting/examples" in run.tables
        view = run["forgetting/examples"]
        assert view.is_fixed and view.written_step is None and len(view) == 0
    with h5py.File(run_path, "r+") as f:
        f["forgetting/examples/written_step"][0] = 20
    with open_run(run_path) as run:
        view = run["forgetting/examples"]
        assert view.written_step == 20 and len(view) == 4
        np.testing.assert_array_equal(view["count"], [4, 4, 4, 4])
        ds = run.to_xarray("forgetting/examples")
        np.testing.assert_array_equal(ds["example"].values, [10, 11, 12, 13])


# --------------------------------------------------------------------------------------
# The writer thread (flush_async)
# --------------------------------------------------------------------------------------
def _row(i):
    return dict(step=i, loss=float(i), eigvals=np.arange(3) + i, kernel=np.full((4, 4), i))


def test_writer_thread_writes_every_row_appended_meanwhile(run_path):
    """Rows appended while the writer thread writes are neither lost nor reordered."""
    store = RunStore.acquire(run_path, owner="m")
    table = store.declare_table("ntk", _fields(), coords={"k": np.arange(3)})
    store.start_swmr()
    for i in range(400):
        table.append(_row(i))
        if i % 3 == 0:
            store.flush_async()
    writer = store._background
    assert writer is not None and writer.thread.is_alive() and writer.thread is not threading.current_thread()
    store.flush()  # waits for the writer, then writes the rest
    assert table.n_committed == 400
    store.release("m")
    assert not writer.thread.is_alive()  # joined on close
    with open_run(run_path) as run:
        np.testing.assert_array_equal(run["ntk"]["step"], np.arange(400))
        np.testing.assert_array_equal(run["ntk"]["kernel"][:, 0, 0], np.arange(400))


def test_writer_thread_error_surfaces_in_the_calling_thread(run_path, monkeypatch):
    store = RunStore.acquire(run_path, owner="m")
    table = store.declare_table("ntk", _fields(), coords={"k": np.arange(3)})
    store.start_swmr()
    table.append(_row(0))
    store.flush_async()
    store.flush()
    failing = {"thread": None}

    def disk_full(*args, **kwargs):
        import errno

        failing["thread"] = threading.current_thread()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(store.file), "flush", disk_full)
    table.append(_row(1))
    store.flush_async()  # returns at once; the writer thread fails
    store._background.wait_idle()
    assert failing["thread"] is store._background.thread
    with pytest.raises(StoreError, match=r"writing run file .*run\.h5 failed: No space left on device \(ENOSPC\)"):
        store.flush_async()  # the next hand-over raises the writer thread's error here
    monkeypatch.undo()
    table.append(_row(2))
    store.flush()  # the disk has room again: writing goes on
    store.release("m")
    with open_run(run_path) as run:
        assert 0 in run["ntk"]["step"] and 2 in run["ntk"]["step"]


def test_writer_thread_memory_is_bounded(run_path, monkeypatch):
    """Past MAX_BUFFERED_BYTES of waiting rows, flush_async waits for the writer thread."""
    store = RunStore.acquire(run_path, owner="m")
    table = store.declare_table("ntk", _fields(), coords={"k": np.arange(3)})
    store.start_swmr()
    monkeypatch.setattr(RunStore, "MAX_BUFFERED_BYTES", 1)
    table.append(_row(0))
    store.flush_async()
    waits = []
    original = type(store._background).wait_idle
    monkeypatch.setattr(type(store._background), "wait_idle", lambda self: (waits.append(1), original(self)))
    table.append(_row(1))
    store.flush_async()
    assert waits  # more than MAX_BUFFERED_BYTES were waiting: it waited
    store.release("m")
    with open_run(run_path) as run:
        np.testing.assert_array_equal(run["ntk"]["step"], [0, 1])


def test_abandon_leaves_the_file_as_it_was(run_path):
    store, _ = _write(run_path)
    store.release("m")
    with open(run_path, "rb") as handle:
        before = handle.read()
    store = RunStore.acquire(run_path, owner="rewrite", resume=True)
    store.declare_table("extra", [Field("step", (), "int64"), Field("value")])
    store.file.attrs["note"] = "half-way"
    store.abandon()
    with open(run_path, "rb") as handle:
        assert handle.read() == before  # byte for byte
    assert not os.path.exists(run_path + ".writing") and not os.path.exists(run_path + ".lock")
    assert not RunStore.is_open(run_path) and store.closed
    again = RunStore.acquire(run_path, owner="rewrite", resume=True)  # free to be opened again
    assert "extra" not in again.file
    again.release("rewrite")


def test_abandon_is_refused_once_the_file_is_in_place(run_path):
    store, _ = _write(run_path)  # in SWMR: the new file already replaced the path
    with pytest.raises(StoreError, match="cannot be abandoned"):
        store.abandon()
    store.release("m")
