"""The realtime worker's own counters, for the Prometheus exporter (:mod:`stackctl.metrics`).

They sit on the fan-out's hot path, so they are plain integers bumped in place: no lock (one
gevent thread), no allocation, and counted per message, never per client (a delivery to N
clients adds N once). Without metrics (``metrics.listen = ""``) the fan-out skips even that;
the rare events (a slow client, a lost subscription) are counted either way.

The exporter reads them on a unix socket in the service directory that NGiNX does not route:
connect, read the Prometheus text until the worker closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gevent.server import StreamServer

log = logging.getLogger("stackctl.ws")

PREFIX = "stackctl_ws_"
TRANSPORTS = ("websocket", "sse", "longpoll")


class Counters:
    """Totals since the worker started (Prometheus counters: they only grow)."""

    __slots__ = ("received", "delivered", "replayed", "dropped", "gaps", "slow_closed",
                 "redis_reconnects", "client_published")  # fmt: skip

    def __init__(self) -> None:
        self.received = 0
        self.delivered = 0
        self.replayed = 0
        self.dropped = 0
        self.gaps = 0
        self.slow_closed = 0
        self.redis_reconnects = 0
        self.client_published = 0


COUNTER_HELP = {
    "received": ("messages_received_total",
                 "Messages published (by publish() anywhere, or by clients) that reached this "
                 "worker from Redis on a channel one of its clients follows"),
    "delivered": ("messages_delivered_total",
                  "Messages handed to clients (one per client per message), live"),
    "replayed": ("messages_replayed_total",
                 "Messages sent to clients from the history: a client that resumed, or the "
                 "catch-up after the worker lost Redis"),
    "dropped": ("messages_dropped_total",
                "Messages thrown away because their client fell too far behind"),
    "gaps": ("gaps_announced_total",
             "Gap notices sent: a client missed more than the history keeps"),
    "slow_closed": ("slow_clients_closed_total",
                    "Clients closed (1013, or an event stream ended) for falling behind"),
    "redis_reconnects": ("redis_reconnects_total",
                         "Times the worker's Redis subscription was lost and opened again"),
    "client_published": ("client_messages_published_total",
                         "Messages clients published through this worker (ws.client_publish)"),
}  # fmt: skip


def transport_of(member: object) -> str:
    """The transport label of a hub member, by its class's name: the member classes import
    this module, so it cannot import them."""
    name = type(member).__name__
    return {"Client": "websocket", "EventStream": "sse", "PollWaiter": "longpoll"}.get(
        name, "other"
    )


def exposition(counters: Counters, members: Iterable[object], channels: int,
               subscribed: bool, skipped: int) -> str:  # fmt: skip
    """The worker's metrics in Prometheus text format. Computed when scraped: the gauges
    (clients by transport, channels) are counted from the hub then, not kept up to date."""
    by_transport = Counter(transport_of(member) for member in members)
    lines = [
        f"# HELP {PREFIX}connected_clients Clients connected to this worker, by transport.",
        f"# TYPE {PREFIX}connected_clients gauge",
    ]
    lines += [f'{PREFIX}connected_clients{{transport="{t}"}} {by_transport.get(t, 0)}'
              for t in (*TRANSPORTS, *sorted(set(by_transport) - set(TRANSPORTS)))]  # fmt: skip
    lines += [
        f"# HELP {PREFIX}channels Channels at least one client of this worker follows.",
        f"# TYPE {PREFIX}channels gauge",
        f"{PREFIX}channels {channels}",
        f"# HELP {PREFIX}redis_subscribed 1 while the worker's Redis subscription is open.",
        f"# TYPE {PREFIX}redis_subscribed gauge",
        f"{PREFIX}redis_subscribed {int(subscribed)}",
    ]
    for attribute, (name, help_text) in COUNTER_HELP.items():
        lines += [f"# HELP {PREFIX}{name} {help_text}.", f"# TYPE {PREFIX}{name} counter",
                  f"{PREFIX}{name} {getattr(counters, attribute)}"]  # fmt: skip
    lines += [f"# HELP {PREFIX}skipped_messages_total Messages on stackctl channels not "
              "published by stackctl.realtime.", f"# TYPE {PREFIX}skipped_messages_total counter",
              f"{PREFIX}skipped_messages_total {skipped}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def serve(path: Path, text: Callable[[], str]) -> StreamServer | None:
    """Answer every connection on the unix socket ``path`` with ``text()``, then close it.

    A reload starts the new worker beside the old one: the new one takes the path over.
    None if the path cannot be taken (something else left in its place): realtime comes
    before its metrics, so the worker serves uncounted (the exporter shows it down)."""
    try:
        listener = listening(path)
    except OSError as e:
        log.warning("the counters are not served for the metrics: %s: %s", path, e.strerror)
        return None

    def answer(connection: Any, _: Any) -> None:
        try:
            connection.sendall(text().encode())
        except OSError:
            pass  # the exporter went away: nothing to tell anyone
        finally:
            connection.close()

    server = StreamServer(listener, answer)
    server.start()
    return server


def listening(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(16)
    except OSError:
        listener.close()
        raise
    return listener
