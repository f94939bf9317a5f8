"""stackctl.graceful's first step, on a real epoll set and a real listening socket."""

from __future__ import annotations

import select
import socket
from contextlib import closing

import pytest

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


def test_a_request_counts_until_its_response_is_closed_even_when_the_app_raises() -> None:
    from stackctl.graceful import InFlight, counted

    in_flight = InFlight()
    closed: list[bool] = []

    class Body(list[bytes]):
        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, object], start_response: object) -> Body:
        if environ.get("fail"):
            raise RuntimeError("boom")
        return Body([b"hello"])

    served = counted(app, in_flight)
    response = served({}, None)
    assert in_flight.count == 1 and list(response) == [b"hello"]
    response.close()
    assert in_flight.count == 0 and closed == [True]
    with pytest.raises(RuntimeError):
        served({"fail": True}, None)
    assert in_flight.count == 0
    in_flight.wait_idle()  # returns at once when nothing is in flight
