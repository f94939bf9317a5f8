"""Realtime delivery across a Redis failover: a primary, two replicas and three Sentinels
(tests/redis_ha.py), the primary killed with SIGKILL while publish() runs from several threads
and websocket clients follow through a real stack. What must hold: publish() goes on once a
replica is promoted; every acknowledged message reaches each client once, or the client is told
of a gap on its channel; ids only increase; the old primary back as a replica changes nothing."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect

from stackctl import realtime
from stackctl.stack import Stack
from tests.conftest import free_port, running_stack, short_dir, stackctl, wait_for
from tests.e2e.test_realtime import ws_url
from tests.redis_ha import RedisHA, redis_ha

pytestmark = pytest.mark.e2e

LIMITS = (1000, 0)
CHANNELS = ("f1", "f2", "f3")


@pytest.fixture(scope="module")
def ha() -> Iterator[RedisHA]:
    directory = short_dir() / "redis"
    directory.mkdir()
    with redis_ha(directory) as running:
        yield running


@pytest.fixture(scope="module")
def stack(ha: RedisHA) -> Iterator[Stack]:
    """A stack whose redis.url names the Sentinels, with the password in its private file."""
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    private = root / "site" / ".stackctl"
    private.mkdir(mode=0o700, exist_ok=True)
    (private / "redis-password").write_text(ha.password + "\n")
    # A resuming client gets all that was published since before the failover at once.
    with running_stack(root / "site", "--workers", "1", "--set", f"redis.url={ha.url}",
                       "--set", "ws.queue_limit=5000") as up:  # fmt: skip
        yield up


def revive(ha: RedisHA) -> None:
    """Start again any server a test killed (Sentinel makes it a replica), and wait until the
    whole set is healthy: each test starts from a primary with two replicas."""
    for node in ha.servers:
        if node.process is None or node.process.poll() is not None:
            node.start()
    wait_for(ha.healthy, 60, "Redis and Sentinel to be healthy again")


def publisher(ha: RedisHA) -> redis.Redis:
    return realtime.client(ha.url, password_file=str(ha.password_file))


def test_publish_waits_out_a_failover_and_its_ids_keep_increasing(ha: RedisHA) -> None:
    revive(ha)
    connection = publisher(ha)
    realtime.publish_json(connection, "solo", '"before"', LIMITS)
    (before,) = realtime.history(connection, ["solo"], "0-0", LIMITS).envelopes
    old = ha.kill_primary()
    # No wait for the promotion: publish() itself waits it out.
    realtime.publish_json(connection, "solo", '"after"', LIMITS)
    assert ha.wait_for_promotion(old) != old
    since = json.loads(before)["id"]
    missed = realtime.history(connection, ["solo"], since, LIMITS)
    # The promoted replica cannot know what the dead primary issued after its last copy.
    assert missed.gaps == ["solo"]
    (after,) = missed.envelopes
    assert json.loads(after)["data"] == "after"
    assert realtime.id_key(json.loads(after)["id"]) > realtime.id_key(since)


def test_a_worker_ahead_of_redis_raises_the_ids_and_leaves_a_break(ha: RedisHA) -> None:
    revive(ha)
    connection = publisher(ha)
    realtime.publish_json(connection, "ahead", '"before"', LIMITS)
    last = json.loads(realtime.history(connection, ["ahead"], "0-0", LIMITS).envelopes[-1])["id"]
    # What a worker delivered from a primary whose last writes never reached this one.
    ms, _ = realtime.id_key(last)
    delivered = f"{ms + 5000}-3"
    counter = realtime.raise_last_id(connection, delivered)
    assert realtime.id_key(counter) > realtime.id_key(delivered)
    realtime.publish_json(connection, "ahead", '"after"', LIMITS)
    for since in (last, delivered):  # both may have missed what the lost primary issued
        missed = realtime.history(connection, ["ahead"], since, LIMITS)
        assert missed.gaps == ["ahead"]
        (after,) = missed.envelopes
        assert realtime.id_key(json.loads(after)["id"]) > realtime.id_key(delivered)
    # An id an hour ahead of Redis's clock is not from a primary: it moves nothing.
    assert realtime.raise_last_id(connection, f"{ms + 3_600_000}-0") == json.loads(after)["id"]


class ReplyEater(threading.Thread):
    """A TCP proxy to Redis that, once, passes a publish on but closes the client's connection
    instead of passing the reply back: the reply lost in a failover, as the client sees it."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.eaten = threading.Event()

    def run(self) -> None:
        with suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client: socket.socket) -> None:
        server = socket.create_connection(self.target)
        drop = threading.Event()
        back = threading.Thread(target=self.answer, args=(server, client, drop), daemon=True)
        back.start()
        with suppress(OSError):
            while chunk := client.recv(65536):
                if realtime.ONCE_PREFIX.encode() in chunk and not self.armed.is_set():
                    self.armed.set()
                    drop.set()  # before Redis can answer
                server.sendall(chunk)
        self.cut(client, server)
        back.join(timeout=10)
        client.close()
        server.close()

    def answer(self, server: socket.socket, client: socket.socket, drop: threading.Event) -> None:
        with suppress(OSError):
            while chunk := server.recv(65536):
                if drop.is_set():
                    self.eaten.set()  # executed by Redis; the reply never reaches the client
                    break
                client.sendall(chunk)
        self.cut(client, server)

    @staticmethod
    def cut(*sockets: socket.socket) -> None:
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def test_a_publish_whose_reply_was_lost_is_not_published_twice(ha: RedisHA) -> None:
    revive(ha)
    host, port = ha.primary().address
    proxy = ReplyEater((host, port))
    proxy.start()
    try:
        # A password inside a redis:// URL keeps working (no password file here).
        url = f"redis://:{ha.password}@127.0.0.1:{proxy.port}/0"
        connection = realtime.connect(url, socket_timeout=5, retry=realtime.NO_RETRY)
        realtime.publish_json(connection, "once", '"warms up the script"', LIMITS)
        since = realtime.history(connection, ["once"], "0-0", LIMITS).envelopes[-1]
        realtime.publish_json(connection, "once", '"only once"', LIMITS)
        assert proxy.eaten.is_set()
        missed = realtime.history(connection, ["once"], json.loads(since)["id"], LIMITS)
        assert [json.loads(e)["data"] for e in missed.envelopes] == ["only once"]
        connection.close()
    finally:
        proxy.listener.close()


class Client(threading.Thread):
    """A websocket client that resumes from the last id it saw, as realtime.js does, and
    records when each message (or gap notice) arrived."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.connected = threading.Event()
        self.done = threading.Event()
        self.connects: list[tuple[float, str]] = []

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [m for _, m in self.received if "id" in m]

    def gaps_after(self, moment: float) -> set[str]:
        return {m["channel"] for t, m in self.received if m.get("gap") and t >= moment}

    def run(self) -> None:
        while not self.done.is_set():
            ids = [m["id"] for m in self.messages]
            since = f"?since={ids[-1]}" if ids else ""
            with (
                suppress(ConnectionClosed, OSError, InvalidHandshake),
                connect(self.url + since, open_timeout=5) as ws,
            ):
                self.connects.append((time.monotonic(), since))
                self.connected.set()
                while not self.done.is_set():
                    with suppress(TimeoutError):
                        text = ws.recv(timeout=0.2)
                        self.received.append((time.monotonic(), json.loads(text)))
            time.sleep(0.1)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)


@dataclass
class Sent:
    channel: str
    data: str
    started: float


@dataclass(eq=False)  # a thread: hashed by identity
class Load(threading.Thread):
    """publish() in a loop, on the channels in turn; keeps what was acknowledged."""

    connection: redis.Redis
    tag: str
    acknowledged: list[Sent] = field(default_factory=list)
    failed: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        super().__init__(daemon=True)

    def run(self) -> None:
        n = 0
        while not self.done.wait(0.03):
            sent = Sent(CHANNELS[n % len(CHANNELS)], f"{self.tag}-{n}", time.monotonic())
            try:
                realtime.publish_json(self.connection, sent.channel, json.dumps(sent.data), LIMITS)
                self.acknowledged.append(sent)
            except redis.RedisError:
                self.failed += 1
            n += 1


@dataclass
class Run:
    """Clients following every channel, and publishers, while a test breaks Redis."""

    clients: list[Client]
    loads: list[Load]

    @property
    def acknowledged(self) -> list[Sent]:
        return [sent for load in self.loads for sent in load.acknowledged]

    def settled(self, strict_after: float) -> bool:
        """Every acknowledged message has reached each client, or its channel got a gap
        (only for messages whose publish() began before ``strict_after``)."""
        for client in self.clients:
            delivered, gaps = {m["data"] for m in client.messages}, client.gaps_after(0)
            for sent in self.acknowledged:
                excused = sent.channel in gaps and sent.started < strict_after
                if sent.data not in delivered and not excused:
                    return False
        return True

    def stop_publishing(self, strict_after: float) -> None:
        for load in self.loads:
            load.done.set()
            load.join(timeout=30)
        wait_for(lambda: self.settled(strict_after), 30,
                 "every acknowledged message (or a gap notice) at every client")  # fmt: skip

    def gaps_told(self, since: float) -> bool:
        """Every client got a gap notice on every channel after ``since``."""
        return all(client.gaps_after(since) == set(CHANNELS) for client in self.clients)


@pytest.fixture
def run(stack: Stack, ha: RedisHA) -> Iterator[Run]:
    revive(ha)
    clients = [Client(ws_url(stack, ",".join(CHANNELS))) for _ in range(6)]
    loads = [Load(publisher(ha), f"t{n}") for n in range(3)]
    try:
        for client in clients:
            client.start()
        for client in clients:
            assert client.connected.wait(10)
        time.sleep(0.5)  # every client subscribed: the first messages reach them all
        for load in loads:
            load.start()
        yield Run(clients, loads)
    finally:
        for load in loads:
            load.done.set()
            load.join(timeout=30)
        for client in clients:
            client.stop()


def worker_log(stack: Stack) -> str:
    """The end of the websocket worker's log, for a failure message."""
    return "the worker's log ends with:\n" + (stack.log_dir / "ws.log").read_text()[-3000:]


def check_exactly_once(run: Run, client: Client, strict_after: float, stack: Stack) -> None:
    """Ids strictly increase; each acknowledged message arrived once, or its channel got a gap
    notice; one whose publish() began at ``strict_after`` or later arrived once, gap or not."""
    ids = [realtime.id_key(m["id"]) for m in client.messages]
    back = [n for n in range(1, len(ids)) if ids[n] <= ids[n - 1]]
    assert not back, (f"ids went back or repeated: {client.messages[back[0] - 3:back[0] + 3]}"
                      f" after connecting {client.connects}; {worker_log(stack)}")
    seen = Counter(m["data"] for m in client.messages)
    gaps = client.gaps_after(0)
    for sent in run.acknowledged:
        if sent.channel not in gaps or sent.started >= strict_after:
            assert seen[sent.data] == 1, (f"{sent} arrived {seen[sent.data]} time(s) after "
                                          f"connecting {client.connects}; {worker_log(stack)}")


def test_clients_of_a_stack_follow_the_failover_once_or_with_a_gap(
    stack: Stack, ha: RedisHA, run: Run
) -> None:
    time.sleep(2)
    resume_from = run.clients[0].messages[-1]["id"]
    time.sleep(0.5)
    old = ha.kill_primary()
    killed = time.monotonic()
    ha.wait_for_promotion(old)
    promoted = time.monotonic()
    ha.wait_until_settled()
    settled = time.monotonic()
    time.sleep(2)
    run.stop_publishing(settled)
    started = {sent.data: sent.started for sent in run.acknowledged}
    first_after = min(t for c in run.clients for t, m in c.received
                      if "id" in m and started.get(m["data"], 0) > killed)  # fmt: skip
    assert run.acknowledged and all(load.failed == 0 for load in run.loads)
    for client in run.clients:
        check_exactly_once(run, client, settled, stack)
        # Its worker lost Redis and cannot know what the dead primary issued meanwhile.
        assert client.gaps_after(killed) == set(CHANNELS)
    # A client that was away, resuming from before the failover: gaps, then the history.
    with connect(ws_url(stack, ",".join(CHANNELS), since=resume_from)) as ws:
        frames = [json.loads(ws.recv(timeout=5)) for _ in CHANNELS]
        assert {f["channel"] for f in frames if f.get("gap")} == set(CHANNELS)
        replayed = []
        with suppress(TimeoutError):
            while True:
                replayed.append(json.loads(ws.recv(timeout=2)))
    keys = [realtime.id_key(m["id"]) for m in replayed]
    assert keys == sorted(set(keys)) and keys[0] > realtime.id_key(resume_from)
    assert {s.data for s in run.acknowledged if s.started >= settled} <= {
        m["data"] for m in replayed
    }
    status = stackctl("status", cwd=stack.stack_dir).stdout
    assert re.search(r"^\s*redis\s+.*answers", status, re.MULTILINE), status
    published = stackctl("publish", "f1", "from the command line", cwd=stack.stack_dir)
    assert "1 worker(s) listening" in published.stdout
    print(f"\nfailover: {promoted - killed:.1f} s to promotion, {first_after - killed:.1f} s "
          "to the first message delivered after the kill")  # fmt: skip
    for path in [*stack.stack_dir.rglob("*")]:
        if path.is_file() and path.name != "redis-password":
            assert ha.password.encode() not in path.read_bytes(), f"the password is in {path}"


def test_the_old_primary_back_as_a_replica_changes_nothing(
    stack: Stack, ha: RedisHA, run: Run
) -> None:
    time.sleep(1)
    old = ha.kill_primary()
    killed = time.monotonic()
    ha.wait_for_promotion(old)
    ha.wait_until_settled()
    wait_for(lambda: run.gaps_told(killed), 30, "the clients to be told of the failover")
    since = run.clients[0].messages[-1]["id"]
    settled = time.monotonic()
    old.start()  # with its append-only file: a primary that Sentinel turns into a replica
    wait_for(ha.healthy, 60, "the old primary to come back as a replica")
    assert ha.role(old) == "slave"
    time.sleep(2)
    run.stop_publishing(settled)
    for client in run.clients:
        check_exactly_once(run, client, settled, stack)
        assert not client.gaps_after(settled), worker_log(stack)
    with connect(ws_url(stack, ",".join(CHANNELS), since=since)) as ws:
        first = json.loads(ws.recv(timeout=5))
    assert "gap" not in first and realtime.id_key(first["id"]) > realtime.id_key(since)


def test_a_sentinel_url_with_a_password_is_refused_with_the_way_to_give_it(
    short_tmp: Path,
) -> None:
    stackctl("init", str(short_tmp / "site"), "--demo", cwd=short_tmp)
    url = f"sentinel://:hunter2@127.0.0.1:{free_port()}/main"
    result = stackctl("render", "--set", f"redis.url={url}", cwd=short_tmp / "site", check=False)
    assert result.returncode != 0
    assert "takes no password" in result.stderr and ".stackctl/redis-password" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
