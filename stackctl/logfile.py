"""A log file that stays bounded: rotated by size, at a line end, never through a link.

Every log of a stack is rotated the same way: ``name.log`` is renamed ``name.log.1`` (the
older ones move up to ``.2``, ``.3``... and the one past ``logs.keep`` is deleted), and writing
goes on in a new ``name.log``. :class:`LogFile` does it for the output of the watchers, which
circusd writes (:mod:`stackctl.logstream`); :mod:`stackctl.logrotate` does it for the logs
that NGiNX and circusd write themselves.

Circus's own ``FileStream`` rotates too, but it is no use here: it reads a pipe 1024 bytes at a
time and rotates between any two reads, so a line is cut in two across files; and the stdout
and the stderr of a watcher, writing to the same log, are two streams that each rotate the
file under the other, which then writes into a renamed file and, a rotation later, into a
deleted one: lines are lost.
"""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("stackctl.logfile")
MIB = 2**20
OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
MODE = 0o640
PARTIAL_LIMIT = 64 * 1024
"""A process's line longer than this is written as it is, not held back for its end."""
PARTIAL_SECONDS = 2.0
"""A line begun but not ended this long ago is written out as it is, newline added."""


def rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def shift(path: Path, keep: int) -> None:
    """Rename ``path`` to ``path.1``, ``path.1`` to ``path.2``... deleting the one past ``keep``.

    Each step is a rename (a link is renamed, never followed), so a process that still has
    one of these files open goes on writing into it under its new name.
    """
    extra = keep + 1
    while rotated(path, extra).exists() or rotated(path, extra).is_symlink():
        rotated(path, extra).unlink()  # left by a larger logs.keep
        extra += 1
    for n in range(keep - 1, 0, -1):
        if os.path.lexists(rotated(path, n)):
            os.replace(rotated(path, n), rotated(path, n + 1))
    if os.path.lexists(path):
        os.replace(path, rotated(path, 1))


def backups(path: Path) -> list[Path]:
    """The rotated files of ``path`` that exist, newest first."""
    found = []
    n = 1
    while rotated(path, n).exists():
        found.append(rotated(path, n))
        n += 1
    return found


def open_append(path: Path) -> int:
    """Open for appending, never through a symbolic link: if a process that may write in the
    log directory planted ``name.log -> /etc/shadow``, root's circusd gets ELOOP instead."""
    return os.open(path, OPEN_FLAGS, MODE)


def no_follow(path: str | os.PathLike[str], flags: int) -> int:
    """An ``opener`` for :func:`open` that refuses a symbolic link, as :func:`open_append`."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, MODE)


class NoFollowWatchedFileHandler(logging.handlers.WatchedFileHandler):
    """circusd's own log: reopened at its next line once the rotation has renamed it (what
    Circus's ``WatchedFileHandler`` does), but never opened through a symbolic link."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.reopenIfNeeded()
        except OSError:  # a link planted at the path: the line is lost, circusd is not
            self.handleError(record)
            return
        logging.FileHandler.emit(self, record)

    def _open(self) -> io.TextIOWrapper:
        return open(self.baseFilename, "a", encoding=self.encoding, errors=self.errors,
                    opener=no_follow)  # fmt: skip


def no_follow_handlers(target: logging.Logger) -> None:
    """Replace the logger's file handlers (Circus's, for ``logoutput``) by :class:`NoFollow...`."""
    for n, handler in enumerate(target.handlers):
        if isinstance(handler, logging.handlers.WatchedFileHandler) and not isinstance(
            handler, NoFollowWatchedFileHandler
        ):
            replacement = NoFollowWatchedFileHandler(handler.baseFilename)
            replacement.setFormatter(handler.formatter)
            replacement.setLevel(handler.level)
            handler.close()
            target.handlers[n] = replacement


LIMITS_FILE = "logs.json"
LIMITS_SECONDS = 1.0


@dataclass
class Limits:
    """``logs.max_mb`` and ``logs.keep`` as rendered into ``<run_dir>/logs.json``, read again
    when a reload has replaced the file: a new size then takes effect within a second, where
    a changed option of a Circus stream would have Circus stop and start every watcher."""

    path: Path | None
    """None: the values given here, for good."""
    max_bytes: int = 0
    keep: int = 1
    checked_at: float = float("-inf")
    seen: tuple[int, int] | None = None

    def refresh(self, now: float) -> None:
        if self.path is None or now - self.checked_at < LIMITS_SECONDS:
            return
        self.checked_at = now
        try:
            st = os.stat(self.path)
            if (st.st_ino, st.st_mtime_ns) == self.seen:
                return
            values = json.loads(self.path.read_text())
            self.max_bytes, self.keep = int(values["max_bytes"]), max(int(values["keep"]), 1)
            self.seen = (st.st_ino, st.st_mtime_ns)
        except (OSError, ValueError, KeyError, TypeError):
            return  # being replaced, or gone with the stack: the last values hold


def limits_json(max_bytes: int, keep: int) -> str:
    return json.dumps({"max_bytes": max_bytes, "keep": keep}) + "\n"


def unchanged(lines: bytes) -> bytes:
    return lines


@dataclass
class Partial:
    data: bytes
    since: float


@dataclass
class LogFile:
    """One log and its rotation, shared by every stream that writes to it.

    Output comes in pieces as the pipes are read; each process's (and each of its pipes') line
    is completed before it is written, so that lines of different processes are not mixed and
    a rotation falls between two lines.
    """

    path: Path
    max_bytes: int = 0
    keep: int = 1
    clean: Callable[[bytes], bytes] = unchanged
    """What is done to each line before it is written (NGiNX's lose their query strings)."""
    limits: Limits | None = None
    """Where max_bytes and keep come from, if not fixed."""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    users: int = 0
    partial: dict[tuple[int, str], Partial] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fd = open_append(self.path)
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes, source: tuple[int, str]) -> None:
        """Write what ``source`` (pid, stream name) sent, up to its last complete line."""
        now = self.clock()
        if self.limits is not None:
            self.limits.refresh(now)
            self.max_bytes, self.keep = self.limits.max_bytes, self.limits.keep
        held = self.partial.pop(source, None)
        if held is not None:
            data = held.data + data
        end = data.rfind(b"\n") + 1
        whole, rest = data[:end], data[end:]
        if len(rest) > PARTIAL_LIMIT:
            whole, rest = data + b"\n", b""
        if rest:
            since = held.since if held is not None and end == 0 else now
            self.partial[source] = Partial(rest, since)
        if self.partial:
            self.write_stale(now)
        if whole:
            self.append(self.clean(whole))

    def write_stale(self, now: float) -> None:
        limit = now - PARTIAL_SECONDS
        for source, held in list(self.partial.items()):
            if held.since < limit:
                self.end_of(source)

    def end_of(self, source: tuple[int, str]) -> None:
        """The source wrote its last: what it left unfinished is a line of its own."""
        held = self.partial.pop(source, None)
        if held is not None:
            self.append(self.clean(held.data + b"\n"))

    def end_of_process(self, pid: int) -> None:
        for source in [s for s in self.partial if s[0] == pid]:
            self.end_of(source)

    def append(self, lines: bytes) -> None:
        """Append whole lines, rotating first whenever the next ones would not fit."""
        while lines:
            room = self.max_bytes - self.size if self.max_bytes else len(lines)
            if len(lines) <= room:
                self.write_all(lines)
                return
            cut = lines.rfind(b"\n", 0, max(room, 0)) + 1
            if cut == 0 and self.size == 0:
                # A line longer than the limit: it gets a file to itself.
                cut = lines.find(b"\n") + 1 or len(lines)
            self.write_all(lines[:cut])
            self.rotate()
            lines = lines[cut:]

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            self.size += written
            view = view[written:]

    def rotate(self) -> None:
        shift(self.path, self.keep)
        try:
            fd = open_append(self.path)
        except OSError as e:
            # A link planted at the path (ELOOP): writing goes on in the renamed file.
            logger.error("cannot open %s (%s); %s goes on in %s", self.path, e.strerror,
                      self.path.name, rotated(self.path, 1))  # fmt: skip
            self.size = 0
            return
        os.close(self.fd)
        self.fd = fd
        self.size = os.fstat(self.fd).st_size

    def close(self) -> None:
        for source in list(self.partial):
            self.end_of(source)
        os.close(self.fd)


_OPEN: dict[str, LogFile] = {}
"""Each log open in circusd, by path: the stdout and stderr streams of a watcher (and
autoreload's, which writes to the wsgi log) share one file and one rotation."""


def acquire(path: Path, limits: Limits | None,
            clean: Callable[[bytes], bytes] = unchanged) -> LogFile:  # fmt: skip
    log = _OPEN.get(str(path))
    if log is None:
        log = _OPEN[str(path)] = LogFile(path, clean=clean, limits=limits)
    log.users += 1
    return log


def release(log: LogFile) -> None:
    log.users -= 1
    if log.users <= 0 and _OPEN.get(str(log.path)) is log:
        del _OPEN[str(log.path)]
        log.close()
