"""The websocket worker's liveness and limits, with real clients through NGiNX."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, closing

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping, Request

from stackctl.stack import Stack
from tests.conftest import data_of, running_stack, short_dir, stackctl, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:

    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    limits = ["ws.ping_interval=1", "ws.max_message=1024", "ws.max_connections=3"]
    args = [arg for limit in limits for arg in ("--set", limit)]
    with running_stack(root / "site", "--workers", "1", *args) as running:
        yield running


def ws_url(stack: Stack, channel: str) -> str:
    return stack.url().replace("http", "ws", 1) + f"ws/{channel}"


def test_a_client_that_answers_pings_stays_and_one_that_does_not_is_dropped(stack: Stack) -> None:
    port = stack.profile.server.listen.port
    silent = WSConnection(ConnectionType.CLIENT)
    with (
        connect(ws_url(stack, "live")) as answering,  # the websockets library answers pings
        closing(socket.create_connection(("127.0.0.1", port), timeout=10)) as raw,
    ):
        raw.sendall(silent.send(Request(host="localhost", target="/ws/live")))
        events: list[object] = []
        started = time.monotonic()
        while True:  # read, never answer
            data = raw.recv(4096)
            if not data:
                break
            silent.receive_data(data)
            events += list(silent.events())
        held = time.monotonic() - started
        assert isinstance(events[0], AcceptConnection)
        assert any(isinstance(e, Ping) for e in events)
        assert 1.5 < held < 6, f"dropped after {held:.1f} s with a 1 s ping interval"
        stackctl("publish", "live", "still here", cwd=stack.stack_dir)
        assert data_of(answering.recv(timeout=2)) == "still here"


def test_oversized_message_closes_with_1009(stack: Stack) -> None:
    with connect(ws_url(stack, "big")) as client:
        client.send("x" * 2000)
        with pytest.raises(ConnectionClosed) as closed:
            client.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_connections_past_the_maximum_get_503(stack: Stack) -> None:
    with ExitStack() as held:
        for _ in range(3):
            held.enter_context(connect(ws_url(stack, "full")))
        with pytest.raises(InvalidStatus) as refused, connect(ws_url(stack, "full")):
            pass
    assert refused.value.response.status_code == 503


def test_reloading_the_ws_worker_closes_clients_with_1012(stack: Stack) -> None:
    with connect(ws_url(stack, "restart")) as client:
        assert stackctl("reload", "ws", cwd=stack.stack_dir).stdout.strip().endswith("reloaded ws")
        with pytest.raises(ConnectionClosed) as closed:
            client.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    with connect(ws_url(stack, "restart")) as again:  # the new worker serves
        stackctl("publish", "restart", "back", cwd=stack.stack_dir)
        assert data_of(again.recv(timeout=2)) == "back"


def refused_with(stack: Stack, channel: str) -> int | None:
    """The status a websocket handshake is refused with; None if it is accepted."""
    try:
        with connect(ws_url(stack, channel)):
            return None
    except InvalidStatus as refused:
        return refused.response.status_code


def test_long_polls_and_event_streams_count_against_the_maximum(stack: Stack) -> None:
    def long_poll() -> None:
        with urllib.request.urlopen(stack.url() + "poll/held?timeout=30", timeout=40) as r:
            r.read()

    polls = [threading.Thread(target=long_poll) for _ in range(2)]
    for poll in polls:
        poll.start()
    try:
        with urllib.request.urlopen(stack.url() + "events/held", timeout=10):
            wait_for(lambda: refused_with(stack, "full") == 503, timeout=10,
                     what="2 long polls and 1 event stream to fill the 3 places")  # fmt: skip
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(stack.url() + "poll/held?timeout=0", timeout=10)
            refused.value.close()
            assert refused.value.code == 503
    finally:
        stackctl("publish", "held", "release", cwd=stack.stack_dir)
        for poll in polls:
            poll.join(timeout=40)
    wait_for(lambda: refused_with(stack, "full") is None, what="the places to be free again")
