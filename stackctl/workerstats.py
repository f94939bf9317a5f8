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
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stackctl.graceful import Response

STATS_DIR_VARIABLE = "STACKCTL_WSGI_STATS_DIR"
RECORD = struct.Struct("<QQ")  # requests, busy nanoseconds


class WorkerStats:
    """This worker's file, mapped; its numbers only grow while the worker lives."""

    def __init__(self, directory: Path, pid: int) -> None:
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / str(pid)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, RECORD.size)
            self.map = mmap.mmap(fd, RECORD.size)
        finally:
            os.close(fd)
        self.requests = 0
        self.busy_ns = 0
        self.lock = threading.Lock()  # wsgi.threads > 1: requests end on several threads

    def record(self, started_ns: int) -> None:
        elapsed = time.monotonic_ns() - started_ns
        with self.lock:
            self.requests += 1
            self.busy_ns += elapsed
            RECORD.pack_into(self.map, 0, self.requests, self.busy_ns)


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
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's: alive
    return True


def read_all(directory: Path) -> list[WorkerSample]:
    """The numbers of every worker alive, by pid; files of exited workers are removed."""
    samples = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        path = directory / name
        if not alive(int(name)):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if len(data) != RECORD.size:
            continue  # just created, not sized yet
        requests, busy_ns = RECORD.unpack(data)
        samples.append(WorkerSample(int(name), requests, busy_ns / 1e9))
    return samples
