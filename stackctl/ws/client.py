"""One websocket client of the gevent worker, driven by event-loop callbacks.

After the handshake (and the replay of what a reconnecting client missed) the client needs no
greenlet of its own: a read watcher on its socket feeds wsproto, and the fan-out writes the
broadcast frame, encoded once for everyone, straight to the socket. Only what the kernel will
not take at once waits in a short per-client queue, flushed by a write watcher. That keeps an
idle connection down to a few objects, so that one process holds ten thousand of them.

A client whose queue passes the limit is too far behind: it is closed (1013) rather than
allowed to grow the worker's memory; one that sends a message over the limit is closed (1009).
"""

from __future__ import annotations

import _socket
import errno
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
import redis
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import FrameProtocol
from wsproto.utilities import ProtocolError

from stackctl.realtime import CHANNEL_PATTERN, UnknownId
from stackctl.ws.access import Refused, Rules, Subscription, check_allowed
from stackctl.ws.hub import Busy, Delivery, Hub, Resume, encode_text_frame

log = logging.getLogger("stackctl.ws")

POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013
# Application-defined (4000-4999): realtime.js reconnects at once, asking for a fresh token.
TOKEN_EXPIRED = 4401
CLOSE_WAIT = 5.0
READ_SIZE = 65536
PING_FRAME = bytes(FrameProtocol(client=False, extensions=[]).ping())
WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)
READ, WRITE = 1, 2  # libev's event masks


class Client:
    __slots__ = ("sock", "fd", "subscription", "hub", "rules", "queue_limit", "max_message",
                 "protocol", "pending", "resume", "closing", "closed", "last_heard",
                 "incoming", "incoming_size", "reader", "writer", "expiry", "on_close")  # fmt: skip

    def __init__(self, subscription: Subscription, hub: Hub, rules: Rules, queue_limit: int,
                 max_message: int) -> None:  # fmt: skip
        self.sock: _socket.socket | None = None  # until the handshake is done: see start()
        self.fd = -1
        self.subscription = subscription
        self.hub = hub
        self.rules = rules
        self.queue_limit = queue_limit
        self.max_message = max_message
        self.protocol = Connection(ConnectionType.SERVER)
        self.pending: deque[bytes] = deque()  # what the socket did not take yet
        self.resume: Resume | None = Resume(subscription.since)
        self.closing = False  # our close frame is queued: send nothing more
        self.closed = False
        self.last_heard = time.monotonic()
        self.incoming: list[str] = []  # the parts of the message being received
        self.incoming_size = 0
        self.reader: Any = None
        self.writer: Any = None
        self.expiry: Any = None  # an event-loop timer: no greenlet per client
        self.on_close: Callable[[Client], None] | None = None

    # --- what the hub calls -----------------------------------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        resume = self.resume
        if resume is not None:
            if not resume.admit(delivery):
                if resume.held is not None and len(resume.held) > self.queue_limit:
                    self._fell_behind()
                return
            if resume.caught_up:
                self.resume = None  # from now on, every delivery goes straight out
        self.send_frame(delivery.ws_frame)

    def keepalive(self) -> None:
        self.send_frame(PING_FRAME)

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake."""
        if self.closed:
            return
        self.closed = self.closing = True
        for watcher in (self.reader, self.writer, self.expiry):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self.reader = self.writer = self.expiry = None
        self.pending.clear()
        if self.sock is not None:
            self.sock.close()
        if self.on_close is not None:
            self.on_close(self)

    # --- sending ----------------------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """Write a frame now if the socket takes it; never block the caller (the fan-out).

        Called for every client of a channel for every message: the usual case (nothing
        pending, the kernel takes the whole frame) costs one system call.
        """
        if self.closing:
            return
        if self.pending and len(self.pending) >= self.queue_limit:
            self._fell_behind()
            return
        self._send(frame)

    def _send(self, frame: bytes) -> None:
        if self.pending or self.sock is None:
            self.pending.append(frame)
            return
        try:
            sent = self.sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.abort()
            return
        if sent < len(frame):
            self.pending.append(frame[sent:])
            self._start_writer()

    def _start_writer(self) -> None:
        if self.writer is None and not self.closed:
            self.writer = gevent.get_hub().loop.io(self.fd, WRITE)
            self.writer.start(self._flush)

    def _flush(self) -> None:
        """The socket can take more: send what waits, in order."""
        assert self.sock is not None
        try:
            while self.pending:
                frame = self.pending[0]
                sent = self.sock.send(frame)
                if sent < len(frame):
                    self.pending[0] = frame[sent:]
                    return
                self.pending.popleft()
        except BlockingIOError:
            return
        except OSError:
            self.abort()
            return
        if self.writer is not None:
            self.writer.stop()
            self.writer.close()
            self.writer = None

    def _fell_behind(self) -> None:
        counters = self.hub.counters
        counters.slow_closed += 1
        held = self.resume.held if self.resume is not None else None
        counters.dropped += max(0, len(self.pending) - 1) + len(held or ())
        log.warning("closing a client of %s that fell %d messages behind",
                    ",".join(self.subscription.channels), self.queue_limit)  # fmt: skip
        # Drop every pending message, not just the oldest: a gap in the middle could never be
        # seen by a client that resumes from the last id it received.
        if self.pending:
            self.pending = deque([self.pending[0]])  # a partly sent frame must be finished
        self.close(TRY_AGAIN_LATER, "too far behind")

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the connection is dropped when the client answers,
        or after CLOSE_WAIT seconds."""
        if self.closing or self.protocol.state != ConnectionState.OPEN:
            return
        frame = self.protocol.send(CloseConnection(code=code, reason=reason))
        self.closing = True
        self._send(frame)
        gevent.spawn_later(CLOSE_WAIT, self.abort)

    # --- the connection's life --------------------------------------------------------------

    def start(self, sock: _socket.socket) -> None:
        """Take the socket once the handshake is sent; replay what the client missed (in the
        handshake's greenlet), then hand the socket to the event loop."""
        sock.setblocking(False)
        self.sock, self.fd = sock, sock.fileno()
        if self.pending:  # a close decided during the handshake
            self._start_writer()
        assert self.resume is not None
        try:
            self.resume.replay(self.hub, self.subscription.channels,
                               lambda delivery: self.send_frame(delivery.ws_frame))  # fmt: skip
        except UnknownId as e:
            self.close(POLICY_VIOLATION, str(e))
        except Busy as e:
            self.close(TRY_AGAIN_LATER, str(e))
        except redis.RedisError as e:
            log.warning("replay failed: %s", e)
            self.close(INTERNAL_ERROR, "history unavailable, reconnect")
        if self.resume.caught_up:
            self.resume = None
        if not self.closed:
            loop = gevent.get_hub().loop
            self.reader = loop.io(self.fd, READ)
            self.reader.start(self._on_readable)
            if self.subscription.expires is not None:
                self.expiry = loop.timer(max(0.0, self.subscription.expires - time.time()))
                self.expiry.start(self.close, TOKEN_EXPIRED, "token expired")

    def _on_readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(READ_SIZE)
        except OSError as e:
            if e.errno not in WOULD_BLOCK:
                self.abort()
            return
        self.last_heard = time.monotonic()
        try:
            self.protocol.receive_data(data or None)
            for event in self.protocol.events():
                self._handle(event)
        except ProtocolError:
            self.abort()
            return
        if not data or self.protocol.state == ConnectionState.CLOSED:
            self.abort()

    def _handle(self, event: Any) -> None:
        if isinstance(event, Ping):
            # Through the queue's limit: a client that pings and never reads would otherwise
            # grow the worker by a pong per ping. No pong once our close frame is queued.
            if not self.closing:
                self.send_frame(self.protocol.send(event.response()))
        elif (
            isinstance(event, CloseConnection)
            and self.protocol.state == ConnectionState.REMOTE_CLOSING
        ):
            self._send(self.protocol.send(event.response()))
        elif isinstance(event, Message):
            self.incoming_size += len(event.data)
            if self.incoming_size > self.max_message:
                self.incoming = []
                self.close(MESSAGE_TOO_BIG, f"messages are limited to {self.max_message} bytes")
                return
            if isinstance(event, TextMessage):
                self.incoming.append(event.data)
            if event.message_finished:
                text = "".join(self.incoming)
                self.incoming, self.incoming_size = [], 0
                # Publishing talks to Redis: not in an event-loop callback.
                gevent.spawn(self._publish, text)

    def _publish(self, text: str) -> None:
        """A client's message: {"channel": ..., "data": ...}, if the profile lets it publish."""
        try:
            message = json.loads(text)
            channel, data = message["channel"], message["data"]
        except (ValueError, TypeError, KeyError):
            self._tell('expected {"channel": ..., "data": ...}')
            return
        if not isinstance(channel, str) or not CHANNEL_PATTERN.fullmatch(channel):
            self._tell("not a channel name")
        elif not self.rules.may_publish(channel):
            self._tell(f"clients may not publish to {channel!r}")
        elif refusal := self._private(channel):
            self._tell(refusal)
        else:
            try:
                self.hub.publish(channel, json.dumps(data))
                self.hub.counters.client_published += 1
            except redis.RedisError:
                self._tell("the message bus is not reachable; not published")

    def _private(self, channel: str) -> str | None:
        """Why this connection may not publish to ``channel``, if it may not follow it either:
        a pattern such as "*" opens channels to clients, never someone else's private ones."""
        try:
            check_allowed((channel,), self.subscription.user, self.subscription.groups)
        except Refused as e:
            return e.reason
        return None

    def _tell(self, error: str) -> None:
        self.send_frame(encode_text_frame(json.dumps({"error": error})))
