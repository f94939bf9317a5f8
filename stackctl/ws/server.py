"""The realtime worker: chaussette's gevent server, with a handler that speaks websocket and
a WSGI app for the Server-Sent Events and long-poll fallbacks.

Chaussette 1.3 registers its gevent backends only on Python 2, but its gevent ``Server``
works on Python 3; we register a subclass of it under the name ``gevent`` (so that chaussette
still monkey-patches first), give it our handler, and let chaussette's ``main()`` take the
Circus socket by fd.
"""

from __future__ import annotations

import _socket
import argparse
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import redis
from chaussette.backend import _gevent as chaussette_gevent
from gevent.pywsgi import WSGIServer
from wsproto.utilities import generate_accept_token

from stackctl import realtime
from stackctl.readiness import mark_ready
from stackctl.realtime import REDIS_URL_VARIABLE
from stackctl.settings import BY_KEY, Setting
from stackctl.ws import counters
from stackctl.ws.access import Refused, Rules, subscription
from stackctl.ws.client import SERVICE_RESTART, Client
from stackctl.ws.fallbacks import EventStream, poll_answer, poll_wait, sse_headers
from stackctl.ws.hub import Busy, Hub

log = logging.getLogger("stackctl.ws")

READY_PATIENCE = 10.0
"""Seconds a new worker waits for its Redis subscription before it says it is ready."""
SUBSCRIBING_PATIENCE = 1.0
"""Seconds a health check waits for a subscription being opened (a worker just started, or
reconnecting): a blip is not a failure, and the check's client waits 1.5 s."""
BUS_DOWN = b"the message bus is not reachable\n"
FULL = b"this worker holds its maximum of clients\n"
NOT_WEBSOCKET = b"this endpoint speaks websocket: connect with Upgrade: websocket\n"


@dataclass
class Worker:
    """What the handlers need: URL prefixes, limits, rules and the hub. One per process.
    Its settings come from the command line, whose defaults are the profile's (see OPTIONS)."""

    hub: Hub
    rules: Rules
    prefix: str
    sse_prefix: str
    poll_prefix: str
    max_message: int
    max_connections: int
    queue_limit: int
    connections: int = 0


# The worker's options are profile settings: each flag, default and help text comes from the
# setting's one declaration in stackctl.settings (stackctl.render.circus passes the values).
OPTIONS = ("ws.prefix", "ws.sse_prefix", "ws.poll_prefix", "ws.ping_interval",
           "ws.max_message", "ws.max_connections", "ws.queue_limit", "ws.token_max_age",
           "wsgi.graceful_timeout")  # fmt: skip
REPEATED_OPTIONS = {"ws.allowed_origins": "--allowed-origin",
                    "ws.client_publish": "--client-publish"}  # fmt: skip


def option_flag(setting: Setting) -> str:
    return "--" + setting.field.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(prog="python -m stackctl.ws")
    options.add_argument("--fd", type=int, required=True, help="listening socket held by circusd")
    options.add_argument("--metrics-socket", type=Path, default=None,
                         help="unix socket to tell the exporter this worker's counters on; "
                         "without it the worker counts nothing it need not")  # fmt: skip
    for key in OPTIONS:
        setting = BY_KEY[key]
        options.add_argument(option_flag(setting), type=type(setting.default),
                             default=setting.default, help=setting.help)  # fmt: skip
    for key, flag in REPEATED_OPTIONS.items():
        setting = BY_KEY[key]
        options.add_argument(flag, action="append", default=list(setting.default),
                             help=f"{setting.help} (once per item)")  # fmt: skip
    return options


worker: Worker | None = None


def current_worker() -> Worker:
    assert worker is not None, "main() sets up the worker before serving"
    return worker


def answer(start_response: Any, status: str, body: bytes,
           content_type: str = "text/plain") -> list[bytes]:  # fmt: skip
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """Plain HTTP requests: the SSE and long-poll fallbacks; anything else wants a websocket."""
    try:
        return serve(environ, start_response)
    except Exception:
        # Logged here, without the query string: gevent would print the whole environ, and
        # with it the client's ?token=.
        log.exception("%s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
        return answer(start_response, "500 Internal Server Error", b"internal error\n")


def serve(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    w = current_worker()
    path = environ.get("PATH_INFO", "")
    if path == w.prefix + realtime.HEALTH_PATH:
        return health(w, start_response)
    if not (path.startswith(w.sse_prefix) or path.startswith(w.poll_prefix)):
        return answer(start_response, "426 Upgrade Required", NOT_WEBSOCKET)
    # Counted from the start, like a websocket: a long poll holds the worker as long as one.
    if w.connections >= w.max_connections:
        return answer(start_response, "503 Service Unavailable", FULL)
    w.connections += 1
    try:
        body = serve_fallback(w, path, environ, start_response)
    except BaseException:
        w.connections -= 1
        raise
    return Counted(w, body)


def serve_fallback(w: Worker, path: str, environ: dict[str, Any],
                   start_response: Any) -> Iterable[bytes]:  # fmt: skip
    try:
        if path.startswith(w.sse_prefix):
            return serve_events(w, environ, start_response)
        sub = subscription(environ, w.poll_prefix, w.rules)
        body = poll_answer(w.hub, sub, poll_wait(environ))
        return answer(start_response, "200 OK", body, "application/json")
    except Refused as e:
        return answer(start_response, e.status, f"{e.reason}\n".encode())
    except realtime.UnknownId as e:
        return answer(start_response, "400 Bad Request", f"{e}\n".encode())
    except Busy as e:
        return answer(start_response, "503 Service Unavailable", f"{e}\n".encode())
    except redis.RedisError:
        return answer(start_response, "503 Service Unavailable", BUS_DOWN)


def health(w: Worker, start_response: Any) -> list[bytes]:
    """200 if the worker can deliver: its Redis listener runs and Redis answers; else 503."""
    deadline = time.monotonic() + SUBSCRIBING_PATIENCE
    while not w.hub.subscribed and w.hub.listening and time.monotonic() < deadline:
        gevent.sleep(0.02)
    reason = w.hub.trouble()
    body = json.dumps({"ok": reason is None, "reason": reason or "delivering",
                       "connections": w.connections,
                       "skipped_messages": w.hub.bad_messages}).encode() + b"\n"  # fmt: skip
    status = "200 OK" if reason is None else "503 Service Unavailable"
    start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                            ("Content-Length", str(len(body)))])  # fmt: skip
    return [body]


class EventResponse:
    """An event stream's body; closing it (even before its first byte) ends its membership."""

    def __init__(self, chunks: Generator[bytes, None, None], leave: Callable[[], None]) -> None:
        self.chunks = chunks
        self.leave = leave

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks

    def close(self) -> None:
        self.chunks.close()
        self.leave()


class Counted:
    """A response that holds one of the worker's connection slots until the server closes it
    (as every WSGI server does, even when the client went away before the first byte)."""

    def __init__(self, w: Worker, body: Iterable[bytes]) -> None:
        self.worker = w
        self.body = body
        self.released = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        if not self.released:
            self.released = True
            self.worker.connections -= 1
        close = getattr(self.body, "close", None)
        if close is not None:
            close()


def serve_events(w: Worker, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    sub = subscription(environ, w.sse_prefix, w.rules, environ.get("HTTP_LAST_EVENT_ID"))
    stream = EventStream(w.queue_limit, sub.since, w.hub.counters)
    if not w.hub.join(sub.channels, stream):
        w.hub.leave(sub.channels, stream)
        return answer(start_response, "503 Service Unavailable", BUS_DOWN)
    try:
        # Before the status line: a since the worker cannot resume from is a 400, not a stream.
        replayed = stream.catch_up(w.hub, sub)
    except BaseException:
        w.hub.leave(sub.channels, stream)
        raise
    start_response("200 OK", sse_headers())
    expiry = None
    if sub.expires is not None:  # a stream outlives no token
        expiry = gevent.get_hub().loop.timer(max(0.0, sub.expires - time.time()))
        expiry.start(stream.expire)

    def leave() -> None:
        if expiry is not None:
            expiry.stop()
        w.hub.leave(sub.channels, stream)

    return EventResponse(stream.events(replayed), leave)


def forget(client: Client) -> None:
    w = current_worker()
    w.connections -= 1
    w.hub.leave(client.subscription.channels, client)


class RequestHead:
    """A request's headers, read without the email package: pywsgi's default reader costs
    more than the rest of a websocket handshake, and reconnect storms are made of those."""

    MAX_LINE, MAX_LINES = 8192, 100
    status = ""  # pywsgi refuses the request when this is set

    def __init__(self, rfile: Any, *_: Any) -> None:
        self.headers: list[str] = []  # raw lines, as pywsgi builds the environ from them
        self.values: dict[str, str] = {}
        while True:
            line = rfile.readline(self.MAX_LINE + 1)
            if line in (b"\r\n", b"\n", b""):
                return
            if len(line) > self.MAX_LINE or len(self.headers) >= self.MAX_LINES:
                self.status = "request head too large"
                return
            text = line.decode("latin-1")
            self.headers.append(text)
            name, colon, value = text.partition(":")
            if colon:
                self.values[name.strip().lower()] = value.strip()

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.values.get(name.lower(), default)

    getheader = get

    @property
    def typeheader(self) -> str | None:
        return self.get("content-type")


class WebSocketHandler(chaussette_gevent.CustomWSGIHandler):
    socket: Any  # gevent's, while pywsgi owns the connection; None once a client took it
    MessageClass = RequestHead

    def run_application(self) -> None:
        if self.environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            super().run_application()
            return
        self.close_connection = True
        try:
            self._upgrade()
        except OSError:
            raise  # the client went away: pywsgi drops those quietly
        except Exception:
            # As in application(): gevent's own report would print the ?token= too.
            log.exception("websocket handshake for %s failed", self.environ.get("PATH_INFO"))

    def _upgrade(self) -> None:
        environ = self.environ
        w = current_worker()
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY")
        if key is None or environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
            self._reject("400 Bad Request", b"expected a version 13 websocket handshake\n")
            return
        try:
            sub = subscription(environ, w.prefix, w.rules)
        except Refused as e:
            self._reject(e.status, f"{e.reason}\n".encode())
            return
        if w.connections >= w.max_connections:
            self._reject("503 Service Unavailable", FULL)
            return
        client = Client(sub, w.hub, w.rules, w.queue_limit, w.max_message)
        w.connections += 1
        if not w.hub.join(sub.channels, client):
            w.connections -= 1
            w.hub.leave(sub.channels, client)
            self._reject("503 Service Unavailable", BUS_DOWN)
            return
        self.status = "101 Switching Protocols"
        self.socket.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + generate_accept_token(key.encode()) + b"\r\n\r\n"
        )
        # From here the client lives on event-loop callbacks: take its descriptor from pywsgi
        # (which would close it when this greenlet ends) into a plain non-blocking socket.
        sock = _socket.socket(fileno=self.socket.detach())
        self.socket = None
        client.on_close = forget
        client.start(sock)

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
            # No line per request: NGiNX's access log has them, and at thousands of
            # connections a second the worker has better things to do.
            log=None,
        )
        self.stop_timeout = kwargs.get("graceful_timeout") or 30
        # gevent runs these callbacks in the event loop, not in signal context.
        gevent.signal_handler(signal.SIGTERM, self.shut_down)
        gevent.signal_handler(signal.SIGINT, self.shut_down)
        gevent.spawn(self._ready_once_subscribed)

    @staticmethod
    def _ready_once_subscribed() -> None:
        """A reload retires the worker this one replaces only once this one is marked ready
        (stackctl.circusd): the clients it closes find this one accepting, and the health
        check (stackctl.health), which it answers from then on, finds it delivering. With
        Redis down, neither could deliver: ready after READY_PATIENCE all the same."""
        deadline = time.monotonic() + READY_PATIENCE
        while not current_worker().hub.subscribed and time.monotonic() < deadline:
            gevent.sleep(0.02)
        mark_ready()

    def shut_down(self) -> None:
        gevent.spawn(self._shut_down)

    def _shut_down(self) -> None:
        hub = current_worker().hub
        members = hub.all_members()
        log.info("stopping: closing %d realtime clients", len(members))
        self.close()  # stop accepting: the next process takes the Circus socket's queue
        for member in members:
            if isinstance(member, Client):
                member.close(SERVICE_RESTART, "server restarting")
            else:
                member.abort()  # SSE and long-poll clients reconnect by themselves
        self.stop(timeout=self.stop_timeout)
        # Websocket clients are not greenlets that stop() waits for: wait until each answered
        # its close frame (or was dropped after CLOSE_WAIT).
        deadline = time.monotonic() + self.stop_timeout
        while current_worker().connections > 0 and time.monotonic() < deadline:
            gevent.sleep(0.05)
        hub.stop()


def exposition(hub: Hub) -> str:
    return counters.exposition(hub.counters, hub.all_members(), len(hub.members),
                               hub.subscribed, hub.bad_messages)  # fmt: skip


def raise_open_files_limit() -> None:
    """One descriptor per client: allow as many as the hard limit lets this process have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str]) -> int:
    global worker
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s ws[%(process)d] %(levelname)s %(message)s"
    )

    raise_open_files_limit()
    rules = Rules(secret=realtime.secret(), token_max_age=args.token_max_age,
                  allowed_origins=tuple(args.allowed_origin),
                  client_publish=tuple(args.client_publish))  # fmt: skip
    hub = Hub(os.environ[REDIS_URL_VARIABLE], args.ping_interval, realtime.history_limits(),
              counting=args.metrics_socket is not None)  # fmt: skip
    worker = Worker(hub, rules, prefix=args.prefix, sse_prefix=args.sse_prefix,
                    poll_prefix=args.poll_prefix, max_message=args.max_message,
                    max_connections=args.max_connections, queue_limit=args.queue_limit)  # fmt: skip
    hub.start()
    if args.metrics_socket is not None:
        counters.serve(args.metrics_socket, lambda: exposition(hub))

    from chaussette import backend
    from chaussette.server import main as chaussette_main

    backend.register("gevent", WebSocketServer)
    # Chaussette gives its logger a handler of its own; passed on to ours as well, each of its
    # lines would be written twice.
    logging.getLogger("chaussette").propagate = False
    sys.argv = [
        "chaussette",
        "--fd",
        str(args.fd),
        "--backend",
        "gevent",
        "--graceful-timeout",
        str(args.graceful_timeout),
        "stackctl.ws.server.application",
    ]
    chaussette_main()
    return 0
