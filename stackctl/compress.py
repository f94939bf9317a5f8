"""Static files compressed once, so that NGiNX sends ``file.gz`` as is (``gzip_static``).

Compressing on every request costs a 2-core server nine tenths of its static throughput (a
Wagtail core.css: 13,445 requests/s plain, 1,210 gzipped on the fly). ``up``, ``reload`` and
``stackctl compress`` write ``name.gz`` beside each compressible file instead, and only where
it is missing or stale, so that a large tree costs its full time once.

stackctl may run as root while static.dir belongs to the app's user, who could plant links
there. So the tree is walked through directory descriptors opened without following links,
every file is opened and created relative to its directory's descriptor, never by path; a
``.gz`` is written to a new temporary file (``O_EXCL``: never an existing one) and renamed
over the old name, which replaces a planted link rather than writing through it.
"""

from __future__ import annotations

import gzip
import os
import secrets
import stat
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from stackctl import resources
from stackctl.stack import Stack

GZIP_TYPES = (
    "text/plain",
    "text/css",
    "text/xml",
    "application/javascript",
    "application/json",
    "image/svg+xml",
)
"""What NGiNX compresses (gzip_types), on the fly or from a .gz file (text/html is implied)."""

GZIP_MIN_LENGTH = 1024
"""Smaller files gain too little to be worth compressing (gzip_min_length)."""

ALREADY_COMPRESSED = frozenset({"svgz"})
"""Extensions that mime.types files under a compressible type, though they are gzip already."""

LEVEL = 9  # paid once per file version, not per request: the smallest output
CHUNK = 1 << 16
GZIP_HEADER_SIZE = 18  # the smallest gzip file: anything shorter is a write cut off midway
DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in for a checked file must not hang the opener.
SOURCE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
TEMPORARY = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def compressible_extensions(mime_types: Path | None = None) -> frozenset[str]:
    """The file extensions NGiNX's mime.types (the copy stackctl ships) maps to GZIP_TYPES."""
    text = (mime_types or resources.templates_dir() / "nginx" / "mime.types").read_text()
    found: set[str] = set()
    for line in text.splitlines():
        words = line.strip().rstrip(";").split()
        if len(words) > 1 and words[0] in GZIP_TYPES:
            found.update(words[1:])
    return frozenset(found - ALREADY_COMPRESSED)


@dataclass
class Outcome:
    """What one pass over static.dir did."""

    compressed: int = 0
    fresh: int = 0
    failures: list[str] = field(default_factory=list)
    """Files whose .gz could not be written, with why; NGiNX compresses those per request."""
    seconds: float = 0.0

    def summary(self) -> str:
        line = (
            f"static files: {self.compressed} compressed, {self.fresh} already were "
            f"({self.seconds:.2f} s)"
        )
        if self.failures:
            line += (
                f"; {len(self.failures)} could not be (NGiNX compresses those on each "
                f"request), first: {self.failures[0]}"
            )
        return line


def compress_static(stack: Stack) -> Outcome | None:
    """Compress what the stack serves from static.dir; None when it serves nothing or the
    profile leaves compression to NGiNX (static.compress = false)."""
    if stack.static_dir is None or not stack.profile.static.compress:
        return None
    if not stack.static_dir.is_dir():
        return None  # generation.check_static says so, naming the key
    if stack.stack_dir not in stack.static_dir.parents:  # Stack.plan refuses it for writers
        return Outcome(failures=[f"{stack.static_dir}: outside the stack directory"])
    try:
        return compress_tree(stack.stack_dir, stack.static_dir)
    except OSError as e:  # static.dir itself: unreadable, or replaced since Stack.plan
        return Outcome(failures=[f"{stack.static_dir}: {e.strerror}"])


def compress_tree(stack_dir: Path, static_dir: Path) -> Outcome:
    """Write or refresh ``name.gz`` for every compressible file under ``static_dir``, which
    lies inside ``stack_dir`` (Stack.plan checked): each directory on the way is opened
    without following links, so none swapped in since can lead elsewhere."""
    started = time.monotonic()
    outcome = Outcome()
    extensions = compressible_extensions()
    top = open_inside(stack_dir, static_dir.relative_to(stack_dir))
    for directory, where, names in walk(top, static_dir, outcome):
        for name in names:
            if PurePosixPath(name).suffix.lstrip(".").lower() in extensions:
                refresh(directory, name, where / name, outcome)
    outcome.seconds = time.monotonic() - started
    return outcome


def open_inside(base: Path, relative: Path) -> int:
    descriptor = os.open(base, DIRECTORY)
    for part in relative.parts:
        try:
            inner = os.open(part, DIRECTORY, dir_fd=descriptor)
        finally:
            os.close(descriptor)
        descriptor = inner
    return descriptor


def walk(top: int, top_path: Path, outcome: Outcome) -> Iterator[tuple[int, Path, list[str]]]:
    """Each directory of the tree under the descriptor ``top``: an open descriptor, its path
    (for messages) and the names of the regular files in it. Links are neither followed nor
    listed (NGiNX serves none), nor are dotfiles and dot directories (.git...). Every
    descriptor, ``top`` included, is closed here."""
    pending = [(top, top_path)]
    try:
        while pending:
            directory, where = pending.pop()
            try:
                files, inner = [], []
                try:
                    with os.scandir(directory) as entries:
                        for entry in entries:
                            if entry.name.startswith("."):
                                continue
                            if entry.is_dir(follow_symlinks=False):
                                inner.append(entry.name)
                            elif entry.is_file(follow_symlinks=False):
                                files.append(entry.name)
                except OSError as e:
                    outcome.failures.append(f"{where}: {e.strerror}")
                    continue
                yield directory, where, files
                for name in inner:
                    try:
                        pending.append((os.open(name, DIRECTORY, dir_fd=directory), where / name))
                    except OSError as e:  # replaced by a link or a file since: not walked
                        outcome.failures.append(f"{where / name}: {e.strerror}")
            finally:
                os.close(directory)
    finally:
        for directory, _ in pending:
            os.close(directory)


def refresh(directory: int, name: str, path: Path, outcome: Outcome) -> None:
    try:
        source = os.stat(name, dir_fd=directory, follow_symlinks=False)
        if source.st_size < GZIP_MIN_LENGTH:
            return
        if is_fresh(directory, name + ".gz", source):
            outcome.fresh += 1
            return
        write_gzip(directory, name)
        outcome.compressed += 1
    except OSError as e:
        outcome.failures.append(f"{path}.gz: {e.strerror}")


def is_fresh(directory: int, gz_name: str, source: os.stat_result) -> bool:
    """A .gz is fresh when it is a real file stamped with its source's modification time
    (write_gzip stamps it), so that any change to the source, even to an older copy, redoes
    it; and when it ends as a whole gzip file of its source does, with the source's size: a
    .gz cut short by a crash (it is not synced: a pass over a large tree would take three
    times as long) is redone, not served."""
    try:
        gz = os.stat(gz_name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not (
        stat.S_ISREG(gz.st_mode)
        and gz.st_mtime_ns == source.st_mtime_ns
        and gz.st_size >= GZIP_HEADER_SIZE
    ):
        return False
    descriptor = os.open(gz_name, SOURCE, dir_fd=directory)
    try:
        # The last four bytes of a gzip file: the uncompressed size, modulo 2**32 (RFC 1952).
        tail = os.pread(descriptor, 4, os.fstat(descriptor).st_size - 4)
    finally:
        os.close(descriptor)
    return int.from_bytes(tail, "little") == source.st_size % 2**32


def write_gzip(directory: int, name: str) -> None:
    """Compress ``name`` into a new temporary file beside it, give that its source's owner,
    mode and time, then rename it to ``name.gz`` in the same directory."""
    source_fd = os.open(name, SOURCE, dir_fd=directory)
    with os.fdopen(source_fd, "rb") as source:
        info = os.fstat(source_fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(0, "not a regular file any more")
        # A dot name: NGiNX never serves a half-written one, and the walk skips it.
        temporary = f".{name}.{secrets.token_hex(4)}.gz-tmp"
        out_fd = os.open(temporary, TEMPORARY, 0o600, dir_fd=directory)
        try:
            with os.fdopen(out_fd, "wb") as out:
                with gzip.GzipFile(filename="", mode="wb", compresslevel=LEVEL, fileobj=out,
                                   mtime=int(info.st_mtime)) as packed:  # fmt: skip
                    while chunk := source.read(CHUNK):
                        packed.write(chunk)
                out.flush()
                if os.geteuid() == 0:  # the app's user keeps owning what is in its tree
                    os.fchown(out_fd, info.st_uid, info.st_gid)
                os.fchmod(out_fd, stat.S_IMODE(info.st_mode) & 0o666)
                os.utime(out_fd, ns=(info.st_atime_ns, info.st_mtime_ns))
            os.rename(temporary, name + ".gz", src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with suppress(OSError):
                os.unlink(temporary, dir_fd=directory)
            raise
