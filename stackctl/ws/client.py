"""One websocket client of the gevent worker: framing by wsproto, writes through a bounded queue.

Broadcast frames arrive already encoded (server frames are unmasked, so one encoding serves
every client). A client whose queue is full is too far behind: it is closed (1013) rather than
allowed to grow the worker's memory; one that sends a message over the limit is closed (1009).
"""

from __future__ import annotations

import logging
import socket
import time
from contextlib import suppress
from typing import Any

import gevent
from gevent.queue import Full, Queue
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import CloseConnection, Message, Ping
from wsproto.utilities import ProtocolError

log = logging.getLogger("stackctl.ws")

MESSAGE_TOO_BIG = 1009
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013
CLOSE_WAIT = 5.0
_STOP = b""


class Client:
    def __init__(
        self, sock: socket.socket, channel: str, queue_limit: int, max_message: int
    ) -> None:
        self.sock = sock
        self.channel = channel
        self.max_message = max_message
        self.protocol = Connection(ConnectionType.SERVER)
        self.outbox: Queue[bytes] = Queue(maxsize=queue_limit)
        self.closing = False
        self.last_heard = time.monotonic()
        self.incoming = 0  # bytes of the message being received

    def send_frame(self, frame: bytes) -> None:
        """Queue an encoded frame without ever blocking the caller (the fan-out loop)."""
        if self.closing:
            return
        try:
            self.outbox.put_nowait(frame)
        except Full:
            log.warning(
                "closing a client of %r that is %d frames behind", self.channel, self.outbox.qsize()
            )
            self.abort()

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the reader loop ends when the client answers."""
        if self.closing or self.protocol.state != ConnectionState.OPEN:
            return
        frame = self.protocol.send(CloseConnection(code=code, reason=reason))
        self.closing = True
        self._force_put(frame)
        gevent.spawn_later(CLOSE_WAIT, self.abort)

    def abort(self) -> None:
        self.closing = True
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def serve(self) -> None:
        """Read until the client leaves; answer pings and the closing handshake."""
        writer = gevent.spawn(self._write_loop)
        try:
            self._read_loop()
        except (OSError, ProtocolError):
            pass
        finally:
            self.closing = True
            self._force_put(_STOP)
            writer.join(timeout=CLOSE_WAIT)
            writer.kill(block=False)

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
        # Pings and the client's close get their answer. Messages from clients are not
        # accepted (publishing goes through the app), but their size is still bounded.
        if isinstance(event, Ping) or (
            isinstance(event, CloseConnection)
            and self.protocol.state == ConnectionState.REMOTE_CLOSING
        ):
            self._force_put(self.protocol.send(event.response()))
        elif isinstance(event, Message):
            self.incoming += len(event.data)
            if self.incoming > self.max_message:
                self.close(MESSAGE_TOO_BIG, f"messages are limited to {self.max_message} bytes")
            elif event.message_finished:
                self.incoming = 0

    def _force_put(self, frame: bytes) -> None:
        # Control frames must go out even to a client whose queue is full.
        while True:
            try:
                self.outbox.put_nowait(frame)
                return
            except Full:
                self.outbox.get_nowait()

    def _write_loop(self) -> None:
        try:
            while True:
                frame = self.outbox.get()
                if frame is _STOP:
                    return
                self.sock.sendall(frame)
        except OSError:
            self.abort()
