"""A test client that follows channels the way realtime.js does: it reconnects after a close
and resumes from the last id it saw. It records every message, so that a test can check that
nothing was lost or doubled."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect


class Follower(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.received: list[dict[str, Any]] = []
        self.close_codes: list[int] = []
        self.connected = threading.Event()
        self._done = threading.Event()

    @property
    def last_id(self) -> str | None:
        return self.received[-1]["id"] if self.received else None

    def run(self) -> None:
        while not self._done.is_set():
            since = f"{'&' if '?' in self.url else '?'}since={self.last_id}" if self.last_id else ""
            try:
                with connect(self.url + since, open_timeout=5) as ws:
                    self.connected.set()
                    while not self._done.is_set():
                        try:
                            self.received.append(json.loads(ws.recv(timeout=0.2)))
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
