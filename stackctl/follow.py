"""Following a log across its rotations, as ``tail -F`` does: ``stackctl logs -f``.

A rotation renames the file being followed and starts a new one at its path. The renamed
file is read to its end first, and for a while after (an NGiNX worker may still append to it
until it has reopened its log), while the new one is read from its start: no line is shown
twice and none is skipped. Lines are shown once complete, so a line still being written
when the file is read is not cut in two.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stackctl.logfile import backups, rotated

DRAIN_SECONDS = 5.0
"""How long a rotated file is still read after it last grew."""
BLOCK = 64 * 1024


@dataclass
class Reader:
    """One open file: what has been read of it, and the line it has begun."""

    fd: int
    position: int = 0
    partial: bytes = b""
    grew_at: float = 0.0

    @property
    def identity(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def read(self) -> list[bytes]:
        """The lines completed since the last read."""
        chunks = []
        while chunk := os.pread(self.fd, BLOCK, self.position):
            chunks.append(chunk)
            self.position += len(chunk)
        data = self.partial + b"".join(chunks)
        end = data.rfind(b"\n") + 1
        self.partial = data[end:]
        return data[:end].splitlines()

    def close(self) -> list[bytes]:
        """Whatever is left, once nothing writes to the file any more."""
        lines = self.read()
        if self.partial:
            lines.append(self.partial)
        os.close(self.fd)
        return lines


def tail_of(fd: int, count: int) -> tuple[list[bytes], int]:
    """The last ``count`` complete lines of an open file, and the offset where they end: read
    from the end, a block at a time, never the whole of a large log."""
    size = os.fstat(fd).st_size
    start, data = size, b""
    while start > 0 and data.count(b"\n") <= count:
        start = max(0, start - BLOCK)
        data = os.pread(fd, size - start, start)
    end = data.rfind(b"\n") + 1
    lines = data[:end].splitlines()
    if start > 0:
        lines = lines[1:]  # the first one may be a line's end only
    return (lines[-count:] if count > 0 else []), start + end


def last_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of a log, taken from its last rotated file too when the log
    was rotated a moment ago. OSError if there is no log at ``path``."""
    found: list[bytes] = []
    for part in (path, rotated(path, 1)):
        try:
            fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if part == path:
                raise
            break
        try:
            lines, end = tail_of(fd, count - len(found))
            # A last line without its newline yet (still being written) is shown too.
            unfinished = os.pread(fd, BLOCK, end) if part == path else b""
            found = (lines + [unfinished] if unfinished else lines)[-count:] + found
        finally:
            os.close(fd)
        if len(found) >= count:
            break
    return [line.decode(errors="replace") for line in found]


def open_reader(path: Path) -> Reader | None:
    try:
        return Reader(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        return None  # not there (yet): looked for again at the next poll


def identity_at(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass
class Follower:
    path: Path
    clock: Callable[[], float] = time.monotonic
    current: Reader | None = None
    draining: list[Reader] = field(default_factory=list)

    def tail(self, count: int) -> list[bytes]:
        """The last ``count`` complete lines now in the file; following starts after them."""
        self.current = open_reader(self.path)
        if self.current is None:
            return []
        lines, self.current.position = tail_of(self.current.fd, count)
        return lines

    def poll(self) -> list[bytes]:
        lines: list[bytes] = []
        now = self.clock()
        for reader in list(self.draining):
            got = reader.read()
            if got:
                reader.grew_at = now
                lines += got
            elif now - reader.grew_at > DRAIN_SECONDS:
                self.draining.remove(reader)
                lines += reader.close()
        if self.current is None:
            self.current = open_reader(self.path)
            if self.current is None:
                return lines
        lines += self.current.read()
        at_path = identity_at(self.path)
        if at_path is not None and at_path != self.current.identity:
            # Rotated: the renamed file is drained apart, and so are the ones rotated since,
            # if the log grew fast; the new one is read from its start.
            self.current.grew_at = now
            self.draining.append(self.current)
            for reader in self.rotated_since(self.current.identity):
                reader.grew_at = now
                lines += reader.read()
                self.draining.append(reader)
            self.current = open_reader(self.path)
            lines += self.current.read() if self.current else []
        elif os.fstat(self.current.fd).st_size < self.current.position:
            self.current.position, self.current.partial = 0, b""  # truncated in place
            lines += self.current.read()
        return lines

    def rotated_since(self, last: tuple[int, int]) -> list[Reader]:
        """The rotated files newer than the one last read, oldest first."""
        found = [(identity_at(p), p) for p in backups(self.path)]
        ids = [i for i, _ in found]
        newer = found[: ids.index(last)] if last in ids else found
        known = {r.identity for r in self.draining}
        readers = []
        for identity, path in reversed(newer):
            reader = open_reader(path) if identity not in known else None
            if reader is not None and reader.identity not in known:
                readers.append(reader)
            elif reader is not None:
                os.close(reader.fd)
        return readers

    def close(self) -> None:
        for reader in [*self.draining, *([self.current] if self.current else [])]:
            os.close(reader.fd)
