"""The Circus streams that write every watcher's output to its log.

:class:`LogStream` writes through :class:`stackctl.logfile.LogFile`: whole lines, rotated by
size (``logs.max_mb``, ``logs.keep``) at a line end, the file opened without following a link.

:class:`QuerylessLogStream` is NGiNX's: its error lines without query strings.
NGiNX's error log quotes the request line and the referrer of a request that failed upstream
(a timeout, a worker restarting), query string included, and query strings carry realtime
tokens (``?token=``). NGiNX cannot be told to leave them out, so its errors go to its stderr,
which Circus hands to this stream, and the query strings are cut here, before the disk.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stackctl import logfile

# "?" after something that is not a space, then everything up to a quote or a space: the
# query of a request line, a referrer or any URL in a line.
_QUERY = re.compile(rb"(?<=[^\s\"?])\?[^\s\"]+")
REMOVED = b"?[query removed]"


def without_queries(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return _QUERY.sub(REMOVED, raw)


class LogStream:
    """A watcher's stdout or stderr, as Circus hands it over: ``{"data", "pid", "name"}``.

    Circus passes the ``stdout_stream.*`` keys of the watcher's section as keyword arguments
    (strings); the stdout and the stderr stream of one log share its :class:`LogFile`. Circus
    closes the streams of a watcher it stops and opens the same ones again when it starts it.
    """

    clean: Callable[[bytes], bytes] = staticmethod(logfile.unchanged)

    def __init__(self, filename: str, limits: str = "", **_: Any) -> None:
        """``limits``: the ``logs.json`` to take the size and count of rotated files from
        (:class:`stackctl.logfile.Limits`); none, no rotation."""
        self.path = Path(filename)
        self.limits = logfile.Limits(Path(limits)) if limits else None
        self.log: logfile.LogFile | None = None
        self.open()

    def open(self) -> logfile.LogFile:
        if self.log is None:
            self.log = logfile.acquire(self.path, self.limits, type(self).clean)
        return self.log

    def __call__(self, data: dict[str, Any]) -> None:
        raw = data["data"]
        data_bytes = raw.encode() if isinstance(raw, str) else raw
        # Open again if need be: the last output of a stopped watcher may come after close().
        self.open().write(data_bytes, (data["pid"], data["name"]))

    def end_of_process(self, pid: int) -> None:
        """The process is gone: what it left without a newline is written out."""
        if self.log is not None:
            self.log.end_of_process(pid)

    def close(self) -> None:
        if self.log is not None:
            logfile.release(self.log)
            self.log = None


class QuerylessLogStream(LogStream):
    """A LogStream that removes query strings from what it writes, line by line: a query cut
    in two by the pipe's reads is still found whole."""

    clean = staticmethod(without_queries)
