"""One websocket client of the gevent worker: framing by wsproto, writes through a bounded queue.

A client follows one or more channels. One that reconnects with ``?since=<last id>`` first
gets what it missed from the channels' history, then the live flow: live messages that arrive
during the replay are held back and sent after it, skipping any the replay already sent, so
nothing is lost or doubled.

A client whose queue is full is too far behind: it is closed (1013) rather than allowed to
grow the worker's memory; one that sends a message over the limit is closed (1009).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from contextlib import suppress
from typing import Any

import gevent
import redis
from gevent.queue import Full, Queue
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import FrameProtocol
from wsproto.utilities import ProtocolError

from stackctl.realtime import CHANNEL_PATTERN
from stackctl.ws.access import Rules, Subscription
from stackctl.ws.hub import Delivery, Hub, Resume, encode_text_frame

log = logging.getLogger("stackctl.ws")

MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013
CLOSE_WAIT = 5.0
PING_FRAME = bytes(FrameProtocol(client=False, extensions=[]).ping())
_STOP = b""


class Client:
    def __init__(self, sock: socket.socket, subscription: Subscription, hub: Hub, rules: Rules,
                 queue_limit: int, max_message: int) -> None:  # fmt: skip
        self.sock = sock
        self.subscription = subscription
        self.hub = hub
        self.rules = rules
        self.max_message = max_message
        self.protocol = Connection(ConnectionType.SERVER)
        self.outbox: Queue[bytes] = Queue(maxsize=queue_limit)
        self.resume = Resume(subscription.since)
        self.closing = False
        self.last_heard = time.monotonic()
        self.incoming: list[str] = []  # the parts of the message being received
        self.incoming_size = 0

    # --- what the hub calls -----------------------------------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        if self.resume.admit(delivery):
            self.send_frame(delivery.ws_frame)
        elif self.resume.held is not None and len(self.resume.held) > self.outbox.maxsize:
            self._fell_behind()

    def keepalive(self) -> None:
        self.send_frame(PING_FRAME)

    def abort(self) -> None:
        self.closing = True
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # --- sending ----------------------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """Queue an encoded frame without ever blocking the caller (the fan-out loop)."""
        if self.closing:
            return
        try:
            self.outbox.put_nowait(frame)
        except Full:
            self._fell_behind()

    def _fell_behind(self) -> None:
        log.warning("closing a client of %s that fell %d messages behind",
                    ",".join(self.subscription.channels), self.outbox.maxsize)  # fmt: skip
        self.close(TRY_AGAIN_LATER, "too far behind")

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the reader loop ends when the client answers."""
        if self.closing or self.protocol.state != ConnectionState.OPEN:
            return
        frame = self.protocol.send(CloseConnection(code=code, reason=reason))
        self.closing = True
        self._force_put(frame)
        gevent.spawn_later(CLOSE_WAIT, self.abort)

    def _force_put(self, frame: bytes) -> None:
        """Queue a control frame even when the queue is full, by dropping *every* pending
        message: dropping only the oldest would leave a gap that the client, resuming from
        the last id it got, could never see."""
        try:
            self.outbox.put_nowait(frame)
        except Full:
            while not self.outbox.empty():
                self.outbox.get_nowait()
            self.outbox.put_nowait(frame)

    # --- the connection's life --------------------------------------------------------------

    def serve(self) -> None:
        """Replay what the client missed, then read until it leaves."""
        writer = gevent.spawn(self._write_loop)
        try:
            self._replay()
            self._read_loop()
        except (OSError, ProtocolError):
            pass
        finally:
            self.closing = True
            self._force_put(_STOP)
            writer.join(timeout=CLOSE_WAIT)
            writer.kill(block=False)

    def _replay(self) -> None:
        try:
            self.resume.replay(self.hub, self.subscription.channels,
                               lambda delivery: self.send_frame(delivery.ws_frame))  # fmt: skip
        except redis.RedisError as e:
            log.warning("replay failed: %s", e)
            self.close(INTERNAL_ERROR, "history unavailable, reconnect")

    def _read_loop(self) -> None:
        while True:
            data = self.sock.recv(65536)
            self.last_heard = time.monotonic()
            self.protocol.receive_data(data or None)
            for event in self.protocol.events():
                self._handle(event)
            if not data or self.protocol.state == ConnectionState.CLOSED:
                return

    def _handle(self, event: Any) -> None:
        if isinstance(event, Ping) or (
            isinstance(event, CloseConnection)
            and self.protocol.state == ConnectionState.REMOTE_CLOSING
        ):
            self._force_put(self.protocol.send(event.response()))
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
                self._publish(text)

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
        else:
            try:
                self.hub.publish(channel, json.dumps(data))
            except redis.RedisError:
                self._tell("the message bus is not reachable; not published")

    def _tell(self, error: str) -> None:
        self.send_frame(encode_text_frame(json.dumps({"error": error})))

    def _write_loop(self) -> None:
        try:
            while True:
                frame = self.outbox.get()
                if frame is _STOP:
                    return
                self.sock.sendall(frame)
        except OSError:
            self.abort()
