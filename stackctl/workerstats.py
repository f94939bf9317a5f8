"""Requests and busy time of each uWSGI worker, for the Prometheus exporter.

uWSGI's stats server runs in its master, and the pool has none (Circus supervises each
worker). So each worker keeps its two numbers in a small file of its own, ``<pid>``, in
:attr:`Stack.wsgi_stats_dir`, mapped in memory: a request costs a clock read and a 16-byte
write, no system call. The exporter reads the files of the workers still alive and removes
those of the dead.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stackctl.graceful import Response

STATS_DIR_VARIABLE = "STACKCTL_WSGI_STATS_DIR"
RECORD = struct.Struct("<QQ")  # requests, busy nanoseconds
PID_DIGITS = 10  # Linux pids stay below 2**22 (pid_max); more digits are no pid
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class WorkerStats:
    """This worker's file, mapped; its numbers only grow while the worker lives."""

    def __init__(self, directory: Path, pid: int) -> None:
        try:
            self.map: mmap.mmap | None = mapped(directory, pid)
        except OSError as e:
            # The site comes before its metrics: this worker serves, uncounted (the exporter
            # shows fewer workers than Circus runs), and says why in its log.
            print(f"stackctl: this worker's requests are not counted for the metrics: "
                  f"{directory}: {e.strerror}", file=sys.stderr, flush=True)  # fmt: skip
            self.map = None
        self.requests = 0
        self.busy_ns = 0
        self.lock = threading.Lock()  # wsgi.threads > 1: requests end on several threads

    def record(self, started_ns: int) -> None:
        elapsed = time.monotonic_ns() - started_ns
        with self.lock:
            self.requests += 1
            self.busy_ns += elapsed
            if self.map is not None:
                RECORD.pack_into(self.map, 0, self.requests, self.busy_ns)


def mapped(directory: Path, pid: int) -> mmap.mmap:
    directory.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(directory / str(pid), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, RECORD.size)
        return mmap.mmap(fd, RECORD.size)
    finally:
        os.close(fd)


def measured(app: Any, stats: WorkerStats) -> Any:
    """``app``, counting each request and the time until its response is closed."""

    def application(environ: dict[str, Any], start_response: Any) -> Response:
        started = time.monotonic_ns()
        try:
            body = app(environ, start_response)
        except BaseException:
            stats.record(started)
            raise
        return Response(body, lambda: stats.record(started))

    return application


@dataclass(frozen=True)
class WorkerSample:
    pid: int
    requests: int
    busy_seconds: float


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False  # exited, or a number past any pid
    except PermissionError:
        return True  # another user's: alive
    return True


def read_all(directory: Path) -> list[WorkerSample]:
    """The numbers of every worker alive, by pid; files of exited workers are removed.

    The service user writes here and the exporter may be root: the directory is opened
    without following a link (or root would remove pid-named files wherever it points), and
    each file too, without waiting (a pipe) and only when it is a regular file of the
    directory's owner (not a hard link to someone else's) and of a record's size."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []  # not there (yet), or a link
    try:
        owner = os.fstat(fd).st_uid
        samples = []
        for name in sorted(os.listdir(fd)):
            pid = pid_of(name)
            if pid is None:
                continue
            if not alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)
                continue
            record = read_record(fd, name, owner)
            if record is not None:
                samples.append(WorkerSample(pid, record[0], record[1] / 1e9))
        return samples
    finally:
        os.close(fd)


def pid_of(name: str) -> int | None:
    """The pid a file is named after; None for a name that only looks like one ("²")."""
    if not (name.isascii() and name.isdigit()) or len(name) > PID_DIGITS:
        return None
    return int(name)


def read_record(directory: int, name: str, owner: int) -> tuple[int, int] | None:
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=directory)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_size != RECORD.size:
            return None  # just created and not sized yet, or not a worker's file
        data = os.pread(fd, RECORD.size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) != RECORD.size:
        return None
    requests, busy_ns = RECORD.unpack(data)
    return requests, busy_ns
