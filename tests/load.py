"""A bounded load client: N connections for at most a few tens of seconds, to 127.0.0.1 or to
a test host of tests.netns (198.18.0.0/15) only.

Each connection alternates GETs that take 0-200 ms with POSTs whose echo is checked, and
every failure is recorded with its reason: refused, reset, a 5xx, a truncated or wrong body.

Like a browser, a client whose *reused* keep-alive connection is closed before any answer
sends the request again once, on a new connection: an HTTP server may close an idle
keep-alive connection at any time (NGiNX does when its old workers exit after a reload), and
a request crossing that close on the wire is the client's to retry (RFC 9112, 9.3.1). Such
retries are counted, not hidden; anything else, or a second failure, is a failure.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from dataclasses import dataclass, field

MAX_SECONDS = 60


@dataclass
class Report:
    ok: int = 0
    retried: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[int(len(ordered) * 0.99)] if ordered else 0.0


class Load:
    def __init__(self, port: int, connections: int = 48, max_sleep_ms: int = 200,
                 host: str = "127.0.0.1", only_get: str | None = None) -> None:  # fmt: skip
        """``only_get``: a path to GET again and again (any answer but 200 fails), instead of
        the test app's sleeps and echoes; ``host``: a test host's address (tests.netns)."""
        self.port = port
        self.host = host
        self.only_get = only_get
        self.connections = connections
        self.max_sleep_ms = max_sleep_ms
        self.report = Report()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Load:
        self._deadline = time.monotonic() + MAX_SECONDS
        for n in range(self.connections):
            thread = threading.Thread(target=self._run, args=(random.Random(n),), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=30)

    def _run(self, rng: random.Random) -> None:
        conn, reused = self._connect(), False
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            started = time.monotonic()
            request = self._next_request(rng)
            try:
                try:
                    failure = self._send(conn, *request)
                # The close crosses the request: EOF, EPIPE, or ECONNRESET when the request's
                # bytes reach a socket the server has just closed unread.
                except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                    if not reused:
                        raise
                    conn.close()
                    conn = self._connect()
                    with self._lock:
                        self.report.retried += 1
                    failure = self._send(conn, *request)
                reused = True
            except (OSError, http.client.HTTPException) as e:
                failure = f"{type(e).__name__}: {e}"
                conn.close()
                conn, reused = self._connect(), False
            with self._lock:
                if failure:
                    self.report.failures.append(failure)
                else:
                    self.report.ok += 1
                    self.report.latencies.append(time.monotonic() - started)
        conn.close()

    def _next_request(self, rng: random.Random) -> tuple[str, str, bytes | None, bytes | None]:
        """(method, path, body, expected answer; None: any body)"""
        if self.only_get is not None:
            return "GET", self.only_get, None, None
        if rng.random() < 0.5:
            ms = rng.randint(0, self.max_sleep_ms)
            return "GET", f"/sleep?ms={ms}", None, f"slept {ms}".encode()
        payload = rng.randbytes(rng.randint(1, 4096)).hex().encode()
        return "POST", "/echo", payload, payload

    def _send(self, conn: http.client.HTTPConnection, method: str, path: str,
              body: bytes | None, expected: bytes | None) -> str | None:  # fmt: skip
        conn.request(method, path, body=body, headers={"Content-Type": "text/plain"})
        response = conn.getresponse()
        answer = response.read()
        if response.status != 200:
            return f"HTTP {response.status}: {answer[:80]!r}"
        if expected is not None and answer != expected:
            return f"wrong body: {len(answer)} bytes instead of {len(expected)}"
        return None
