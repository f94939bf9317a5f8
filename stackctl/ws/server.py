"""The websocket worker: chaussette's gevent server with a handler that speaks websocket.

Chaussette 1.3 registers its gevent backends only on Python 2, but its gevent ``Server``
works on Python 3; we register a subclass of it under the name ``gevent`` (so that chaussette
still monkey-patches first), give it our handler, and let chaussette's ``main()`` take the
Circus socket by fd.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import socket
import sys
from typing import Any
from urllib.parse import unquote

import gevent
from chaussette.backend import _gevent as chaussette_gevent
from gevent.pywsgi import WSGIServer
from wsproto.utilities import generate_accept_token

from stackctl.realtime import CHANNEL_PATTERN, REDIS_URL_VARIABLE
from stackctl.ws.client import SERVICE_RESTART, Client
from stackctl.ws.hub import Hub

log = logging.getLogger("stackctl.ws")


class Worker:
    """What the handler needs: the URL prefix, the limits and the hub. One per process."""

    prefix = "/ws/"
    max_message = 65536
    max_connections = 10000
    queue_limit = 256
    hub: Hub | None = None


def channel_of(path: str) -> str | None:
    if not path.startswith(Worker.prefix):
        return None
    channel = unquote(path[len(Worker.prefix) :])
    return channel if CHANNEL_PATTERN.fullmatch(channel) else None


def plain_http(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Answers requests that are not websocket upgrades."""
    body = b"this endpoint speaks websocket: connect with Upgrade: websocket\n"
    start_response(
        "426 Upgrade Required",
        [
            ("Content-Type", "text/plain"),
            ("Upgrade", "websocket"),
            ("Content-Length", str(len(body))),
        ],
    )
    return [body]


class WebSocketHandler(chaussette_gevent.CustomWSGIHandler):
    def run_application(self) -> None:
        environ = self.environ
        if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            super().run_application()
            return
        self.close_connection = True
        channel = channel_of(environ.get("PATH_INFO", ""))
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY")
        if channel is None or key is None or environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
            self._reject(
                "400 Bad Request", b"expected a websocket handshake for /<prefix>/<channel>\n"
            )
            return
        hub = Worker.hub
        assert hub is not None
        if hub.client_count() >= Worker.max_connections:
            self._reject("503 Service Unavailable", b"this worker holds its maximum of clients\n")
            return
        client = Client(self.socket, channel, Worker.queue_limit, Worker.max_message)
        try:
            if not hub.join(channel, client):
                self._reject("503 Service Unavailable", b"the message bus is not reachable\n")
                return
            self.status = "101 Switching Protocols"
            self.socket.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + generate_accept_token(key.encode()) + b"\r\n\r\n"
            )
            client.serve()
        finally:
            hub.leave(channel, client)

    def _reject(self, status: str, body: bytes) -> None:
        self.start_response(
            status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        self.write(body)


class WebSocketServer(chaussette_gevent.Server):
    handler_class = WebSocketHandler

    def __init__(self, listener: tuple[str, int], application: Any, **kwargs: Any) -> None:
        # Chaussette's own socket set-up refuses fd:// together with AF_UNIX; adopting the
        # Circus fd directly lets the kernel tell its family.
        host, _ = listener
        if not host.startswith("fd://"):
            raise SystemExit("the websocket worker serves only the socket circusd passes (--fd)")
        self.socket = socket.socket(fileno=int(host[len("fd://") :]))
        self.socket.setblocking(False)
        self.address_family = self.socket.family
        self.server_address = self.socket.getsockname()
        WSGIServer.__init__(
            self,
            self.socket,
            application,
            handler_class=self.handler_class,
            log=kwargs.get("log", "default"),
        )
        self.stop_timeout = kwargs.get("graceful_timeout") or 30
        # gevent runs these callbacks in the event loop, not in signal context.
        gevent.signal_handler(signal.SIGTERM, self.shut_down)
        gevent.signal_handler(signal.SIGINT, self.shut_down)

    def shut_down(self) -> None:
        gevent.spawn(self._shut_down)

    def _shut_down(self) -> None:
        log.info(
            "stopping: closing %d websocket clients",
            len(Worker.hub.all_clients()) if Worker.hub else 0,
        )
        self.close()  # stop accepting: the next process takes the Circus socket's queue
        if Worker.hub is not None:
            for client in Worker.hub.all_clients():
                client.close(SERVICE_RESTART, "server restarting")
        self.stop(timeout=self.stop_timeout)
        if Worker.hub is not None:
            Worker.hub.stop()


def raise_open_files_limit() -> None:
    """One descriptor per client: allow as many as the hard limit lets this process have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stackctl.ws")
    parser.add_argument("--fd", type=int, required=True, help="listening socket held by circusd")
    parser.add_argument("--prefix", default="/ws/")
    parser.add_argument("--graceful-timeout", type=int, default=30)
    parser.add_argument("--ping-interval", type=float, default=20)
    parser.add_argument("--max-message", type=int, default=65536)
    parser.add_argument("--max-connections", type=int, default=10000)
    parser.add_argument("--queue-limit", type=int, default=256)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s ws[%(process)d] %(levelname)s %(message)s"
    )

    raise_open_files_limit()
    Worker.prefix = args.prefix
    Worker.max_message = args.max_message
    Worker.max_connections = args.max_connections
    Worker.queue_limit = args.queue_limit
    Worker.hub = Hub(os.environ[REDIS_URL_VARIABLE], args.ping_interval)
    Worker.hub.start()

    from chaussette import backend
    from chaussette.server import main as chaussette_main

    backend.register("gevent", WebSocketServer)
    sys.argv = [
        "chaussette",
        "--fd",
        str(args.fd),
        "--backend",
        "gevent",
        "--graceful-timeout",
        str(args.graceful_timeout),
        "stackctl.ws.server.plain_http",
    ]
    chaussette_main()
    return 0
