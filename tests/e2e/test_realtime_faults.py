"""Realtime delivery when things go wrong: odd messages on the bus, Redis killed, clients that
push the worker's limits. Real stack (NGiNX, the gevent worker, Redis), real clients."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request

from stackctl import realtime
from stackctl.stack import Stack
from tests.conftest import data_of, running_stack, short_dir, stackctl, wait_for
from tests.e2e.test_realtime import sse_events, ws_url
from tests.followers import Follower

pytestmark = pytest.mark.e2e

TOKEN_MAX_AGE = 4
HISTORY = 1000  # the default


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    with running_stack(
        root / "site", "--workers", "1", "--set", 'ws.client_publish=["*"]',
        "--set", f"ws.token_max_age={TOKEN_MAX_AGE}",
    ) as running:  # fmt: skip
        yield running


def token(stack: Stack, user: str | None, groups: tuple[str, ...] = ()) -> str:
    return realtime.token(user, groups, key=stack.secret_file.read_bytes().strip())


def publish(stack: Stack, channel: str, message: Any) -> int:
    return realtime.publish(channel, message, url=stack.redis_url)


def pids(stack: Stack, watcher: str) -> list[int]:
    """The pids `stackctl status` lists for one watcher (while Redis is down, status also
    says that the stack does not work, with exit status 1)."""
    status = stackctl("status", cwd=stack.stack_dir, check=False).stdout
    section = re.search(rf"^{watcher} .*\n((?:\s+pid .*\n)*)", status, re.MULTILINE)
    assert section, status
    return [int(pid) for pid in re.findall(r"pid (\d+)", section.group(1))]


def test_messages_not_from_publish_are_skipped_and_delivery_goes_on(stack: Stack) -> None:
    worker = pids(stack, "ws")
    with connect(ws_url(stack, "odd")) as seen_by:
        publish(stack, "odd", "first")
        since = json.loads(seen_by.recv(timeout=2))["id"]
    sse = urllib.request.urlopen(stack.url() + "events/odd", timeout=10)
    with sse, connect(ws_url(stack, "odd", since=since)) as ws:
        bus = redis.Redis.from_url(stack.redis_url)
        for odd in ("not json", '{"no": "id"}', "[1, 2]", '{"id": 7}', '{"id": "1-0",\n"a": 1}'):
            assert bus.publish("stackctl:odd", odd) == 1
        assert publish(stack, "odd", "after") == 1
        assert data_of(ws.recv(timeout=5)) == "after"
        (event,) = sse_events(sse, 1)
        assert data_of(event["data"]) == "after"
        with urllib.request.urlopen(stack.url() + f"poll/odd?since={since}", timeout=10) as r:
            assert [m["data"] for m in json.loads(r.read())["messages"]] == ["after"]
    assert pids(stack, "ws") == worker  # not restarted: it never stopped hearing
    log = (stack.log_dir / "ws.log").read_text()
    assert len(re.findall("skipped .* not published by stackctl.realtime", log)) == 1, log


def kill_redis(stack: Stack) -> None:
    """SIGKILL the stack's Redis server, as the kernel's OOM killer would; wait until Circus
    has started a new one that answers."""
    (old,) = pids(stack, "redis")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: pids(stack, "redis") not in ([old], []), what="a new Redis process")
    wait_for(lambda: answers(stack), what="the new Redis to answer")


def answers(stack: Stack) -> bool:
    try:
        return bool(redis.Redis.from_url(stack.redis_url, retry=NO_RETRY).ping())
    except redis.RedisError:
        return False


NO_RETRY = Retry(NoBackoff(), 0)


class Publisher(threading.Thread):
    """Publishes 0, 1, 2... ten times a second, alternating two channels, and keeps what
    Redis acknowledged. No retry: a publish that raised is not counted as sent."""

    def __init__(self, stack: Stack, channels: tuple[str, str]) -> None:
        super().__init__(daemon=True)
        self.url = stack.redis_url
        self.channels = channels
        self.acknowledged: list[int] = []
        self.failed = 0
        self.done = threading.Event()

    def run(self) -> None:
        connection = redis.Redis.from_url(self.url, retry=NO_RETRY)
        n = 0
        while not self.done.wait(0.1):
            try:
                realtime.publish_json(connection, self.channels[n % 2], str(n), (HISTORY, 0),
                                      wait=0)  # fmt: skip
                self.acknowledged.append(n)
            except redis.RedisError:
                self.failed += 1
            n += 1


def test_killing_redis_loses_and_doubles_no_acknowledged_message(stack: Stack) -> None:
    url = ws_url(stack, "storm,calm")
    followers = [Follower(url) for _ in range(20)]
    publisher = Publisher(stack, ("storm", "calm"))
    try:
        for follower in followers:
            follower.start()
        for follower in followers:
            assert follower.connected.wait(10)
        publisher.start()
        for _ in range(3):
            time.sleep(2)
            kill_redis(stack)
        time.sleep(2)
    finally:
        publisher.done.set()
        publisher.join(timeout=10)
        deadline = time.monotonic() + 30
        for follower in followers:
            follower.wait_for_count(len(publisher.acknowledged), deadline - time.monotonic())
            follower.stop()
    acknowledged = set(publisher.acknowledged)
    assert publisher.failed > 0, "Redis was never down while messages were published"
    for follower in followers:
        ids = [m["id"] for m in follower.received]
        assert len(ids) == len(set(ids)), "a message was delivered twice"
        assert sorted(ids, key=realtime.id_key) == ids, "messages out of order"
        lost = acknowledged - {m["data"] for m in follower.received}
        assert not lost, f"{len(lost)} acknowledged messages lost: {sorted(lost)[:10]}"
    log = (stack.log_dir / "ws.log").read_text()
    assert log.count("subscribed again after losing Redis") >= 3, log[-3000:]
    # Each outage starts again from the shortest pause: the backoff was reset by the success.
    pauses = [float(p) for p in re.findall(r"reconnecting in ([\d.]+) s", log)]
    assert sum(p <= 0.15 for p in pauses) >= 3, pauses


def test_a_client_that_pings_and_never_reads_is_closed(stack: Stack) -> None:
    # The worker's own pings (every 20 s here) play no part: only the client's.
    protocol = WSConnection(ConnectionType.CLIENT)
    with closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(10)
        raw.connect(str(stack.ws_socket))
        raw.sendall(protocol.send(Request(host="localhost", target="/ws/pinger")))
        protocol.receive_data(raw.recv(4096))
        assert isinstance(next(protocol.events()), AcceptConnection)
        raw.settimeout(1)
        ping = protocol.send(Ping(payload=b"p" * 120))
        events: list[object] = []
        sent = 0
        # Pings in batches, and a glance (a few kB, far less than the pongs) between them.
        while sent < 40_000 and not any(isinstance(e, CloseConnection) for e in events):
            raw.sendall(ping * 200)
            sent += 200
            with suppress(BlockingIOError):
                protocol.receive_data(raw.recv(65536, socket.MSG_DONTWAIT))
                events += list(protocol.events())
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert closes and closes[0].code == 1013, f"not closed after {sent} pings"


def http_status(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=30) as response:  # fmt: skip
            return response.status, response.read().decode()
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, refused.read().decode()


def test_resuming_from_an_id_not_issued_yet_is_refused_with_a_reason(stack: Stack) -> None:
    last = realtime.id_key(json.loads(redis_envelope(stack, "future"))["id"])
    ahead = f"{last[0] + 60_000}-0"  # a minute ahead: what it published meanwhile is not here
    for url, headers in (
        (stack.url() + f"poll/future?since={ahead}&timeout=0", None),
        (stack.url() + "events/future", {"Last-Event-ID": ahead}),
    ):
        status, reason = http_status(url, headers)
        assert (status, reason) == (400, f"since: {ahead} is after the last message id, "
                                         f"{last[0]}-{last[1]}\n")  # fmt: skip
    assert http_status(stack.url() + "poll/future?since=99999999999999999999-0")[0] == 400
    with (
        connect(ws_url(stack, "future", since=ahead)) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason.startswith(f"since: {ahead} is after the last message id")


def redis_envelope(stack: Stack, channel: str) -> str:
    """Publish on ``channel`` and return what a follower receives."""
    with connect(ws_url(stack, channel)) as ws:
        publish(stack, channel, "now")
        return str(ws.recv(timeout=5))


def publish_many(stack: Stack, channels: list[str], count: int, history: int = HISTORY) -> None:
    """Publish 0 to count - 1 on each channel, in one round trip to Redis."""
    publish(stack, channels[0], "loads the publish script")
    pipe = redis.Redis.from_url(stack.redis_url).pipeline(transaction=False)
    for n in range(count):
        for channel in channels:
            keys, args = realtime.publish_arguments(channel, json.dumps(n), (history, 0),
                                                    secrets.token_hex(12))  # fmt: skip
            pipe.evalsha(realtime.PUBLISH_SHA, len(keys), *keys, *args)
    pipe.execute()


def test_what_the_history_lost_during_an_outage_is_told_as_a_gap(short_tmp: Path) -> None:
    stackctl("init", str(short_tmp / "site"), "--demo", cwd=short_tmp)
    short = 20
    with (
        running_stack(short_tmp / "site", "--set", f"ws.history={short}") as small,
        connect(ws_url(small, "lapse")) as ws,
    ):
        publish(small, "lapse", "before")
        assert data_of(ws.recv(timeout=5)) == "before"
        answers: list[tuple[int, str]] = []
        poll = threading.Thread(target=lambda: answers.append(http_status(
            small.url() + "poll/lapse?timeout=30")))  # fmt: skip
        poll.start()
        time.sleep(0.5)  # the long poll is waiting
        # Cut the worker's subscription (Redis stays up): what is published before it
        # subscribes again (it waits at least 50 ms) reaches it only through the history.
        redis.Redis.from_url(small.redis_url).client_kill_filter(_type="pubsub")
        publish_many(small, ["lapse"], short + 10, short)
        notice = json.loads(ws.recv(timeout=10))
        got = [data_of(ws.recv(timeout=10)) for _ in range(short)]
        poll.join(timeout=40)
    assert notice == {"channel": "lapse", "gap": True}
    assert got == list(range(10, short + 10))
    ((status, body),) = answers
    assert status == 200 and json.loads(body)["gaps"] == ["lapse"]


def test_a_crowd_replaying_32_channels_leaves_the_bus_to_the_others(stack: Stack) -> None:
    channels = [f"c{n}" for n in range(1, 33)]
    publish_many(stack, channels, CROWD_HISTORY)
    since = json.loads(redis_envelope(stack, "quiet"))["id"]
    publish(stack, "quiet", "missed")
    crowd_url = stack.url() + f"poll/{','.join(channels)}?since=0-0&timeout=0"
    statuses: list[int] = []

    def replay_everything() -> None:
        statuses.append(http_status(crowd_url)[0])

    crowd = [threading.Thread(target=replay_everything) for _ in range(CROWD)]
    for thread in crowd:
        thread.start()
    try:
        # Meanwhile, a client that missed one message catches up, and the flow goes on.
        started = time.monotonic()
        with connect(ws_url(stack, "quiet", since=since), open_timeout=60) as ws:
            assert data_of(ws.recv(timeout=60)) == "missed"
            assert publish(stack, "quiet", "live") == 1
            assert data_of(ws.recv(timeout=60)) == "live"
        caught_up = time.monotonic() - started
    finally:
        for thread in crowd:
            thread.join(timeout=180)
    refused = len(statuses) - statuses.count(200)
    assert refused == 0, f"{refused} of {CROWD} refused"
    assert caught_up < 30, f"the resuming client waited {caught_up:.1f} s"


CROWD, CROWD_HISTORY = 200, 300


def test_clients_publish_only_to_channels_they_may_follow(stack: Stack) -> None:
    alice, staff = token(stack, "alice"), token(stack, "carol", ("staff",))
    with (
        connect(ws_url(stack, "group:staff", token=staff)) as carol,
        connect(ws_url(stack, "user:alice", token=alice)) as inbox,
        connect(ws_url(stack, "news")) as anonymous,
    ):
        for sender in (anonymous, carol):
            sender.send(json.dumps({"channel": "user:alice", "data": "spoofed"}))
            answer = json.loads(sender.recv(timeout=5))
            assert answer == {"error": "'user:alice' needs a token for that user"}
        anonymous.send(json.dumps({"channel": "group:staff", "data": "spoofed"}))
        assert json.loads(anonymous.recv(timeout=5)) == {
            "error": "'group:staff' needs a token for that group"
        }
        inbox.send(json.dumps({"channel": "user:alice", "data": "a note to self"}))
        carol.send(json.dumps({"channel": "group:staff", "data": "meeting"}))
        assert data_of(inbox.recv(timeout=5)) == "a note to self"  # and nothing spoofed
        assert data_of(carol.recv(timeout=5)) == "meeting"


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A process the stack did not start, as a cron job is: none of its variables set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STACKCTL_", "DJANGO_"))}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_publish_finds_the_stack_from_the_working_directory_or_django(
    stack: Stack, short_tmp: Path
) -> None:
    below = stack.stack_dir / "app" / "management"
    below.mkdir(parents=True, exist_ok=True)
    publish_cron = "from stackctl import realtime; print(realtime.publish('cron', 'from cron'))"
    publish_django = (
        "import django.conf; django.conf.settings.configure(BASE_DIR={!r}); "
        "from stackctl import realtime; print(realtime.publish('cron', 'from django'))"
    ).format(str(stack.stack_dir / "app"))
    with connect(ws_url(stack, "cron")) as ws:
        done = run_python(publish_cron, cwd=below)
        assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
        assert data_of(ws.recv(timeout=5)) == "from cron"
        done = run_python(publish_django, cwd=short_tmp)  # cron's working directory is ~
        assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
        assert data_of(ws.recv(timeout=5)) == "from django"
    lost = run_python(publish_cron, cwd=short_tmp)
    assert lost.returncode == 1
    assert f"no running stack was found from {short_tmp} upwards" in lost.stderr


def test_the_worker_log_has_each_line_once(stack: Stack) -> None:
    log = (stack.log_dir / "ws.log").read_text()
    starts = Counter(re.findall(r"(\d+)\]\s+\[?INFO\]? Serving on fd://", log))
    assert starts and set(starts.values()) == {1}, log[:2000]


def test_a_websocket_is_closed_when_its_token_expires(stack: Stack) -> None:
    alice = token(stack, "alice")
    with (
        connect(ws_url(stack, "user:alice", token=alice)) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        while True:
            ws.recv(timeout=TOKEN_MAX_AGE + 5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401, "token expired")
    assert alice not in (stack.log_dir / "ws.log").read_text()


def test_an_event_stream_ends_when_its_token_expires(stack: Stack) -> None:
    alice = token(stack, "alice")
    url = stack.url() + f"events/user:alice?token={alice}"
    with urllib.request.urlopen(url, timeout=TOKEN_MAX_AGE + 5) as response:
        lines = [line.decode() for line in iter(response.readline, b"")]  # until the end
    assert "event: expired\n" in lines, lines
    assert alice not in (stack.log_dir / "ws.log").read_text()


def circusctl(stack: Stack, *args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "circusctl"), "--endpoint",
                    stack.circus_endpoint, *args], check=True, capture_output=True,
                   timeout=60)  # fmt: skip


def test_the_worker_tells_its_health_through_nginx_and_its_socket(stack: Stack) -> None:
    status, body = http_status(stack.url() + "ws/_health")
    assert status == 200 and json.loads(body)["reason"] == "delivering"
    assert realtime.health(stack.ws_socket) == realtime.Health(True, "delivering")
    healthy = stackctl("status", cwd=stack.stack_dir)
    assert re.search(r"^realtime +ok +delivering$", healthy.stdout, re.M), healthy.stdout
    assert re.search(r"^redis +ok +answers$", healthy.stdout, re.M)
    circusctl(stack, "stop", "redis")
    try:
        wait_for(lambda: not realtime.health(stack.ws_socket).ok, what="an unhealthy worker")
        status, body = http_status(stack.url() + "ws/_health")
        assert status == 503 and "Redis" in json.loads(body)["reason"]
        assert "Redis" in realtime.health(stack.ws_socket).reason
        # Every process of the stack still runs, and `stackctl status` says it does not work.
        unhealthy = stackctl("status", cwd=stack.stack_dir, check=False)
        assert unhealthy.returncode == 1, unhealthy.stdout
        assert re.search(r"^redis +FAILING +does not answer", unhealthy.stdout, re.M)
        assert re.search(r"^realtime +FAILING +.*Redis", unhealthy.stdout, re.M)
        assert re.search(r"^site +ok", unhealthy.stdout, re.M)
    finally:
        circusctl(stack, "start", "redis")
    wait_for(lambda: realtime.health(stack.ws_socket).ok, what="the worker to recover")
    assert stackctl("status", cwd=stack.stack_dir).returncode == 0
    assert realtime.health(stack.stack_dir / "nothing.sock").ok is False
