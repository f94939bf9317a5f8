"""The Circus stream that writes NGiNX's output: its error lines without query strings.

NGiNX's error log quotes the request line and the referrer of a request that failed upstream
(a timeout, a worker restarting), query string included, and query strings carry realtime
tokens (``?token=``). NGiNX cannot be told to leave them out, so its errors go to its stderr,
which Circus hands to this stream, and the query strings are cut here, before the disk.
"""

from __future__ import annotations

import re
from typing import Any

from circus.stream import FileStream

# "?" after something that is not a space, then everything up to a quote or a space: the
# query of a request line, a referrer or any URL in a line.
_QUERY = re.compile(rb"(?<=[^\s\"?])\?[^\s\"]+")
REMOVED = b"?[query removed]"


def without_queries(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return _QUERY.sub(REMOVED, raw)


class QuerylessFileStream(FileStream):
    """A FileStream that removes query strings from what it writes."""

    def __call__(self, data: dict[str, Any]) -> None:
        super().__call__({**data, "data": without_queries(data["data"])})
