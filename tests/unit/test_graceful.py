"""stackctl.graceful's first step, on a real epoll set and a real listening socket."""

from __future__ import annotations

import select
import socket
from contextlib import closing

from stackctl.graceful import stop_accepting


def test_after_stop_accepting_a_new_connection_wakes_no_one() -> None:
    with closing(socket.socket()) as listener, closing(select.epoll()) as poller:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        poller.register(listener.fileno(), select.EPOLLIN)
        with closing(socket.create_connection(listener.getsockname())):
            assert poller.poll(1)  # the set reports a waiting connection...
            stop_accepting()
            assert poller.poll(0.2) == []  # ...and after stop_accepting, nothing
        listener.accept()[0].close()  # the connection is still queued for a worker to take
