"""Realtime delivery end to end: channels, tokens, origins, replay, fallbacks and back-pressure,
with a real stack (NGiNX, the gevent worker, Redis) and real clients."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, closing
from typing import Any

import pytest
import redis
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from stackctl import realtime
from stackctl.stack import Stack
from tests.conftest import data_of, running_stack, short_dir, stackctl
from tests.followers import Follower

pytestmark = pytest.mark.e2e

TOKEN_MAX_AGE = 2
QUEUE_LIMIT = 16
HISTORY = 100


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    settings = [f"ws.token_max_age={TOKEN_MAX_AGE}", f"ws.queue_limit={QUEUE_LIMIT}",
                'ws.client_publish=["chat", "room.*"]', f"ws.history={HISTORY}"]  # fmt: skip
    args = [arg for setting in settings for arg in ("--set", setting)]
    with running_stack(root / "site", "--workers", "1", *args) as running:
        yield running


def ws_url(stack: Stack, channels: str, **query: str) -> str:
    url = stack.url().replace("http", "ws", 1) + f"ws/{channels}"
    return url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


def publish(stack: Stack, channel: str, message: Any) -> int:
    return realtime.publish(channel, message, url=stack.redis_url)


def token(stack: Stack, user: str | None, groups: tuple[str, ...] = ()) -> str:
    return realtime.token(user, groups, key=stack.secret_file.read_bytes().strip())


def refusal(url: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as refused, connect(url, **kwargs):
        pass
    return refused.value.response.status_code


def test_one_connection_follows_several_channels(stack: Stack) -> None:
    with connect(ws_url(stack, "alpha,beta")) as both, connect(ws_url(stack, "alpha")) as one:
        publish(stack, "beta", "b")
        publish(stack, "alpha", "a")
        assert [json.loads(both.recv(timeout=2))["channel"] for _ in range(2)] == ["beta", "alpha"]
        assert data_of(one.recv(timeout=2)) == "a"
        with pytest.raises(TimeoutError):
            one.recv(timeout=0.3)  # nothing from beta


def test_a_user_gets_their_messages_on_every_connection_and_nobody_else_does(
    stack: Stack,
) -> None:
    alice = token(stack, "alice")
    with (
        connect(ws_url(stack, "user:alice", token=alice)) as laptop,
        connect(ws_url(stack, "user:alice", token=alice)) as phone,
    ):
        realtime.publish_user("alice", {"unread": 3}, url=stack.redis_url)
        assert data_of(laptop.recv(timeout=2)) == {"unread": 3}
        assert data_of(phone.recv(timeout=2)) == {"unread": 3}
    assert refusal(ws_url(stack, "user:alice", token=token(stack, "bob"))) == 403


def test_a_group_channel_needs_a_token_naming_the_group(stack: Stack) -> None:
    staff = token(stack, "carol", ("staff",))
    with connect(ws_url(stack, "group:staff,news", token=staff)) as ws:
        realtime.publish_group("staff", "meeting at 3", url=stack.redis_url)
        assert data_of(ws.recv(timeout=2)) == "meeting at 3"
    assert refusal(ws_url(stack, "group:staff", token=token(stack, "dave", ("sales",)))) == 403


def test_missing_forged_and_expired_tokens_open_no_private_channel(stack: Stack) -> None:
    assert refusal(ws_url(stack, "user:alice")) == 403
    forged = realtime.token("alice", key=b"not the stack's secret")
    assert refusal(ws_url(stack, "user:alice", token=forged)) == 403
    old = token(stack, "alice")
    time.sleep(TOKEN_MAX_AGE + 1.1)
    assert refusal(ws_url(stack, "user:alice", token=old)) == 403
    with connect(ws_url(stack, "news")):
        pass  # broadcast channels need no token


def test_pages_from_another_site_are_refused(stack: Stack) -> None:
    port = stack.profile.server.listen.port
    assert refusal(ws_url(stack, "news"), origin=Origin("http://evil.example")) == 403
    with connect(ws_url(stack, "news"), origin=Origin(f"http://127.0.0.1:{port}")) as ws:
        publish(stack, "news", "same site")
        assert data_of(ws.recv(timeout=2)) == "same site"


def test_a_client_that_reconnects_with_its_last_id_gets_what_it_missed_once(
    stack: Stack,
) -> None:
    with connect(ws_url(stack, "feed,other")) as ws:
        publish(stack, "feed", 1)
        seen = json.loads(ws.recv(timeout=2))
    for channel, n in (("feed", 2), ("other", 3), ("feed", 4)):  # while it was away
        publish(stack, channel, n)
    with connect(ws_url(stack, "feed,other", since=seen["id"])) as ws:
        publish(stack, "feed", 5)
        got = [json.loads(ws.recv(timeout=2)) for _ in range(4)]
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.5)
    assert [m["data"] for m in got] == [2, 3, 4, 5]
    ids = [m["id"] for m in got]
    assert sorted(ids, key=realtime.id_key) == ids and len(set(ids)) == 4
    assert realtime.id_key(ids[0]) > realtime.id_key(seen["id"])


def test_history_keeps_what_the_profile_says_by_count_and_by_age(stack: Stack) -> None:
    connection = redis.Redis.from_url(stack.redis_url)
    for n in range(12):
        realtime.publish_json(connection, "capped", str(n), (5, 0))
    ids = [raw.decode() for raw, _ in connection.xrange(realtime.stream_key("capped"))]
    assert len(ids) == 6  # 7 to 11, and 6 marking where the history starts
    kept = realtime.history(connection, ["capped"], "0-0", (5, 0))
    assert [data_of(m) for m in kept.envelopes] == [7, 8, 9, 10, 11]
    assert kept.gaps == ["capped"]
    assert realtime.history(connection, ["capped"], ids[0], (5, 0)).gaps == []  # saw 6
    saw_7 = realtime.history(connection, ["capped"], ids[1], (5, 0))
    assert [data_of(m) for m in saw_7.envelopes] == [8, 9, 10, 11]

    realtime.publish_json(connection, "aged", '"old"', (100, 1))
    time.sleep(1.2)
    realtime.publish_json(connection, "aged", '"new"', (100, 1))
    aged = realtime.history(connection, ["aged"], "0-0", (100, 1))
    assert [data_of(m) for m in aged.envelopes] == ["new"]
    assert aged.gaps == ["aged"]
    # Nothing published for longer than the age: the stream is kept, and still tells.
    time.sleep(1.2)
    assert realtime.history(connection, ["aged"], "0-0", (100, 1)) == realtime.Missed([], ["aged"])


def test_a_client_away_for_longer_than_the_history_is_told_of_the_gap(stack: Stack) -> None:
    with connect(ws_url(stack, "busy,calm")) as ws:
        publish(stack, "busy", "seen")
        seen = json.loads(ws.recv(timeout=2))["id"]
    publish(stack, "calm", "kept")
    connection = redis.Redis.from_url(stack.redis_url)
    for n in range(HISTORY + 1):  # one more than the history holds: the first one is lost
        realtime.publish_json(connection, "busy", str(n), (HISTORY, 0))
    expected = ["kept", *range(1, HISTORY + 1)]

    with connect(ws_url(stack, "busy,calm", since=seen)) as ws:
        notice = json.loads(ws.recv(timeout=2))
        got = [data_of(ws.recv(timeout=2)) for _ in expected]
    assert notice == {"channel": "busy", "gap": True}
    assert got == expected

    request = urllib.request.Request(stack.url() + "events/busy,calm",
                                     headers={"Last-Event-ID": seen})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        gap, *events = sse_events(response, 1 + len(expected))
    assert gap == {"event": "gap", "data": '{"channel":"busy","gap":true}'}
    assert [data_of(e["data"]) for e in events] == expected

    with urllib.request.urlopen(stack.url() + f"poll/busy,calm?since={seen}", timeout=10) as r:
        answer = json.loads(r.read())
    assert answer["gaps"] == ["busy"]
    assert [m["data"] for m in answer["messages"]] == expected
    # A client that saw the latest message misses nothing, and no gap is claimed.
    with urllib.request.urlopen(
        stack.url() + f"poll/busy,calm?since={answer['last_id']}&timeout=0.2", timeout=10
    ) as r:
        assert json.loads(r.read()) == {"messages": [], "last_id": answer["last_id"], "gaps": []}


def test_reloading_the_ws_worker_mid_flow_loses_and_doubles_nothing(stack: Stack) -> None:
    followers = [Follower(ws_url(stack, "flow")) for _ in range(5)]
    for follower in followers:
        follower.start()
    try:
        for follower in followers:
            assert follower.connected.wait(10)
        sent = []

        def publish_flow() -> None:
            for n in range(60):
                publish(stack, "flow", n)
                sent.append(n)
                time.sleep(0.05)

        publisher = threading.Thread(target=publish_flow)
        publisher.start()
        time.sleep(0.8)
        assert stackctl("reload", "ws", cwd=stack.stack_dir).stdout.strip().endswith("reloaded ws")
        publisher.join()
        for follower in followers:
            follower.wait_for_count(len(sent))
    finally:
        for follower in followers:
            follower.stop()
    for follower in followers:
        assert [m["data"] for m in follower.received] == list(range(60))
        assert 1012 in follower.close_codes  # it was told to come back, and it did


def sse_events(response: Any, count: int) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    while len(events) < count:
        raw = response.readline()
        assert raw, f"the stream ended after {len(events)} of {count} events"
        line = raw.decode().rstrip("\n")
        if not line:
            if "data" in fields:
                events.append(fields)
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    return events


def test_server_sent_events_resume_from_last_event_id(stack: Stack) -> None:
    publish(stack, "ticker", "before the stream: not sent, no id was given")
    url = stack.url() + "events/ticker"
    with urllib.request.urlopen(url, timeout=10) as response:
        # The worker answers once Redis confirmed the subscription.
        assert response.headers["Content-Type"] == "text/event-stream"
        publish(stack, "ticker", "b")
        (event,) = sse_events(response, 1)
    assert data_of(event["data"]) == "b" and event["id"] == json.loads(event["data"])["id"]
    publish(stack, "ticker", "c")
    publish(stack, "ticker", "d")
    request = urllib.request.Request(url, headers={"Last-Event-ID": event["id"]})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert [data_of(e["data"]) for e in sse_events(response, 2)] == ["c", "d"]


def poll(stack: Stack, query: str) -> dict[str, Any]:
    with urllib.request.urlopen(stack.url() + "poll/notices?" + query, timeout=30) as response:
        return dict(json.loads(response.read()))


def test_long_poll_answers_what_was_missed_or_waits_for_the_next(stack: Stack) -> None:
    assert poll(stack, "timeout=0.2")["messages"] == []  # nothing new within the wait
    with connect(ws_url(stack, "notices")) as ws:
        publish(stack, "notices", "seen")
        seen = json.loads(ws.recv(timeout=2))
    publish(stack, "notices", "missed")
    caught_up = poll(stack, f"since={seen['id']}")
    assert [m["data"] for m in caught_up["messages"]] == ["missed"]
    later = threading.Timer(1.0, publish, (stack, "notices", "later"))
    later.start()
    waited = poll(stack, f"since={caught_up['last_id']}&timeout=20")
    later.join()
    assert [m["data"] for m in waited["messages"]] == ["later"]


def test_clients_publish_only_where_the_profile_allows(stack: Stack) -> None:
    with connect(ws_url(stack, "chat,room.1")) as sender, connect(ws_url(stack, "chat")) as other:
        sender.send(json.dumps({"channel": "chat", "data": {"text": "hi"}}))
        assert data_of(other.recv(timeout=2)) == {"text": "hi"}
        sender.send(json.dumps({"channel": "news", "data": "spoofed"}))
        answers = [json.loads(sender.recv(timeout=2)) for _ in range(2)]
    assert answers[0]["data"] == {"text": "hi"}  # its own message, as a subscriber of chat
    assert answers[1] == {"error": "clients may not publish to 'news'"}


class RawClient:
    """A websocket opened by hand, so that a test can stop reading from it."""

    def __init__(self, address: str | tuple[str, int], target: str,
                 receive_buffer: int | None = None) -> None:  # fmt: skip
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if receive_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(10)
        self.sock.connect(address)
        self.protocol = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.protocol.send(Request(host="localhost", target=target)))
        self.texts: list[str] = []
        while not self._read():
            pass

    def _read(self) -> bool:
        """Read once; True once the handshake is done."""
        self.protocol.receive_data(self.sock.recv(65536))
        accepted = False
        for event in self.protocol.events():
            if isinstance(event, AcceptConnection):
                accepted = True
            elif isinstance(event, TextMessage):
                self.texts.append(event.data)
            else:
                raise AssertionError(f"unexpected {event}")
        return accepted or bool(self.texts)

    def wait_for_text(self, part: str) -> None:
        while not any(part in text for text in self.texts):
            self._read()

    def close(self) -> None:
        self.sock.close()


def test_a_slow_client_is_disconnected_while_the_others_keep_up(stack: Stack) -> None:
    fast = Follower(ws_url(stack, "flood"))
    fast.start()
    payload = "x" * 32768
    with closing(RawClient(str(stack.ws_socket), "/ws/flood", receive_buffer=4096)) as client:
        slow = client.sock
        try:
            assert fast.connected.wait(10)
            for n in range(100):  # 3 MB: far more than the slow client's buffers and queue
                publish(stack, "flood", {"n": n, "at": time.time(), "pad": payload})
                # Paced as a feed is, not one 3 MB burst: a client that reads keeps up, one
                # that does not falls ever further behind.
                time.sleep(0.01)
            fast.wait_for_count(100)
        finally:
            fast.stop()
        received, deadline = 0, time.monotonic() + 30
        while time.monotonic() < deadline:  # now read: the worker has hung up on it
            chunk = slow.recv(65536)
            if not chunk:
                break
            received += len(chunk)
        assert time.monotonic() < deadline, "the slow client was never disconnected"
    assert received < 100 * len(payload)
    assert [m["data"]["n"] for m in fast.received] == list(range(100))
    assert fast.close_codes == [], "the fast client was disconnected too"
    log = (stack.log_dir / "ws.log").read_text()
    assert f"fell {QUEUE_LIMIT} messages behind" in log


def replay_everything(stack: Stack, channel: str) -> None:
    with connect(ws_url(stack, channel, since="0-0")) as ws:
        ws.recv(timeout=2)


def test_redis_connections_stay_constant_while_500_clients_connect(stack: Stack) -> None:
    port = stack.profile.server.listen.port
    monitor = redis.Redis.from_url(stack.redis_url)

    def redis_clients(stack: Stack) -> int:
        return int(monitor.info("clients")["connected_clients"])

    with ExitStack() as held:
        first = held.enter_context(closing(RawClient(("127.0.0.1", port), "/ws/crowd")))
        publish(stack, "crowd", "warm-up")
        replay_everything(stack, "crowd")  # the worker opens its replay connection lazily
        before = redis_clients(stack)
        crowd = [first] + [
            held.enter_context(closing(RawClient(("127.0.0.1", port), "/ws/crowd")))
            for _ in range(499)
        ]
        replay_everything(stack, "crowd")
        assert redis_clients(stack) == before
        assert publish(stack, "crowd", "to all 500") == 1  # one subscription for all of them
        for client in crowd:
            client.wait_for_text("to all 500")
        assert redis_clients(stack) == before


def test_worker_log_names_no_error(stack: Stack) -> None:
    log = (stack.log_dir / "ws.log").read_text()
    assert not re.search(r"Traceback|ERROR", log), log[-3000:]
