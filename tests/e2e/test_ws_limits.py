"""The websocket worker's liveness and limits, with real clients through NGiNX."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping, Request

from stackctl.stack import Stack
from tests.conftest import data_of, running_stack, stackctl

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="sc", dir="/tmp"))
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
