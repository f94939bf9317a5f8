"""The worker's one Redis subscription, shared by all its clients.

Redis channels are subscribed while at least one client listens to them and unsubscribed when
the last one leaves. If Redis goes away the listener reconnects with jittered backoff and
subscribes again to what the clients still want, without restarting the worker.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import gevent
import redis
from gevent.event import Event
from wsproto.frame_protocol import FrameProtocol

from stackctl.realtime import CHANNEL_PREFIX

if TYPE_CHECKING:
    from stackctl.ws.client import Client

log = logging.getLogger("stackctl.ws")

# Keeps the subscription open while no client listens, so that get_message() can block.
IDLE_CHANNEL = CHANNEL_PREFIX + "_idle"
POLL = 0.05
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0


def encode_text_frame(text: str) -> bytes:
    return bytes(FrameProtocol(client=False, extensions=[]).send_data(text, fin=True))


PING_FRAME = bytes(FrameProtocol(client=False, extensions=[]).ping())


class Hub:
    def __init__(self, redis_url: str, ping_interval: float) -> None:
        self.redis_url = redis_url
        self.ping_interval = ping_interval
        self.clients: dict[str, set[Client]] = defaultdict(set)
        self.ready: dict[str, Event] = {}
        self.stopping = False
        self._changed = Event()
        self._listener: gevent.Greenlet | None = None

    def start(self) -> None:
        self._listener = gevent.spawn(self._listen_forever)
        gevent.spawn(self._ping_forever)

    def stop(self) -> None:
        self.stopping = True
        if self._listener is not None:
            self._listener.kill(block=False)

    def join(self, channel: str, client: Client, timeout: float = 5.0) -> bool:
        """Add a client; True once Redis confirmed the subscription, so nothing published
        after the handshake can be missed."""
        self.clients[channel].add(client)
        ready = self.ready.setdefault(channel, Event())
        if not ready.is_set():
            self._changed.set()
        return ready.wait(timeout)

    def leave(self, channel: str, client: Client) -> None:
        members = self.clients.get(channel)
        if members is None:
            return
        members.discard(client)
        if not members:
            # The subscription (and its ready event) stays until the listener drops it, so a
            # client that joins again meanwhile is served at once.
            del self.clients[channel]
            self._changed.set()

    def all_clients(self) -> list[Client]:
        return [c for members in self.clients.values() for c in members]

    def client_count(self) -> int:
        return sum(len(members) for members in self.clients.values())

    def _ping_forever(self) -> None:
        """Ping every client; drop those silent for two intervals (a dead peer, a lost route)."""
        while not self.stopping:
            gevent.sleep(self.ping_interval)
            deadline = time.monotonic() - 2 * self.ping_interval
            for client in self.all_clients():
                if client.last_heard < deadline:
                    client.abort()
                else:
                    client.send_frame(PING_FRAME)

    def fan_out(self, channel: str, text: str) -> None:
        frame = encode_text_frame(text)
        for client in list(self.clients.get(channel, ())):
            client.send_frame(frame)

    # --- the listener greenlet ------------------------------------------------------------

    def _listen_forever(self) -> None:
        delay = BACKOFF_MIN
        while not self.stopping:
            try:
                self._listen()
                delay = BACKOFF_MIN
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                self._forget_subscriptions()
                pause = delay * random.uniform(0.5, 1.5)
                log.warning("Redis subscription lost (%s); reconnecting in %.1f s", e, pause)
                gevent.sleep(pause)
                delay = min(delay * 2, BACKOFF_MAX)

    def _listen(self) -> None:
        connection = redis.Redis.from_url(self.redis_url)
        pubsub = connection.pubsub()
        subscribed: set[str] = set()
        try:
            pubsub.subscribe(IDLE_CHANNEL)
            self._changed.set()
            while not self.stopping:
                if self._changed.is_set():
                    self._changed.clear()
                    subscribed = self._reconcile(pubsub, subscribed)
                message = pubsub.get_message(timeout=POLL)
                if message is not None:
                    self._dispatch(message)
        finally:
            pubsub.close()
            connection.close()

    def _forget_subscriptions(self) -> None:
        # The connection is gone, and its subscriptions with it: joiners wait again until
        # the next connection confirms them.
        for channel in list(self.ready):
            if channel in self.clients:
                self.ready[channel].clear()
            else:
                del self.ready[channel]

    def _reconcile(self, pubsub: Any, subscribed: set[str]) -> set[str]:
        wanted = set(self.clients)
        if wanted - subscribed:
            pubsub.subscribe(*(CHANNEL_PREFIX + c for c in wanted - subscribed))
        if subscribed - wanted:
            pubsub.unsubscribe(*(CHANNEL_PREFIX + c for c in subscribed - wanted))
            for channel in subscribed - wanted:
                self.ready.pop(channel, None)
        return wanted

    def _dispatch(self, message: dict[str, Any]) -> None:
        key = message["channel"].decode()
        if not key.startswith(CHANNEL_PREFIX):
            return
        channel = key[len(CHANNEL_PREFIX) :]
        if message["type"] == "subscribe":
            event = self.ready.get(channel)
            if event is not None:
                event.set()
        elif message["type"] == "message":
            data = message["data"]
            self.fan_out(
                channel, data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
            )
