"""Rotating the logs that circusd and NGiNX write themselves, from a Circus plugin.

NGiNX's access log (and the startup error log given with ``-e``) is written by NGiNX's own
processes, and ``circusd.log`` by circusd's logging handler, so neither can rotate as it
writes, as the watchers' logs do (:mod:`stackctl.logfile`). Once a second this plugin looks
at their sizes; a file past ``logs.max_mb`` is renamed (``.1``, ``.2``...), which loses
nothing: whoever has it open goes on writing into it under its new name. Then:

- NGiNX is sent SIGUSR1, its signal to reopen its log files: the master opens a new file at
  the path, gives it to the user its workers run as, and tells the workers to reopen it too.
  Nothing is restarted, no connection is touched. The pid is circusd's (the nginx watcher's
  process), never read from a pid file that another user might write.
- circusd's handler (Python's ``WatchedFileHandler``, which Circus uses for ``logoutput``)
  sees that the path is a new file at its next line and reopens it by itself.

A file is rotated again only once no NGiNX process still holds the one renamed before (a
worker busy with a long request reopens late): else a quick second rotation could delete,
with ``logs.keep = 1``, a file still being written, and its last lines with it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from circus.plugins import CircusPlugin
from circus.util import AsyncPeriodicCallback

from stackctl.logfile import Limits, shift

log = logging.getLogger("stackctl.logrotate")
PR_SET_PDEATHSIG = 1
RESIGNAL_SECONDS = 10.0
"""NGiNX has not let go of a renamed log this long after SIGUSR1: it is sent again (a master
that was starting up, or reloading, may have missed it)."""
HELD_LIMIT = 120.0
"""After this long, a renamed log still open in NGiNX no longer holds back the next rotation
(a worker stuck for minutes must not let the log grow without end)."""

FileId = tuple[int, int]


def file_id(path: Path) -> FileId | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def size_of(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except OSError:
        return 0


def open_files(pids: Iterable[int]) -> set[FileId]:
    """Every file the processes have open (those of another user only when we are root)."""
    found: set[FileId] = set()
    for pid in pids:
        try:
            entries = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat()  # follows /proc's link to the open file itself
            except OSError:
                continue
            found.add((st.st_dev, st.st_ino))
    return found


def process_tree(pid: int) -> list[int]:
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children())]
    except psutil.Error:
        return []


@dataclass
class Rotator:
    """Decides and does the renames; what it needs of the world is passed in, for tests."""

    limits: Limits
    reopened_by_itself: list[Path]
    reopened_on_signal: list[Path]
    master: Callable[[], int | None]
    send: Callable[[int, int], None] = os.kill
    clock: Callable[[], float] = time.monotonic
    held: dict[Path, FileId] = field(default_factory=dict)
    signalled_at: float = 0.0
    rotated_at: float = 0.0

    def due(self, path: Path) -> bool:
        return self.limits.max_bytes > 0 and size_of(path) >= self.limits.max_bytes

    def check(self) -> None:
        self.limits.refresh(self.clock())
        for path in self.reopened_by_itself:
            if self.due(path):
                shift(path, self.limits.keep)
        self.check_nginx()

    def check_nginx(self) -> None:
        due = [path for path in self.reopened_on_signal if self.due(path)]
        if not due and not self.held:
            return  # the common case: no need to ask circusd anything
        master = self.master()
        if self.held and not self.released(master):
            waited = self.clock() - self.rotated_at
            if waited < HELD_LIMIT:
                if master is not None and self.clock() - self.signalled_at > RESIGNAL_SECONDS:
                    self.reopen(master)
                return
            log.warning("NGiNX still writes to %s after %d s", ", ".join(map(str, self.held)),
                        waited)  # fmt: skip
            self.held = {}
        if not due:
            return
        self.rotated_at = self.clock()
        for path in due:
            renamed = file_id(path)
            shift(path, self.limits.keep)
            if renamed is not None:
                self.held[path] = renamed
        if master is not None:
            self.reopen(master)

    def released(self, master: int | None) -> bool:
        still_open = open_files(process_tree(master)) if master is not None else set()
        self.held = {p: f for p, f in self.held.items() if f in still_open}
        return not self.held

    def reopen(self, master: int) -> None:
        log.info("NGiNX (pid %d) reopens its logs", master)
        self.signalled_at = self.clock()
        with suppress(ProcessLookupError):  # gone: the next NGiNX opens new files anyway
            self.send(master, signal.SIGUSR1)


class LogRotation(CircusPlugin):
    """The Circus plugin around :class:`Rotator`."""

    name = "stackctl_logrotate"

    def __init__(self, *args: Any, **config: Any) -> None:
        super().__init__(*args, **config)
        self.rotator = Rotator(
            limits=Limits(Path(config["limits"])),
            reopened_by_itself=[Path(config["circusd_log"])],
            reopened_on_signal=[Path(config["nginx_access_log"]), Path(config["nginx_error_log"])],
            master=self.nginx_master,
        )
        self.check_seconds = float(config.get("check_seconds", 1))

    def handle_init(self) -> None:
        # Like every watcher, the plugin must not outlive a killed circusd.
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        self.period = AsyncPeriodicCallback(self.rotator.check, self.check_seconds * 1000)
        self.period.start()

    def handle_stop(self) -> None:
        self.period.stop()

    def handle_recv(self, data: Any) -> None:
        pass  # it acts on its clock, not on Circus's events

    def nginx_master(self) -> int | None:
        answer = self.call("list", name="nginx")
        pids = answer.get("pids") or []
        return int(pids[0]) if answer.get("status") == "ok" and pids else None
