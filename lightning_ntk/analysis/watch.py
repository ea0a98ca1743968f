"""Follow a run file while it is being written (HDF5 SWMR) and print new rows as they arrive.

``lightning-ntk watch RUN.h5`` polls the file every ``interval`` seconds. For each
time-series table it prints the scalars of each new row (at most ``max_rows`` per table and
poll; the rest are counted); for a table of events (row axis other than ``step``) one
line per poll with the number of new rows and the mean of their scalars; for a
per-example table each rewrite. It stops when training ends: the writer's side-car lock
``<file>.lock`` disappears (the writer closed the file), or the process named in it is gone
(it crashed), or, with ``timeout``, no new row arrived for that many seconds. Ctrl-C stops it
too (exit status 0).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..store import Run, RunFormatError, open_run

#: How long a file that is not (yet) a run file is retried: a writer creating it needs a moment.
_FORMAT_GRACE_S = 2.0


def _writer_state(path: str) -> Tuple[str, Optional[int]]:
    """("open", pid) while the lock file names a live writer (or one on another host),
    ("crashed", pid) if it names a dead process of this host, ("closed", None) without a lock."""
    lock = path + ".lock"
    try:
        with open(lock) as handle:
            info = json.load(handle)
    except FileNotFoundError:
        return "closed", None
    except (OSError, ValueError):
        return "open", None  # being written right now, or unreadable: assume a writer
    pid = int(info.get("pid", -1)) if str(info.get("pid", "")).lstrip("-").isdigit() else -1
    if info.get("host") != socket.gethostname() or pid <= 0:
        return "open", pid if pid > 0 else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "crashed", pid
    except PermissionError:
        pass
    return "open", pid


def _fmt(value: Any) -> str:
    value = np.asarray(value)
    if value.dtype.kind == "b":
        return str(bool(value))
    if value.dtype.kind in "iu":
        return str(int(value))
    v = float(value)
    if v != v:
        return "nan"
    if abs(v) >= 1e5 or (0 < abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}"


class _Follower:
    """Prints what changed in a run since the last call of :meth:`poll`."""

    def __init__(self, run: Run, out: IO[str], max_rows: int):
        self.run = run
        self.out = out
        self.max_rows = max_rows
        self.seen: Dict[str, int] = {}
        self.written: Dict[str, Optional[int]] = {}
        self.last_step: Dict[str, int] = {}

    def _scalar_fields(self, view: Any) -> List[str]:
        return [f for f in view.fields if f != view.key and f not in ("wall_time",) and view.group[f].ndim == 1]

    def poll(self) -> int:
        """Print new rows of every table; returns how many new rows (or rewrites) were seen."""
        new_total = 0
        for name in self.run.tables:
            view = self.run[name]
            try:
                n = len(view)
            except (KeyError, OSError):
                continue
            if view.is_fixed:
                step = view.written_step
                if step is not None and step != self.written.get(name):
                    self.written[name] = step
                    new_total += 1
                    parts = [f"{f} {_fmt(np.nanmean(view[f].astype(np.float64)))}" for f in self._scalar_fields(view)
                             if view.group[f].dtype.kind in "biuf" and f not in ("index",) and f != view.row_dim]
                    self._print(f"[{name}] rewritten at step {step}: {n} rows; means: " + ", ".join(parts))
                continue
            old = self.seen.get(name, 0)
            if n <= old:
                continue
            self.seen[name] = n
            new_total += n - old
            fields = self._scalar_fields(view)
            if view.row_dim != view.key:  # events: summarise the new rows
                keys = view.group[view.key][old:n]
                parts = [f"{view.key} {int(keys.min())}..{int(keys.max())}"]
                for f in fields:
                    block = view.group[f][old:n]
                    if block.dtype.kind in "biuf" and f not in ("index",):
                        parts.append(f"mean {f} {_fmt(np.nanmean(block.astype(np.float64)))}")
                self._print(f"[{name}] +{n - old} rows ({n} in all): " + ", ".join(parts))
                continue
            start = max(old, n - self.max_rows)
            if start > old:
                self._print(f"[{name}] ... {start - old} rows not shown")
            keys = view.group[view.key][start:n]
            columns = {f: view.group[f][start:n] for f in fields}
            for i in range(n - start):
                parts = [f"{view.key} {int(keys[i])}"] + [f"{f} {_fmt(columns[f][i])}" for f in fields]
                self._print(f"[{name}] " + "  ".join(parts))
            self.last_step[name] = int(keys[-1])
        return new_total

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()


def _open(path: str) -> Optional[Run]:
    """The run opened for live reading, or None while it cannot be opened yet."""
    if not os.path.exists(path):
        return None
    try:
        return open_run(path, live=True)
    except RunFormatError:
        raise
    except (OSError, KeyError):
        # A writer that has not switched to SWMR yet (its schema phase): try again later. A
        # finished file that SWMR cannot open (older HDF5 format): read it as it is.
        if _writer_state(path)[0] == "open":
            return None
        try:
            return open_run(path)
        except OSError:
            return None


def watch(path: "os.PathLike[str] | str", *, interval: float = 1.0, timeout: Optional[float] = None,
          max_rows: int = 10, out: Optional[IO[str]] = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Follow the run file ``path``, printing new rows to ``out`` (stdout); returns an exit status.

    Args:
        interval: seconds between polls (> 0).
        timeout: stop after this many seconds without a new row (also while waiting for
            the file to appear); None: follow until the writer closes the file.
        max_rows: most rows printed per table and poll (older ones are counted, not shown).

    Returns 0 when training ended (or on Ctrl-C), 1 when the timeout passed without new
    rows or the writer died, 2 when the file is not a run file.
    """
    if not interval > 0:
        raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows!r}")
    path = os.fspath(path)
    out = out or sys.stdout
    run: Optional[Run] = None
    # Ctrl-C sets a flag checked between polls, instead of a KeyboardInterrupt that may land
    # inside HDF5 or a weakref callback (where Python only prints "Exception ignored").
    stop = threading.Event()
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    if sleep is time.sleep:
        sleep = stop.wait

    def stopped() -> int:
        out.write("\nstopped watching (Ctrl-C)\n")
        out.flush()
        return 0

    try:
        last_news = time.monotonic()
        announced = False
        bad_format_since: Optional[float] = None
        while True:
            try:
                run = _open(path)
            except RunFormatError as exc:
                # A file being created is briefly not yet a run file: give its writer a moment.
                now = time.monotonic()
                bad_format_since = bad_format_since or now
                if _writer_state(path)[0] != "open" and now - bad_format_since >= _FORMAT_GRACE_S:
                    print(f"lightning-ntk watch: {exc}", file=sys.stderr)
                    return 2
            if run is not None:
                break
            if stop.is_set():
                return stopped()
            if not announced:
                out.write(f"waiting for {path} to become readable (Ctrl-C to stop)\n")
                out.flush()
                announced = True
            if timeout is not None and time.monotonic() - last_news > timeout:
                out.write(f"no readable run file at {path} after {timeout:g}s; giving up\n")
                return 1
            sleep(min(interval, 0.2) if bad_format_since else interval)
        follower = _Follower(run, out, max_rows)
        out.write(f"watching {path} (tables: {', '.join(run.tables) or 'none yet'})\n")
        out.flush()
        while True:
            if stop.is_set():
                return stopped()
            state, pid = _writer_state(path)  # read before the rows, so no row after it is missed
            run.refresh()
            if follower.poll():
                last_news = time.monotonic()
            if state == "closed":
                out.write("training finished: the writer closed the run file\n")
                return 0
            if state == "crashed":
                out.write(f"the writing process {pid} is gone without closing the run file (crashed?); stopping\n")
                return 1
            if timeout is not None and time.monotonic() - last_news > timeout:
                out.write(f"no new rows for {timeout:g}s; stopping (the writer may still be running)\n")
                return 1
            sleep(interval)
    except KeyboardInterrupt:
        return stopped()
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if run is not None:
            run.close()
