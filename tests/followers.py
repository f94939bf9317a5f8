"""A test client that follows channels the way realtime.js does: it reconnects after a close
and resumes from the last id it saw. It records every message, so that a test can check that
nothing was lost or doubled."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect


class Follower(threading.Thread):
    """``ping_interval``: seconds between the client's own pings; a connection whose pong does
    not come back as soon is given up (a host cut off answers nothing). ``before``: run first
    in the follower's thread (e.g. to stand on another host)."""

    def __init__(self, url: str, ping_interval: float = 20,
                 before: Callable[[], None] | None = None) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.url = url
        self.ping_interval = ping_interval
        self.before = before
        self.received: list[dict[str, Any]] = []
        self.received_at: list[float] = []
        """time.monotonic() of each of ``received``."""
        self.close_codes: list[int] = []
        self.connected = threading.Event()
        self.connections = 0
        self._done = threading.Event()

    @property
    def last_id(self) -> str | None:
        ids = [m["id"] for m in self.received if "id" in m]  # a gap notice has none
        return ids[-1] if ids else None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [m for m in self.received if "id" in m]

    @property
    def gaps(self) -> list[str]:
        return [m["channel"] for m in self.received if m.get("gap")]

    def run(self) -> None:
        if self.before is not None:
            self.before()
        while not self._done.is_set():
            since = f"{'&' if '?' in self.url else '?'}since={self.last_id}" if self.last_id else ""
            try:
                with connect(self.url + since, open_timeout=5, ping_interval=self.ping_interval,
                             ping_timeout=self.ping_interval) as ws:  # fmt: skip
                    self.connections += 1
                    self.connected.set()
                    while not self._done.is_set():
                        try:
                            message = json.loads(ws.recv(timeout=0.2))
                            self.received_at.append(time.monotonic())
                            self.received.append(message)
                        except TimeoutError:
                            continue
            except ConnectionClosed as closed:
                if closed.rcvd is not None:
                    self.close_codes.append(closed.rcvd.code)
            except (OSError, InvalidHandshake):
                pass  # the worker is restarting: try again, as a browser would
            time.sleep(0.1)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)

    def wait_for_count(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.received) < count:
            time.sleep(0.05)
