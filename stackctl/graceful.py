"""A graceful stop of a uWSGI worker that cannot cost a connection.

A master-less uWSGI worker exits on SIGHUP at once unless it is inside a request, and it
counts itself inside only after accept() has taken a connection off the socket's queue that
all workers share: a SIGHUP landing between the two drops that connection, and NGiNX answers
502 (uWSGI 2.0, core/uwsgi.c gracefully_kill and core/utils.c wsgi_req_recv).

So Circus stops workers with SIGUSR2 instead, which every thread of the worker blocks and one
thread of ours waits for. It takes the listening sockets out of uWSGI's epoll sets, so that no
new accept can start; lets an accept already under way reach its request; and only then sends
the SIGHUP that uWSGI handles: a worker in a request finishes it, an idle one exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
import time
from contextlib import suppress

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


def _wait_for_stop() -> None:
    signal.sigwait({STOP_SIGNAL})
    stop_accepting()
    time.sleep(SETTLE_SECONDS)
    os.kill(os.getpid(), signal.SIGHUP)


def install() -> None:
    """Call on the request thread before uWSGI starts any other: threads inherit the mask."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {STOP_SIGNAL})
    threading.Thread(target=_wait_for_stop, name="stackctl-graceful", daemon=True).start()
