"""Store reliability: `check`, property-based append/flush/truncate/reopen, full disks."""
import errno
import os
import subprocess
import uuid

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_ntk.cli import main
from lightning_ntk.store import Field, RunStore, StoreError, check_run, open_run

FIELDS = [Field("step", (), "int64"), Field("loss"), Field("vec", (3,), "float32", dims=("k",))]


def _good_file(path, rows=4):
    store = RunStore.acquire(path, owner="m")
    table = store.declare_table("t", FIELDS)
    store.start_swmr()
    for i in range(rows):
        table.append(step=2 * i, loss=float(i), vec=np.full(3, i))
    store.release("m")


def test_check_passes_on_a_good_file(run_path, capsys):
    _good_file(run_path)
    report = check_run(run_path)
    assert report.ok, str(report)
    assert "/t: 4 complete rows (step 0..6)" in str(report)
    assert main(["check", run_path]) == 0
    assert capsys.readouterr().out.startswith("OK")


def test_check_finds_each_problem(run_path, tmp_path):
    _good_file(run_path)
    with h5py.File(run_path, "r+") as f:
        f["t/step"][2] = 1  # 0, 2, 1, 6: not increasing
    report = check_run(run_path)
    assert not report.ok and any("not strictly increasing at row 2" in e for e in report.errors)

    _good_file(path := str(tmp_path / "b.h5"))
    with h5py.File(path, "r+") as f:
        f["t/step"][1] = -1  # a complete row (2, 3) after an incomplete one
    report = check_run(path)
    assert any("a complete row follows an incomplete one" in e for e in report.errors)

    _good_file(path := str(tmp_path / "c.h5"))
    with h5py.File(path, "r+") as f:
        f["t/vec"].dims[1].detach_scale(f["t/k"])
    report = check_run(path)
    assert any("/t/vec: axis 1 has no dimension scale" in e for e in report.errors)

    _good_file(path := str(tmp_path / "d.h5"))
    with h5py.File(path, "r+") as f:
        for name in ("step", "loss", "vec"):
            f["t"][name].resize(5, axis=0)  # an interrupted append: key still -1
    report = check_run(path)
    assert report.ok and any("1 incomplete trailing row" in w for w in report.warnings)

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    assert not check_run(foreign).ok
    assert main(["check", str(foreign)]) == 1


# ----------------------------------------------------------------------------- property
operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 4)),
        st.tuples(st.just("flush"), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0)),
        st.tuples(st.just("truncate"), st.integers(0, 10)),
    ),
    min_size=1, max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations, seed=st.integers(0, 2**16))
def test_random_appends_flushes_truncations_reopens_read_back_exactly(tmp_path, ops, seed):
    path = str(tmp_path / f"{uuid.uuid4().hex}.h5")
    rng = np.random.default_rng(seed)
    written = []  # the rows the file must hold once everything is flushed
    step = 0
    store = RunStore.acquire(path, owner="m")
    table = store.declare_table("t", FIELDS)
    for op, arg in ops:
        if op == "append":
            for _ in range(arg):
                row = {"step": step, "loss": float(rng.normal()), "vec": rng.normal(size=3).astype(np.float32)}
                table.append(row)
                written.append(row)
                step += 1 + int(rng.integers(0, 3))
        elif op == "flush":
            store.flush()
            assert table.n_committed == len(written)
        elif op == "reopen":
            store.release("m")
            store = RunStore.acquire(path, owner="m", resume=True)
            table = store.declare_table("t", FIELDS, rows=len(written))
        elif op == "truncate":
            keep = min(arg, len(written))
            store.release("m")
            store = RunStore.acquire(path, owner="m", resume=True)
            table = store.declare_table("t", FIELDS, rows=keep)
            written = written[:keep]
            step = written[-1]["step"] + 1 if written else 0
    store.release("m")
    with open_run(path) as run:
        view = run["t"]
        assert len(view) == len(written)
        if written:
            np.testing.assert_array_equal(view["step"], [r["step"] for r in written])
            np.testing.assert_array_equal(view["loss"], [r["loss"] for r in written])
            np.testing.assert_array_equal(view["vec"], np.stack([r["vec"] for r in written]))
    assert check_run(path).ok


# ----------------------------------------------------------------------------- full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, or None where mounting is not allowed."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                            capture_output=True)
    if result.returncode != 0:
        yield None
        return
    try:
        yield str(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _fill(directory):
    """Fill the filesystem of ``directory`` completely."""
    try:
        with open(os.path.join(directory, "ballast"), "wb") as handle:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC


def test_full_disk_write_error_names_path_and_cause_and_keeps_file_readable(small_disk, tmp_path, monkeypatch):
    directory = small_disk or str(tmp_path)
    path = os.path.join(directory, "run.h5")
    store = RunStore.acquire(path, owner="m")
    table = store.declare_table("t", [Field("step", (), "int64"), Field("blob", (4096,), "float64")])
    store.start_swmr()
    rng = np.random.default_rng(0)
    for i in range(3):
        table.append(step=i, blob=rng.normal(size=4096))
        store.flush()
    if small_disk:
        _fill(directory)
    else:  # mounting impossible here: inject the error the OS would raise
        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(h5py.File, "flush", no_space)
    with pytest.raises(StoreError) as info:
        for i in range(3, 400):  # incompressible rows: the disk fills within a few
            table.append(step=i, blob=rng.normal(size=4096))
            store.flush()
    assert path in str(info.value) and ("No space left" in str(info.value) or "ENOSPC" in str(info.value)
                                        or "write" in str(info.value))
    monkeypatch.undo()
    if small_disk:
        os.remove(os.path.join(directory, "ballast"))
    store.release("m")
    with open_run(path) as run:  # readable, and the snapshots flushed before the error are intact
        steps = run["t"]["step"]
        assert len(steps) >= 3 and list(steps[:3]) == [0, 1, 2]
