"""Django Channels and Socket.IO in the failures stackctl's failover benchmark runs.

    python benchmarks/peers_failover.py [--quick] [--peers channels,socketio] [--scenarios ...]

Each peer runs as its users deploy it across hosts, here on 127.0.0.1 only:

- ``channels``: daphne + channels_redis's RedisChannelLayer; ``channels_pubsub``: the same with
  RedisPubSubChannelLayer; ``socketio``: python-socketio's AsyncServer with AsyncRedisManager,
  served by uvicorn, websocket transport only (so that no sticky sessions are needed).
- An external publisher sends numbered messages at a steady rate to one group (room) through
  the peer's own cross-process API: ``channel_layer.group_send``, or Socket.IO's write-only
  AsyncRedisManager ``emit``.
- The clients (one asyncio loop in this process) join that group; when their connection ends
  they connect again at once, to the other server if there is one, and join again.

Scenarios:

1. ``app_host_loss``: servers A and B share one Redis (password set); every client is on A.
   A is killed (SIGKILL, like a host that dies); the clients reconnect to B. Counted per client:
   acknowledged messages it never received, duplicates, and the seconds from the kill to its
   join on B.
2. ``redis_primary_loss``: a primary, 2 replicas and 3 Sentinels (password set on all), the peer
   configured for Sentinel. The primary is killed (SIGKILL) under publishing load. Counted:
   messages whose publish call returned normally but that a client never received (peers send
   no gap notice, so every such loss is unannounced), and the seconds from the kill to the first
   delivery of a message published after it.

The presets keep every peer within what it sustains on 2 cores: no loss of messages
acknowledged over a second before the kill (the "pre-kill" column). At 100 msg/s to 200 clients
both Channels layers fall behind, and the backlog they hold dies with server A, which would count
overload as failover loss.

Every process is started here and stopped by pid when its block ends, whatever happens.
Prints a table, then one JSON line {"peers": {<peer>: {<scenario>: {...}}}}; ``measure()``
returns the same dict for benchmarks/failover.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis  # noqa: E402
from common import _program, free_port, started, wait_tcp, workdir  # noqa: E402
from ws_fanout import CHANNELS_ASGI  # noqa: E402

from stackctl.render.redis import SENTINEL_DOWN_AFTER_MS, SENTINEL_FAILOVER_TIMEOUT_MS  # noqa: E402
from stackctl.stack import find_redis_server  # noqa: E402

PEERS = ("channels", "channels_pubsub", "socketio")
SCENARIOS = ("app_host_loss", "redis_primary_loss")
GROUP = "bench"  # the group (room) every client joins; CHANNELS_ASGI's consumer names it too
MASTER = "bench"  # the Sentinels' name for the primary
# Sentinel's failure detection, the knob that sets how long a failover takes: stackctl's own
# failover run must use the same values for the seconds to compare.
# Sentinel as stackctl's redis hosts run it, so that the seconds to a promotion compare.
DOWN_AFTER_MS = SENTINEL_DOWN_AFTER_MS
FAILOVER_TIMEOUT_MS = SENTINEL_FAILOVER_TIMEOUT_MS
RECONNECT_PAUSE = 0.05  # between a client's attempts: "as fast as it can", without spinning
SETTLE_SECONDS = 1.0
DRAIN_SECONDS = 3.0
JOIN_PATIENCE = 60.0
PUBLISH_TIMEOUT = 5.0
IN_FLIGHT_SECONDS = 1.0  # far longer than any delivery takes when a server keeps up
HANDSHAKE = (
    "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@dataclass(frozen=True)
class Load:
    clients: int
    rate: float
    """Messages per second."""
    before: float
    """Seconds of publishing before the kill."""
    after: float
    """Seconds of publishing after it."""

    @property
    def messages(self) -> int:
        return int(self.rate * (self.before + self.after))


FULL = {"app_host_loss": Load(200, 20, 3, 10), "redis_primary_loss": Load(200, 20, 3, 15)}
QUICK = {"app_host_loss": Load(50, 10, 2, 6), "redis_primary_loss": Load(50, 10, 2, 10)}


@dataclass(frozen=True)
class RedisPlace:
    """Where a peer finds Redis: one server, or the Sentinels that know the primary."""

    password: str
    port: int = 0
    sentinels: tuple[int, ...] = ()


# ---- the peers: their server programs, their configuration, their publishing API ----

CHANNELS_SETTINGS = """
import json, os
SECRET_KEY = "bench"
INSTALLED_APPS = ["channels"]
ASGI_APPLICATION = "bench_asgi.application"
with open(os.environ["PEER_CONFIG"]) as config:
    CHANNEL_LAYERS = json.load(config)
"""

SOCKETIO_APP = """
import json, os
import socketio

with open(os.environ["PEER_CONFIG"]) as config:
    redis = json.load(config)
manager = socketio.AsyncRedisManager(redis["url"], redis_options=redis["options"])
sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, transports=["websocket"])


@sio.event
async def connect(sid, environ):
    await sio.enter_room(sid, "bench")


app = socketio.ASGIApp(sio)
"""

LAYERS = {
    "channels": "channels_redis.core.RedisChannelLayer",
    "channels_pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}


def channels_hosts(place: RedisPlace) -> list[dict[str, Any]]:
    """channels_redis's "hosts": a dict per shard, passwords as keys (never in a URL)."""
    if place.sentinels:
        return [{"sentinels": [["127.0.0.1", port] for port in place.sentinels],
                 "master_name": MASTER, "password": place.password,
                 "sentinel_kwargs": {"password": place.password}}]  # fmt: skip
    return [{"host": "127.0.0.1", "port": place.port, "password": place.password}]


def socketio_redis(place: RedisPlace) -> tuple[str, dict[str, Any]]:
    """AsyncRedisManager's URL and redis_options (the password goes in the options)."""
    if place.sentinels:
        hosts = ",".join(f"127.0.0.1:{port}" for port in place.sentinels)
        # redis_options go to redis-py's Sentinel(): the password for the primary, and
        # sentinel_kwargs for the Sentinels themselves.
        options = {"password": place.password, "sentinel_kwargs": {"password": place.password}}
        return f"redis+sentinel://{hosts}/0/{MASTER}", options
    return f"redis://127.0.0.1:{place.port}/0", {"password": place.password}


Send = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Peer:
    name: str
    path: str
    """The websocket URL path the clients open."""
    socketio: bool
    write_files: Callable[[Path, RedisPlace], dict[str, str]]
    """Write the server's files; returns the environment it runs with."""
    command: Callable[[Path, int], list[str]]
    """The server listening on 127.0.0.1:port."""
    sender: Callable[[RedisPlace], AbstractAsyncContextManager[Send]]


def channels_peer(name: str) -> Peer:
    def write_files(run: Path, place: RedisPlace) -> dict[str, str]:
        (run / "bench_settings.py").write_text(CHANNELS_SETTINGS)
        (run / "bench_asgi.py").write_text(CHANNELS_ASGI)
        layers = {"default": {"BACKEND": LAYERS[name], "CONFIG": {"hosts": channels_hosts(place)}}}
        return {"DJANGO_SETTINGS_MODULE": "bench_settings", **secret_file(run, layers)}

    def command(run: Path, port: int) -> list[str]:
        return [_program("daphne"), "-b", "127.0.0.1", "-p", str(port), "bench_asgi:application"]

    @asynccontextmanager
    async def sender(place: RedisPlace) -> AsyncIterator[Send]:
        from channels_redis.core import RedisChannelLayer
        from channels_redis.pubsub import RedisPubSubChannelLayer

        layer_class = RedisChannelLayer if name == "channels" else RedisPubSubChannelLayer
        layer = layer_class(hosts=channels_hosts(place))

        async def send(n: int) -> None:
            await layer.group_send(GROUP, {"type": "bench.message", "text": str(n)})

        try:
            yield send
        finally:
            with suppress(Exception):
                # The core layer's flush() would delete the groups: close its pools instead.
                await (layer.close_pools() if name == "channels" else layer.flush())

    return Peer(name, "/ws/bench", False, write_files, command, sender)


class GaveUp(logging.Handler):
    """Counts AsyncRedisManager's "giving up" log lines: emit() itself never raises."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "giving up" in record.getMessage()


def socketio_peer() -> Peer:
    def write_files(run: Path, place: RedisPlace) -> dict[str, str]:
        (run / "sio_app.py").write_text(SOCKETIO_APP)
        url, options = socketio_redis(place)
        return secret_file(run, {"url": url, "options": options})

    def command(run: Path, port: int) -> list[str]:
        return [_program("uvicorn"), "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--app-dir", str(run), "sio_app:app"]  # fmt: skip

    @asynccontextmanager
    async def sender(place: RedisPlace) -> AsyncIterator[Send]:
        import socketio

        url, options = socketio_redis(place)
        logger = logging.getLogger("peers_failover.socketio")
        logger.propagate = False  # its failures are counted, not printed per message
        gave_up = GaveUp()
        logger.addHandler(gave_up)
        manager = socketio.AsyncRedisManager(url, write_only=True, redis_options=options,
                                             logger=logger)  # fmt: skip

        async def send(n: int) -> None:
            before = gave_up.count
            await manager.emit("bench", n, room=GROUP, namespace="/")
            if gave_up.count > before:
                # Only this benchmark knows: the application saw emit() return normally.
                raise Unannounced

        try:
            yield send
        finally:
            logger.removeHandler(gave_up)
            if manager.redis is not None:
                with suppress(Exception):
                    await manager.redis.aclose()

    return Peer("socketio", "/socket.io/?EIO=4&transport=websocket", True, write_files,
                command, sender)  # fmt: skip


class Unannounced(Exception):
    """A publish that failed without telling its caller."""


def secret_file(run: Path, config: object) -> dict[str, str]:
    """Write a server's configuration (it holds the Redis password) readable by its owner only,
    and name it in the environment: a password on a command line is visible to every user."""
    path = run / "peer_config.json"
    path.touch(mode=0o600)
    path.write_text(json.dumps(config))
    return {"PEER_CONFIG": str(path), "PYTHONPATH": str(run)}


def make_peer(name: str) -> Peer:
    return socketio_peer() if name == "socketio" else channels_peer(name)


# ---- Redis: one server, or a primary, replicas and Sentinels ----


def redis_conf(run: Path, name: str, lines: list[str]) -> Path:
    path = run / f"{name}.conf"
    (run / name).mkdir()
    path.touch(mode=0o600)
    path.write_text("\n".join([f"dir {run / name}", "bind 127.0.0.1", 'save ""',
                               "appendonly no", *lines, ""]))  # fmt: skip
    return path


def data_server_conf(run: Path, name: str, port: int, password: str, primary: int = 0) -> Path:
    lines = [f"port {port}", f"requirepass {password}", f"masterauth {password}"]
    if primary:
        lines.append(f"replicaof 127.0.0.1 {primary}")
    return redis_conf(run, name, lines)


def sentinel_conf(run: Path, name: str, port: int, password: str, primary: int) -> Path:
    return redis_conf(run, name, [
        f"port {port}",
        f"requirepass {password}",
        f"sentinel sentinel-pass {password}",  # the Sentinels talk to each other with it
        f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2",
        f"sentinel auth-pass {MASTER} {password}",
        f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
    ])  # fmt: skip


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(redis.RedisError, OSError):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not within {timeout} s")


@contextmanager
def lone_redis(run: Path) -> Iterator[RedisPlace]:
    place = RedisPlace(secrets.token_hex(16), port=free_port())
    conf = data_server_conf(run, "redis", place.port, place.password)
    with started([find_redis_server(), str(conf)], cwd=run):
        wait_until(partial(ask, place.port, place.password, redis.Redis.ping), "Redis answering")
        yield place


@dataclass(frozen=True)
class Replicated:
    place: RedisPlace
    primary_pid: int
    primary_port: int


@contextmanager
def sentinel_redis(run: Path) -> Iterator[Replicated]:
    password = secrets.token_hex(16)
    primary, *replicas = (free_port() for _ in range(3))
    place = RedisPlace(password, sentinels=tuple(free_port() for _ in range(3)))
    server = find_redis_server()
    confs = [data_server_conf(run, "primary", primary, password)]
    confs += [data_server_conf(run, f"replica{i}", port, password, primary)
              for i, port in enumerate(replicas)]  # fmt: skip
    sentinels = [[server, str(sentinel_conf(run, f"sentinel{i}", port, password, primary)),
                  "--sentinel"] for i, port in enumerate(place.sentinels)]  # fmt: skip
    with started(*([server, str(conf)] for conf in confs), *sentinels, cwd=run) as procs:
        for port in replicas:
            wait_until(partial(replica_in_sync, port, password), f"replica on {port} in sync")
        for port in place.sentinels:
            wait_until(partial(sentinel_ready, port, password),
                       f"Sentinel on {port} seeing its peers and the replicas")  # fmt: skip
        yield Replicated(place, procs[0].pid, primary)


def ask(port: int, password: str, question: Callable[[Any], Any]) -> Any:
    """Ask the Redis or Sentinel on 127.0.0.1:port, on a connection of its own."""
    with redis.Redis(port=port, password=password, socket_timeout=2) as connection:
        return question(connection)


def replica_in_sync(port: int, password: str) -> bool:
    info = ask(port, password, lambda replica: replica.info("replication"))
    return bool(info["master_link_status"] == "up")


def sentinel_ready(port: int, password: str) -> bool:
    state = ask(port, password, lambda sentinel: sentinel.sentinel_master(MASTER))
    return int(state["num-other-sentinels"]) == 2 and int(state["num-slaves"]) == 2


def primary_port(place: RedisPlace) -> int:
    """The primary's port as a Sentinel that answers says, or 0."""
    for port in place.sentinels:
        with suppress(redis.RedisError, OSError):
            address = ask(
                port,
                place.password,
                lambda sentinel: sentinel.sentinel_get_master_addr_by_name(MASTER),
            )
            if address:
                return int(address[1])
    return 0


# ---- the clients ----


@dataclass
class Member:
    """One client across its connections: what it received, when it joined and left."""

    counts: bytearray
    joins: list[float] = field(default_factory=list)
    drops: list[float] = field(default_factory=list)


@dataclass
class Crowd:
    peer: Peer
    messages: int
    members: list[Member] = field(default_factory=list)
    first_receipt: dict[int, float] = field(default_factory=dict)
    key: str = field(default_factory=lambda: base64.b64encode(os.urandom(16)).decode())
    closing: bool = False
    """Set when the run ends: the connections closed then are not drops."""

    def add(self) -> Member:
        self.members.append(Member(bytearray(self.messages)))
        return self.members[-1]

    def received(self, member: Member, n: int) -> None:
        self.first_receipt.setdefault(n, time.time())
        if member.counts[n] < 255:
            member.counts[n] += 1


def frame(opcode: int, payload: bytes) -> bytes:
    """A client frame: masked, as clients must, with the zero mask (payload unchanged)."""
    return bytes([0x80 | opcode, 0x80 | len(payload), 0, 0, 0, 0]) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length >= 126:
        length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8), "big")
    return head[0] & 0x0F, await reader.readexactly(length)


async def session(crowd: Crowd, member: Member, port: int) -> None:
    """One connection: handshake, join, receive until it ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    joined = False

    def join() -> None:
        nonlocal joined
        joined = True
        member.joins.append(time.time())

    try:
        writer.write(HANDSHAKE.format(target=crowd.peer.path, key=crowd.key).encode())
        if not (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101"):
            return
        if not crowd.peer.socketio:
            join()  # the consumer joined its group before accepting
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == 0x8:
                return
            if opcode == 0x9:
                writer.write(frame(0xA, payload))
            elif opcode == 0x1 and not crowd.peer.socketio:
                crowd.received(member, int(payload))
            elif opcode == 0x1 and not socketio_packet(crowd, member, payload, writer, join):
                return
    finally:
        if joined and not crowd.closing:
            member.drops.append(time.time())
        writer.close()


def socketio_packet(
    crowd: Crowd, member: Member, packet: bytes, writer: asyncio.StreamWriter,
    join: Callable[[], None],
) -> bool:  # fmt: skip
    """Engine.IO and Socket.IO packets; False when the server ends the session."""
    if packet.startswith(b"42["):  # an event: ["bench", n]
        crowd.received(member, int(packet[packet.rindex(b",") + 1 : -1]))
    elif packet.startswith(b"0{"):  # Engine.IO open: connect to the namespace
        writer.write(frame(0x1, b"40"))
    elif packet.startswith(b"40"):  # connected, and so in the room
        join()
    elif packet == b"2":  # ping
        writer.write(frame(0x1, b"3"))
    elif packet.startswith((b"1", b"41", b"44")):  # close, disconnect, connect error
        return False
    return True


async def keep_connected(crowd: Crowd, member: Member, ports: tuple[int, ...]) -> None:
    """Join on the first server (trying again until it works); once a connection that had
    joined ends, connect to the last server, again and again."""
    while True:
        with suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                      ValueError):  # fmt: skip
            await session(crowd, member, ports[-1] if member.joins else ports[0])
        await asyncio.sleep(RECONNECT_PAUSE)


# ---- one run ----


@dataclass(frozen=True)
class Publish:
    start: float
    end: float
    outcome: str
    """"ok" (the call returned normally), "failed" (it raised), or "unannounced" (it returned
    normally but the peer only logged the failure)."""


def publish_all(peer: Peer, place: RedisPlace, load: Load, t0: float) -> list[Publish]:
    """Publish messages 0..M-1 on a fixed schedule from t0, in this thread's own event loop."""

    async def run() -> list[Publish]:
        done = []
        async with peer.sender(place) as send:
            for n in range(load.messages):
                await asyncio.sleep(max(0.0, t0 + n / load.rate - time.time()))
                start = time.time()
                try:
                    await asyncio.wait_for(send(n), PUBLISH_TIMEOUT)
                    outcome = "ok"
                except Unannounced:
                    outcome = "unannounced"
                except Exception:
                    outcome = "failed"
                done.append(Publish(start, time.time(), outcome))
        return done

    return asyncio.run(run())


async def wait_joined(members: list[Member], timeout: float = JOIN_PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(m.joins for m in members):
        await asyncio.sleep(0.05)


async def run_clients(
    peer: Peer, ports: tuple[int, ...], place: RedisPlace, load: Load, kill: Callable[[], None]
) -> tuple[Crowd, list[Publish], float]:
    """Clients on ports[0] (falling back to ports[-1]), publishing, the kill mid-way."""
    crowd = Crowd(peer, load.messages)
    members = [crowd.add() for _ in range(load.clients)]
    tasks = [asyncio.create_task(keep_connected(crowd, m, ports)) for m in members]
    try:
        await wait_joined(members)
        if len(ports) > 1:
            await warm_up(peer, ports[-1])
        await asyncio.sleep(SETTLE_SECONDS)
        t0 = time.time()
        publishing = asyncio.create_task(asyncio.to_thread(publish_all, peer, place, load, t0))
        await asyncio.sleep(max(0.0, t0 + load.before - time.time()))
        killed_at = time.time()
        kill()
        publishes = await publishing
        await asyncio.sleep(DRAIN_SECONDS)
    finally:
        crowd.closing = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return crowd, publishes, killed_at


async def warm_up(peer: Peer, port: int) -> None:
    """One client joins server B and leaves, so that B has done its first-client work
    (Socket.IO subscribes to Redis only then) before it is needed."""
    probe = Crowd(peer, 0)
    task = asyncio.create_task(keep_connected(probe, probe.add(), (port,)))
    try:
        await wait_joined(probe.members)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def kill_group(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def app_host_loss(run: Path, peer: Peer, load: Load) -> dict[str, Any]:
    with lone_redis(run) as place:
        env = peer.write_files(run, place)
        ports = (free_port(), free_port())
        with started(*(peer.command(run, port) for port in ports), cwd=run, env=env) as procs:
            for port in ports:
                wait_tcp(port)
            crowd, publishes, killed_at = asyncio.run(
                run_clients(peer, ports, place, load, lambda: kill_group(procs[0].pid))
            )
    return tally(crowd.members, publishes, killed_at, crowd.first_receipt)


def redis_primary_loss(run: Path, peer: Peer, load: Load) -> dict[str, Any]:
    with sentinel_redis(run) as redis_set:
        place = redis_set.place
        env = peer.write_files(run, place)
        port = free_port()
        with started(peer.command(run, port), cwd=run, env=env):
            wait_tcp(port)
            promoted: list[float] = []

            def kill() -> None:
                kill_group(redis_set.primary_pid)
                threading.Thread(target=watch_promotion, daemon=True,
                                 args=(redis_set, load.after, promoted)).start()  # fmt: skip

            crowd, publishes, killed_at = asyncio.run(run_clients(peer, (port,), place, load, kill))
    result = tally(crowd.members, publishes, killed_at, crowd.first_receipt)
    result["promotion_seconds"] = round(promoted[0] - killed_at, 2) if promoted else None
    # The names of stackctl's own figures, for the rows to stand side by side: a peer sends no
    # gap notice, so every acknowledged message a client missed was lost unannounced.
    result["lost_unannounced"] = result["lost_messages"]
    result["failover_seconds"] = result["first_delivery_after_kill_s"]
    return result


def watch_promotion(redis_set: Replicated, timeout: float, promoted: list[float]) -> None:
    """Note when a Sentinel first names another primary."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if primary_port(redis_set.place) not in (0, redis_set.primary_port):
            promoted.append(time.time())
            return
        time.sleep(0.05)


def tally(
    members: list[Member], publishes: list[Publish], killed_at: float,
    first_receipt: dict[int, float],
) -> dict[str, Any]:  # fmt: skip
    """Totals over the clients that had joined before publishing began (all of them, when every
    handshake succeeded): every acknowledged message was theirs to receive."""
    t0 = publishes[0].start if publishes else killed_at
    counted = [m for m in members if m.joins and m.joins[0] < t0]
    acked = [n for n, p in enumerate(publishes) if p.outcome != "failed"]
    lost_by = [[n for n in acked if m.counts[n] == 0] for m in counted]
    # A message acknowledged just before the kill may die in flight with the server: loss
    # counted here is only what a server keeping up would have delivered long before.
    before_kill = {n for n in acked if publishes[n].end < killed_at - IN_FLIGHT_SECONDS}
    back = [
        min(j for j in m.joins if j > killed_at) - killed_at
        for m in counted
        if any(d >= killed_at for d in m.drops) and any(j > killed_at for j in m.joins)
    ]
    dropped = sum(any(d >= killed_at for d in m.drops) for m in counted)
    after = [first_receipt[n] - killed_at for n, p in enumerate(publishes)
             if p.start >= killed_at and n in first_receipt]  # fmt: skip
    duplicates = sum(c - 1 for m in counted for c in m.counts if c > 1)
    return {
        "clients": len(members),
        "joined": len(counted),
        "published": len(publishes),
        "acknowledged": len(acked),
        "failed_publishes": len(publishes) - len(acked),
        "unannounced_publish_failures": sum(p.outcome == "unannounced" for p in publishes),
        "lost_messages": sum(map(len, lost_by)),
        "messages_missed_by_some": len({n for lost in lost_by for n in lost}),
        "lost_well_before_kill": sum(n in before_kill for lost in lost_by for n in lost),
        "duplicates": duplicates,
        "clients_complete": sum(
            not lost and max(m.counts, default=0) <= 1
            for m, lost in zip(counted, lost_by, strict=True)
        ),
        "clients_dropped": dropped,
        "clients_not_back": dropped - len(back),
        "reconnect_p50_s": round(statistics.median(back), 2) if back else None,
        "reconnect_max_s": round(max(back), 2) if back else None,
        "first_delivery_after_kill_s": round(min(after), 2) if after else None,
    }


SCENARIO_RUNS: dict[str, Callable[[Path, Peer, Load], dict[str, Any]]] = {
    "app_host_loss": app_host_loss,
    "redis_primary_loss": redis_primary_loss,
}


def measure(
    peers: tuple[str, ...] = PEERS,
    scenarios: tuple[str, ...] = SCENARIOS,
    quick: bool = False,
    loads: dict[str, Load] | None = None,
    report: Callable[[str, str, dict[str, Any]], None] = lambda peer, scenario, row: None,
) -> dict[str, Any]:
    """Run every peer in every scenario; {"peers": {peer: {scenario: row}}}. A run that cannot
    complete gets {"error": "..."} as its row instead of stopping the others."""
    chosen = loads or (QUICK if quick else FULL)
    results: dict[str, dict[str, Any]] = {}
    for name in peers:
        for scenario in scenarios:
            with workdir() as run:
                try:
                    row = SCENARIO_RUNS[scenario](run, make_peer(name), chosen[scenario])
                except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                    row = {"error": str(error)}
            row["load"] = vars(chosen[scenario])
            results.setdefault(name, {})[scenario] = row
            report(name, scenario, row)
    return {"peers": results}


COLUMNS = (
    ("joined", "joined", 6),
    ("acknowledged", "acked", 6),
    ("failed_publishes", "failed", 6),
    ("lost_messages", "lost", 6),
    ("lost_well_before_kill", "pre-kill", 8),
    ("duplicates", "dup", 5),
    ("clients_complete", "complete", 8),
    ("reconnect_p50_s", "back p50", 8),
    ("reconnect_max_s", "back max", 8),
    ("first_delivery_after_kill_s", "1st after", 9),
    ("promotion_seconds", "promoted", 8),
)


def print_row(peer: str, scenario: str, row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"  {peer:<16} {scenario:<19} ERROR {row['error']}", flush=True)
        return
    cells = " ".join(f"{'-' if row.get(k) is None else row[k]!s:>{w}}" for k, _, w in COLUMNS)
    print(f"  {peer:<16} {scenario:<19} {cells}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer clients, shorter runs")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--clients", type=int, help="clients per run (overrides the preset)")
    parser.add_argument("--rate", type=float, help="messages per second (overrides the preset)")
    args = parser.parse_args()
    peers, scenarios = tuple(args.peers.split(",")), tuple(args.scenarios.split(","))
    for chosen, allowed in ((peers, PEERS), (scenarios, SCENARIOS)):
        unknown = set(chosen) - set(allowed)
        if unknown:
            parser.error(f"unknown {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
    loads = {
        scenario: replace(load, clients=args.clients or load.clients, rate=args.rate or load.rate)
        for scenario, load in (QUICK if args.quick else FULL).items()
    }
    for scenario in scenarios:
        load = loads[scenario]
        print(f"{scenario}: {load.clients} clients, {load.rate:g} msg/s, kill after "
              f"{load.before:g} s, {load.after:g} s more")  # fmt: skip
    print(f"  {'':<16} {'':<19} " + " ".join(f"{title:>{w}}" for _, title, w in COLUMNS))
    result = measure(peers, scenarios, loads=loads, report=print_row)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
