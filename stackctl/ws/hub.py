"""The worker's one Redis subscription, shared by all its clients.

Redis channels are subscribed while at least one client listens to them and unsubscribed when
the last one leaves. If Redis goes away the listener reconnects with jittered backoff and
subscribes again to what the clients still want, without restarting the worker.

A member of the hub is anything with ``deliver(delivery)``, ``keepalive()`` and ``abort()``: a
websocket client, a Server-Sent Events stream or a waiting long-poll request.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import gevent
import redis
from gevent.event import Event
from gevent.lock import BoundedSemaphore
from redis.backoff import NoBackoff
from redis.retry import Retry
from wsproto.frame_protocol import FrameProtocol

from stackctl import realtime
from stackctl.realtime import CHANNEL_PREFIX
from stackctl.ws.counters import Counters

log = logging.getLogger("stackctl.ws")

# Keeps the subscription open while no client listens, so that get_message() can block.
IDLE_CHANNEL = CHANNEL_PREFIX + "_idle"
# Replay and client publishing share a few connections, whatever the number of clients.
SIDE_CONNECTIONS = 6
# Replays for clients at once, in two lanes of REPLAYS each: a crowd catching up on many
# channels waits in its own lane, so that it neither takes the connections that publishing
# and the recovery after a lost subscription need, nor holds up the clients of a few channels.
REPLAYS = 2
FEW_CHANNELS = 4
REPLAY_WAIT = 30.0
POLL = 0.05
# A Redis host that dies (power, kernel, cable) closes nothing: its connections just go silent,
# and TCP would notice after some fifteen minutes. So the listener pings when Redis has been
# quiet for a second, and one that has sent nothing, not even the pong, for LIVENESS_TIMEOUT
# is gone: the listener reconnects (through Sentinel, to the promoted replica).
LIVENESS_PING = 1.0
LIVENESS_TIMEOUT = 5.0
SIDE_TIMEOUT = 10.0  # seconds a history read or a client's publish may wait for Redis
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
# Skipped messages are logged at most this often: a flood of them must not flood the log.
BAD_MESSAGE_LOG_INTERVAL = 60.0
CRASH_EXIT_STATUS = 70  # EX_SOFTWARE: Circus starts a fresh worker


def exit_process(greenlet: gevent.Greenlet) -> None:
    """A long-lived greenlet died: a worker that no longer hears Redis (or pings nobody) would
    still accept clients and serve them nothing. End the process instead; Circus starts a new
    one and the clients resume from their last id."""
    log.critical("%s crashed (%r); exiting so that a fresh worker takes over",
                 getattr(greenlet, "name", "a greenlet"), greenlet.exception)  # fmt: skip
    logging.shutdown()
    os._exit(CRASH_EXIT_STATUS)


def encode_text_frame(text: str) -> bytes:
    return bytes(FrameProtocol(client=False, extensions=[]).send_data(text, fin=True))


class Delivery:
    """One published message, encoded at most once per transport for all its receivers."""

    def __init__(self, text: str) -> None:
        self.text = text  # the JSON envelope: {"id": ..., "channel": ..., "data": ...}

    @classmethod
    def from_bus(cls, text: str) -> Delivery | None:
        """A message as it came from Redis, or None if it is not an envelope with a valid id.

        Anyone who can reach Redis can publish on a ``stackctl:`` channel; what did not come
        from :func:`stackctl.realtime.publish` must not reach (or break) the clients.
        """
        if "\n" in text or "\r" in text:  # would break the framing of a Server-Sent Event
            return None
        try:
            message_id = json.loads(text)["id"]
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(message_id, str) or not realtime.ID_PATTERN.fullmatch(message_id):
            return None
        delivery = cls(text)
        vars(delivery)["id"] = message_id  # what cached_property would store: no second parse
        return delivery

    @cached_property
    def id(self) -> str:
        return str(json.loads(self.text)["id"])

    @cached_property
    def key(self) -> tuple[int, int]:
        return realtime.id_key(self.id)

    @cached_property
    def ws_frame(self) -> bytes:
        # Server frames are unmasked, so one encoding serves every client.
        return encode_text_frame(self.text)

    @cached_property
    def sse_event(self) -> bytes:
        return f"id: {self.id}\ndata: {self.text}\n\n".encode()


class GapNotice(Delivery):
    """Tells a resuming client that some of what it missed on a channel is older than the
    history keeps. It has no id: the client's last id stays where it was."""

    def __init__(self, channel: str) -> None:
        super().__init__(realtime.gap_notice(channel))
        self.channel = channel

    @cached_property
    def sse_event(self) -> bytes:
        # A named event: a page listening to plain "message" events never mistakes it.
        return f"event: gap\ndata: {self.text}\n\n".encode()


class Member(Protocol):
    last_heard: float

    def deliver(self, delivery: Delivery) -> None: ...

    def keepalive(self) -> None: ...

    def abort(self) -> None: ...


class Resume:
    """The live flow of a member, held until the member is ready to send, and the replay of
    what it missed if it reconnected with the last id it saw.

    It must exist before the member joins its channels: from then on every new message is
    in the history the replay reads, or arrives live, or both. Live ones are held until
    :meth:`replay`; after it, those the replay already sent are skipped (the history can be
    ahead of the live flow, which reaches this process a little later).
    """

    def __init__(self, since: str | None) -> None:
        self.since = since
        self.held: list[Delivery] | None = []
        self.sent_up_to: tuple[int, int] | None = None

    @property
    def caught_up(self) -> bool:
        """Nothing held, nothing to skip: live deliveries need no more checks."""
        return self.held is None and self.sent_up_to is None

    def admit(self, delivery: Delivery) -> bool:
        """True if a live delivery is to be sent now."""
        if self.held is not None:
            self.held.append(delivery)
            return False
        if isinstance(delivery, GapNotice):
            return True
        if self.sent_up_to is not None:
            if delivery.key <= self.sent_up_to:
                return False
            self.sent_up_to = None  # the live flow has caught up with the replay
        return True

    def replay(self, hub: Hub, channels: Iterable[str], send: Callable[[Delivery], None]) -> None:
        """Send what was published after ``since`` (if given), after a notice for each channel
        where the history no longer reaches back that far; then what was held meanwhile.
        From then on live deliveries are admitted."""
        last = None if self.since is None else realtime.id_key(self.since)
        try:
            if self.since is not None:
                missed = hub.history(channels, self.since)
                counters = hub.counters
                for channel in missed.gaps:
                    counters.gaps += 1
                    send(GapNotice(channel))
                for text in missed.envelopes:
                    delivery = Delivery(text)
                    last = max(last, delivery.key) if last else delivery.key
                    counters.replayed += 1
                    send(delivery)
            held = self.held or []
        finally:
            self.held = None
        self.sent_up_to = last
        for delivery in held:
            if self.admit(delivery):
                send(delivery)


@dataclass
class Recovery:
    """What a lost subscription owes its members: everything published after ``since`` on
    the channels they followed then. Live messages are held until the replay is done."""

    since: str
    members: dict[str, set[Member]]
    held: list[tuple[str, Delivery]] = field(default_factory=list)
    replayed_up_to: tuple[int, int] | None = None
    """Set once replayed: live messages up to it, still on their way from Redis (the history
    was read after they were published), went out in the replay already."""

    def resubscribed(self, hub: Hub) -> bool:
        """True once Redis confirmed again every channel that is still followed."""
        events = (hub.ready.get(channel) for channel in self.members if channel in hub.members)
        return all(event is None or event.is_set() for event in events)

    def listening(self, hub: Hub, channel: str) -> set[Member]:
        """Members that followed ``channel`` before the outage and still do."""
        return self.members.get(channel, set()) & hub.members.get(channel, set())

    def newcomers(self, hub: Hub, channel: str) -> set[Member]:
        return hub.members.get(channel, set()) - self.members.get(channel, set())


class Busy(Exception):
    """Too many clients are catching up at once: this one waited its turn for too long."""


class Hub:
    def __init__(self, redis_url: str, ping_interval: float,
                 history_limits: tuple[int, int] = realtime.DEFAULT_HISTORY,
                 on_crash: Callable[[gevent.Greenlet], None] = exit_process,
                 counting: bool = True) -> None:  # fmt: skip
        self.redis_url = redis_url
        self.ping_interval = ping_interval
        self.history_limits = history_limits
        self._side = realtime.connect(redis_url, pool_size=SIDE_CONNECTIONS,
                                      socket_timeout=SIDE_TIMEOUT,
                                      socket_connect_timeout=2)  # fmt: skip
        self.members: dict[str, set[Member]] = defaultdict(set)
        self.ready: dict[str, Event] = {}
        self.stopping = False
        self._changed = Event()
        self._listener: gevent.Greenlet | None = None
        self._on_crash = on_crash
        # Its own connection, short timeouts, no retry: a health check must answer quickly.
        self._probe = realtime.connect(redis_url, socket_timeout=2, socket_connect_timeout=2,
                                       retry=Retry(NoBackoff(), 0))  # fmt: skip
        self._replays = BoundedSemaphore(REPLAYS)  # of more than FEW_CHANNELS channels
        self._few_channel_replays = BoundedSemaphore(REPLAYS)
        self.bad_messages = 0
        self.counters = Counters()
        if not counting:  # no metrics served: the fan-out skips even its two additions
            self.fan_out = self._fan_out_uncounted  # type: ignore[method-assign]
        self._subscribed_before = False
        self.position: str | None = None  # the id of the last message fanned out
        self._recovery: Recovery | None = None
        self._replayed: Recovery | None = None  # until the live flow passes its replay
        self._connected = False
        self._bad_unlogged = 0
        self._bad_logged_at = -BAD_MESSAGE_LOG_INTERVAL

    def start(self) -> None:
        self._listener = self._spawn_for_life(self._listen_forever, "the Redis listener")
        self._spawn_for_life(self._ping_forever, "the pinger")

    def _spawn_for_life(self, run: Callable[[], None], name: str) -> gevent.Greenlet:
        greenlet = gevent.Greenlet(run)
        greenlet.name = name
        greenlet.link_exception(self._on_crash)
        greenlet.start()
        return greenlet

    @property
    def subscribed(self) -> bool:
        """The Redis subscription is open (or being opened again)."""
        return self._connected

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.dead

    def trouble(self) -> str | None:
        """Why this worker cannot deliver now, in a few words; None if it can."""
        if not self.listening:
            return "the Redis listener has stopped"
        if not self._connected:
            return "not subscribed to Redis (reconnecting)"
        try:
            self._probe.ping()
        except redis.RedisError as e:
            return f"Redis does not answer: {realtime.describe_error(e)}"
        return None

    def stop(self) -> None:
        self.stopping = True
        if self._listener is not None:
            self._listener.kill(block=False)

    def join(self, channels: Iterable[str], member: Member, timeout: float = 5.0) -> bool:
        """Add a member to channels; True once Redis confirmed every subscription, so that
        nothing published from then on can be missed."""
        events = []
        for channel in channels:
            self.members[channel].add(member)
            events.append(self.ready.setdefault(channel, Event()))
        if not all(e.is_set() for e in events):
            self._changed.set()
        deadline = time.monotonic() + timeout
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in events)

    def leave(self, channels: Iterable[str], member: Member) -> None:
        for channel in channels:
            members = self.members.get(channel)
            if members is None:
                continue
            members.discard(member)
            if not members:
                # The subscription (and its ready event) stays until the listener drops it,
                # so a member that joins again meanwhile is served at once.
                del self.members[channel]
                self._changed.set()

    def history(self, channels: Iterable[str], since: str) -> realtime.Missed:
        """What was published on ``channels`` after ``since``, and where the history fell short;
        one client's replay, in turn with the others'."""
        channels = list(channels)
        lane = self._few_channel_replays if len(channels) <= FEW_CHANNELS else self._replays
        if not lane.acquire(timeout=REPLAY_WAIT):
            raise Busy("too many clients are catching up at once; try again")
        try:
            return realtime.history(self._side, channels, since, self.history_limits)
        finally:
            lane.release()

    def publish(self, channel: str, data_json: str) -> None:
        realtime.publish_json(self._side, channel, data_json, self.history_limits)

    def all_members(self) -> set[Member]:
        return {m for members in self.members.values() for m in members}

    def _ping_forever(self) -> None:
        """Ping every member; drop those silent for two intervals (a dead peer, a lost route)."""
        while not self.stopping:
            gevent.sleep(self.ping_interval)
            deadline = time.monotonic() - 2 * self.ping_interval
            for member in self.all_members():
                if member.last_heard < deadline:
                    member.abort()
                else:
                    member.keepalive()

    def fan_out(self, channel: str, delivery: Delivery) -> None:
        members = list(self.members.get(channel, ()))
        counters = self.counters
        counters.received += 1
        counters.delivered += len(members)
        for member in members:
            member.deliver(delivery)

    def _fan_out_uncounted(self, channel: str, delivery: Delivery) -> None:
        for member in list(self.members.get(channel, ())):
            member.deliver(delivery)

    # --- the listener greenlet ------------------------------------------------------------

    def _listen_forever(self) -> None:
        delay = BACKOFF_MIN
        while not self.stopping:
            self._connected = False
            try:
                self._listen()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                if self._connected:
                    delay = BACKOFF_MIN  # a new outage: not the next try of the last one
                self._lost()
                pause = delay * random.uniform(0.5, 1.5)
                log.warning("Redis subscription lost (%s); reconnecting in %.1f s",
                            realtime.describe_error(e), pause)  # fmt: skip
                gevent.sleep(pause)
                delay = min(delay * 2, BACKOFF_MAX)

    def _listen(self) -> None:
        # No retries inside redis-py: it would resubscribe behind our back, and what was
        # published meanwhile would be lost without anyone knowing.
        # Through Sentinel, a new connection goes to whichever Redis is the primary now.
        connection = realtime.connect(self.redis_url, retry=Retry(NoBackoff(), 0),
                                      socket_connect_timeout=2)  # fmt: skip
        # The side connections may be to a Redis that is gone, silently: start them afresh.
        self._side.connection_pool.disconnect()
        pubsub = connection.pubsub()
        subscribed: set[str] = set()
        heard = pinged = time.monotonic()
        try:
            pubsub.subscribe(IDLE_CHANNEL)
            # A promoted replica may be behind the ids this worker delivered: it must never
            # issue them again. Where the first clients start if none was delivered yet.
            last = realtime.raise_last_id(connection, self.position or "0-0")
            self.position = self.position or last
            self._connected = True
            if self._subscribed_before:
                self.counters.redis_reconnects += 1
            self._subscribed_before = True
            self._changed.set()
            while not self.stopping:
                if self._changed.is_set():
                    self._changed.clear()
                    subscribed = self._reconcile(pubsub, subscribed)
                message = pubsub.get_message(timeout=POLL)
                now = time.monotonic()
                if message is not None:
                    heard = now
                    if message["type"] != "pong":
                        self._dispatch(message)
                elif now - heard > LIVENESS_TIMEOUT:
                    raise redis.ConnectionError(
                        f"Redis sent nothing for {LIVENESS_TIMEOUT:.0f} s, not even a pong"
                    )
                elif now - max(heard, pinged) > LIVENESS_PING:
                    pubsub.ping()
                    pinged = now
                if self._recovery is not None and self._recovery.resubscribed(self):
                    self._recover(self._recovery)
        finally:
            pubsub.close()
            connection.close()

    def _lost(self) -> None:
        """The subscription is gone: remember who was listening to what, and from which id,
        so that what is published until the next subscription is replayed to them."""
        self._forget_subscriptions()
        self._replayed = None
        if self.position is None or not self.members:
            return
        members = {channel: set(members) for channel, members in self.members.items()}
        if self._recovery is None:
            self._recovery = Recovery(self.position, members)
        else:  # lost again before the replay: it still starts from the same id
            for channel, listening in members.items():
                self._recovery.members.setdefault(channel, set()).update(listening)
            self._recovery.held.clear()  # these are in the history the replay reads

    def _recover(self, recovery: Recovery) -> None:
        """Every channel is subscribed again: send each member what was published on its
        channels meanwhile, oldest first, then what arrived live during the replay."""
        channels = [channel for channel in recovery.members if channel in self.members]
        try:
            missed = realtime.history(self._side, channels, recovery.since, self.history_limits)
        except realtime.UnknownId:  # this Redis lost its data: nothing left to replay
            missed = realtime.Missed([], channels)
        self._recovery = None
        for channel in missed.gaps:
            self.counters.gaps += self._deliver_to(recovery.listening(self, channel),
                                                   GapNotice(channel))  # fmt: skip
        replayed_up_to = realtime.id_key(recovery.since)
        for text in missed.envelopes:
            delivery = Delivery(text)
            channel = json.loads(text)["channel"]
            self.counters.replayed += self._deliver_to(recovery.listening(self, channel), delivery)
            replayed_up_to = delivery.key
            self.position = delivery.id
        recovery.replayed_up_to = replayed_up_to
        self._replayed = recovery
        for channel, delivery in recovery.held:
            self._fan_out_live(channel, delivery)
        log.info("subscribed again after losing Redis: replayed %d message(s) on %d channel(s) "
                 "published since %s%s", len(missed.envelopes), len(channels), recovery.since,
                 f"; gaps on {', '.join(missed.gaps)}" if missed.gaps else "")  # fmt: skip

    @staticmethod
    def _deliver_to(members: Iterable[Member], delivery: Delivery) -> int:
        """Deliver to each of ``members``; how many there were."""
        count = 0
        for member in members:
            member.deliver(delivery)
            count += 1
        return count

    def _forget_subscriptions(self) -> None:
        # The connection is gone, and its subscriptions with it: joiners wait again until
        # the next connection confirms them.
        for channel in list(self.ready):
            if channel in self.members:
                self.ready[channel].clear()
            else:
                del self.ready[channel]

    def _reconcile(self, pubsub: Any, subscribed: set[str]) -> set[str]:
        wanted = set(self.members)
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
            text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
            delivery = Delivery.from_bus(text)
            if delivery is None:
                self._skip_bad_message(key)
            elif self._recovery is not None:
                self._recovery.held.append((channel, delivery))
            else:
                self._fan_out_live(channel, delivery)

    def _fan_out_live(self, channel: str, delivery: Delivery) -> None:
        replayed = self._replayed
        if replayed is not None and replayed.replayed_up_to is not None:
            if delivery.key <= replayed.replayed_up_to:
                # Replayed, to those who listened before the outage; not yet to the others.
                self.counters.received += 1
                self.counters.delivered += self._deliver_to(replayed.newcomers(self, channel),
                                                            delivery)  # fmt: skip
                return
            self._replayed = None  # the live flow has passed the replay
        self.fan_out(channel, delivery)
        self.position = delivery.id

    def _skip_bad_message(self, key: str) -> None:
        self.bad_messages += 1
        self._bad_unlogged += 1
        now = time.monotonic()
        if now - self._bad_logged_at >= BAD_MESSAGE_LOG_INTERVAL:
            log.warning("skipped %d message(s) not published by stackctl.realtime (one line of "
                        "JSON with an \"id\"), the latest on Redis channel %s; %d since start",
                        self._bad_unlogged, key, self.bad_messages)  # fmt: skip
            self._bad_unlogged = 0
            self._bad_logged_at = now
