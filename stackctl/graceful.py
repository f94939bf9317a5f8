"""A graceful stop of a uWSGI worker that cannot cost a connection.

A master-less uWSGI worker exits on SIGHUP at once unless it is inside a request, and it
counts itself inside only after accept() has taken a connection off the socket's queue that
all workers share: a SIGHUP landing between the two drops that connection, and NGiNX answers
502 (uWSGI 2.0, core/uwsgi.c gracefully_kill and core/utils.c wsgi_req_recv).

So Circus stops workers with SIGUSR2 instead, which every thread of the worker blocks and one
thread of ours waits for. It takes the listening sockets out of uWSGI's epoll sets, so that no
new accept can start; lets an accept already under way reach its request; and only then sends
the SIGHUP that uWSGI handles: a worker in a request finishes it, an idle one exits.

A worker with several threads (``wsgi.threads``) cannot take that SIGHUP: uWSGI then cancels
and joins its other threads, but the one waiting for a connection holds the mutex that the
others queue on to accept, and dies holding it; the join waits until Circus kills the worker
at the graceful timeout. There, the worker counts the requests in its app (:func:`counted`)
and, once it accepts no more, exits when the last one has been answered.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from typing import Any

STOP_SIGNAL = signal.SIGUSR2
# Long enough for a thread that was just handed a connection to mark itself in a request.
SETTLE_SECONDS = 0.2
EPOLL_CTL_DEL = 2


def listening_sockets() -> list[int]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with suppress(OSError):
            probe = socket.socket(fileno=os.dup(fd))
            try:
                if probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    found.append(fd)
            finally:
                probe.close()
    return found


def epoll_instances() -> list[int]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]":
                found.append(int(name))
    return found


def stop_accepting() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    listeners = listening_sockets()
    for instance in epoll_instances():
        for fd in listeners:
            libc.epoll_ctl(instance, EPOLL_CTL_DEL, fd, None)  # ENOENT when not in this set


class InFlight:
    """Requests inside the app; wakes a waiter when the last one is answered."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = threading.Condition()

    def enter(self) -> None:
        with self.idle:
            self.count += 1

    def leave(self) -> None:
        with self.idle:
            self.count -= 1
            if self.count == 0:
                self.idle.notify_all()

    def wait_idle(self) -> None:
        with self.idle:
            self.idle.wait_for(lambda: self.count == 0)


class Response:
    """The app's response, passed through; its end (uWSGI calls close()) ends the request."""

    def __init__(self, body: Iterable[bytes], done: Callable[[], None]) -> None:
        self.body = body
        self.done = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.done()


def counted(app: Any, in_flight: InFlight) -> Any:
    """``app``, counting its requests in ``in_flight`` until each response is closed."""

    def application(environ: dict[str, Any], start_response: Any) -> Response:
        in_flight.enter()
        try:
            return Response(app(environ, start_response), in_flight.leave)
        except BaseException:
            in_flight.leave()
            raise

    return application


def _wait_for_stop(in_flight: InFlight | None) -> None:
    signal.sigwait({STOP_SIGNAL})
    stop_accepting()
    time.sleep(SETTLE_SECONDS)
    if in_flight is None:
        os.kill(os.getpid(), signal.SIGHUP)
        return
    in_flight.wait_idle()
    os._exit(0)  # see the module's docstring: uWSGI's own graceful exit would hang


def install(threads: int) -> InFlight | None:
    """Call on the request thread before uWSGI or the app starts any other (threads inherit
    the signal mask). With more than one thread, the app must then be served ``counted``
    with what this returns."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {STOP_SIGNAL})
    in_flight = InFlight() if threads > 1 else None
    threading.Thread(target=_wait_for_stop, args=(in_flight,), name="stackctl-graceful",
                     daemon=True).start()  # fmt: skip
    return in_flight
