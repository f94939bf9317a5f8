"""For clients that cannot hold a websocket: Server-Sent Events and long polling.

Both are plain HTTP requests served by the same gevent worker from the same hub, and both
resume from a message id: SSE from the ``Last-Event-ID`` header the browser sends when it
reconnects (or ``?since=``), a long poll from ``?since=`` (the ``last_id`` of its previous
answer). Where the history no longer reaches back that far, SSE sends a ``gap`` event and a
long poll's answer lists the channel under ``gaps``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from typing import Any
from urllib.parse import parse_qs

import redis
from gevent.event import Event
from gevent.queue import Full, Queue

from stackctl.realtime import Missed
from stackctl.ws.access import Subscription
from stackctl.ws.counters import Counters
from stackctl.ws.hub import Delivery, GapNotice, Hub, Resume

POLL_WAIT_DEFAULT, POLL_WAIT_MAX = 25.0, 55.0
SSE_RETRY_MS = 2000
_END = b""
TOKEN_EXPIRED_EVENT = b"event: expired\ndata: token expired\n\n"


class EventStream:
    """One Server-Sent Events client; the hub's member while its response is open."""

    def __init__(self, queue_limit: int, since: str | None,
                 counters: Counters | None = None) -> None:  # fmt: skip
        self.queue: Queue[bytes] = Queue(maxsize=queue_limit)
        self.counters = counters or Counters()
        self.resume = Resume(since)
        # The client never speaks after its request; a failed write is what ends a dead one.
        self.last_heard = time.monotonic()

    def deliver(self, delivery: Delivery) -> None:
        if self.resume.admit(delivery):
            self._put(delivery.sse_event)

    def keepalive(self) -> None:
        self.last_heard = time.monotonic()
        self._put(b": ping\n\n")

    def abort(self) -> None:
        # A slow client is ended, never buffered without bound. What is pending is dropped
        # whole (not just the oldest), so that it resumes from its Last-Event-ID without a gap.
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(_END)

    def expire(self) -> None:
        """Its token expired: say so (the page fetches a fresh one), then end the stream."""
        self.abort()
        self.queue.get_nowait()
        self.queue.put_nowait(TOKEN_EXPIRED_EVENT)
        self.queue.put_nowait(_END)

    def _put(self, chunk: bytes) -> None:
        try:
            self.queue.put_nowait(chunk)
        except Full:
            self.counters.slow_closed += 1
            self.counters.dropped += self.queue.qsize()
            self.abort()

    def catch_up(self, hub: Hub, subscription: Subscription) -> bytes:
        """What the client missed, as one piece (not through the queue: it may be larger than
        the queue's limit, and a client cut off during it would ask for it again)."""
        replayed: list[bytes] = []
        self.resume.replay(hub, subscription.channels,
                           lambda delivery: replayed.append(delivery.sse_event))  # fmt: skip
        return b"".join(replayed)

    def events(self, replayed: bytes) -> Generator[bytes, None, None]:
        yield f"retry: {SSE_RETRY_MS}\n\n".encode()
        if replayed:
            yield replayed
        while (chunk := self.queue.get()) is not _END:
            yield chunk


class PollWaiter:
    """One long-poll request waiting for the next message."""

    def __init__(self) -> None:
        self.received: list[Delivery] = []
        self.gaps: list[str] = []
        self.arrived = Event()
        self.last_heard = time.monotonic()

    def deliver(self, delivery: Delivery) -> None:
        if isinstance(delivery, GapNotice):  # the worker lost Redis longer than history keeps
            self.gaps.append(delivery.channel)
        else:
            self.received.append(delivery)
        self.arrived.set()

    def keepalive(self) -> None:
        self.last_heard = time.monotonic()

    def abort(self) -> None:
        self.arrived.set()


def poll_wait(environ: dict[str, Any]) -> float:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        return min(POLL_WAIT_MAX, max(0.0, float(query["timeout"][-1])))
    except (KeyError, ValueError):
        return POLL_WAIT_DEFAULT


def poll_answer(hub: Hub, subscription: Subscription, wait: float) -> bytes:
    """The messages after ``since`` if there are any, else the next ones within ``wait``."""
    waiter = PollWaiter()
    if not hub.join(subscription.channels, waiter):
        raise redis.ConnectionError("the message bus is not reachable")
    try:
        since = subscription.since
        missed = hub.history(subscription.channels, since) if since else Missed([], [])
        texts, gaps = missed.envelopes, missed.gaps
        # What arrives live from now is in the history too: the next poll gets it.
        if not (texts or gaps) and waiter.arrived.wait(wait):
            texts, gaps = [d.text for d in waiter.received], waiter.gaps
    finally:
        hub.leave(subscription.channels, waiter)
    last_id = Delivery(texts[-1]).id if texts else subscription.since
    return (
        b'{"messages":[' + ",".join(texts).encode() + b'],"last_id":'
        + (f'"{last_id}"' if last_id else "null").encode()
        + b',"gaps":' + json.dumps(gaps).encode() + b"}"
    )


def sse_headers() -> list[tuple[str, str]]:
    return [
        ("Content-Type", "text/event-stream"),
        ("Cache-Control", "no-cache"),
        # NGiNX would otherwise buffer the stream.
        ("X-Accel-Buffering", "no"),
    ]
