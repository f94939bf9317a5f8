"""A whole cluster on one machine: one front, two app hosts and three redis hosts, each a
network namespace (tests.netns) running its own stack of the demo app with its own profile,
started and stopped with stackctl as a user would on six machines. For the several-hosts
test and benchmarks/failover.py.

The test process sits outside, on the bridge (``net.outside``): it sends HTTP and websocket
traffic to the front, publishes through the redis hosts' Sentinels, and enters a host's
namespace (``inside``) where a client must stand on that host, e.g. on the front to reach an
app host directly (its ports are open to the front hosts only).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from stackctl import realtime
from tests.followers import Follower
from tests.load import Load
from tests.netns import Host, Network

FRONT, APP_A, APP_B = "front", "app-a", "app-b"
REDIS_HOSTS = ("redis-1", "redis-2", "redis-3")
HOSTS = (FRONT, APP_A, APP_B, *REDIS_HOSTS)
HTTP_PORT = 8000
STACK_TIMEOUT = 180
CLIENT_PING = 1.0
"""Seconds between the test clients' pings: a client on a host that was cut off gives up on
it after as long again, and reconnects through the front."""
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


@dataclass
class Cluster:
    net: Network
    root: Path
    dirs: dict[str, Path] = field(default_factory=dict)

    def host(self, name: str) -> Host:
        return self.net[name]

    @property
    def front_url(self) -> str:
        return f"http://{self.net[FRONT].address}:{HTTP_PORT}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.net[FRONT].address}:{HTTP_PORT}/ws/"

    def app_ws_url(self, name: str) -> str:
        """An app host's websocket worker, reached directly (from the front's namespace)."""
        return f"ws://{self.net[name].address}:8002/ws/"

    @property
    def redis_url(self) -> str:
        sentinels = ",".join(f"{self.net[h].address}:26379" for h in REDIS_HOSTS)
        return f"sentinel://{sentinels}/stackctl"

    @property
    def password_file(self) -> Path:
        return self.dirs[FRONT] / ".stackctl" / "redis-password"

    def stackctl(self, name: str, *args: str, timeout: float = STACK_TIMEOUT,
                 check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run stackctl on a host, in its stack directory, with its profile."""
        command = [sys.executable, "-m", "stackctl", "-C", str(self.dirs[name]), *args]
        if args and args[0] in ("up", "reload", "render"):
            command += ["--profile", "host", "--set", "server.user=root"]
        result = self.net[name].run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"stackctl {' '.join(args)} on {name} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def up(self, *names: str) -> None:
        """Start the stacks of ``names`` at once, as several machines would."""
        in_parallel([lambda n=n: self.stackctl(n, "up", "--detach") for n in names])

    def down(self, *names: str) -> None:
        in_parallel([lambda n=n: self.stackctl(n, "down", check=False) for n in names])

    def write_profile(self, name: str, text: str) -> None:
        (self.dirs[name] / "profiles" / "host.toml").write_text(text)


def profile_text(cluster: Cluster, name: str, **extra: str) -> str:
    """The profile of host ``name``: what every host shares, then its own role and address."""
    address = {h: cluster.net[h].address for h in HOSTS}
    shared = {
        "front_hosts": f'["{address[FRONT]}"]',
        "app_hosts": f'["{address[APP_A]}", "{address[APP_B]}"]',
        "redis_hosts": "[" + ", ".join(f'"{address[h]}"' for h in REDIS_HOSTS) + "]",
    }
    shared.update(extra)
    role = (
        '["front"]' if name == FRONT
        else '["wsgi", "ws"]' if name in (APP_A, APP_B)
        else '["redis"]'
    )  # fmt: skip
    lines = ['extends = "prod"', "", "[server]", f'listen = "{address[name]}:{HTTP_PORT}"', ""]
    if name == FRONT:  # the test's clients all come from one address: the bridge's
        lines += ["[limits]", f'exempt = ["127.0.0.1", "{cluster.net.outside}"]', ""]
    # No cluster.address: each host finds its own in the lists (one profile per role).
    lines += ["[cluster]", f"roles = {role}"]
    lines += [f"{key} = {value}" for key, value in shared.items()]
    return "\n".join(lines) + "\n"


def make_sites(cluster: Cluster) -> None:
    """The demo site on every host, and the secrets made once and copied, as the README says."""
    for name in HOSTS:
        directory = cluster.root / name
        subprocess.run([sys.executable, "-m", "stackctl", "init", "--demo", str(directory)],
                       check=True, capture_output=True)  # fmt: skip
        (directory / "profiles").mkdir()
        cluster.dirs[name] = directory
        cluster.write_profile(name, profile_text(cluster, name))
    first = cluster.dirs[REDIS_HOSTS[0]]
    subprocess.run([sys.executable, "-m", "stackctl", "-C", str(first), "secrets"],
                   check=True, capture_output=True)  # fmt: skip
    for name in HOSTS:
        private = cluster.dirs[name] / ".stackctl"
        private.mkdir(mode=0o700, exist_ok=True)
        for secret in ("secret", "redis-password"):
            if private != first / ".stackctl":
                shutil.copy2(first / ".stackctl" / secret, private / secret)


@contextmanager
def app_environment(cluster: Cluster) -> Iterator[None]:
    """This process publishes as the app does: the variables `stackctl env` prints on an app
    host (the redis hosts' Sentinels and the password file), set while the block runs."""
    wanted = {realtime.REDIS_URL_VARIABLE: cluster.redis_url,
              realtime.PASSWORD_FILE_VARIABLE: str(cluster.password_file)}  # fmt: skip
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def running_cluster(root: Path) -> Iterator[Cluster]:
    """Six hosts, their stacks started in the order of the README (redis, app, front), and
    everything stopped and removed at the end, however the block ends."""
    with Network(HOSTS) as net:
        cluster = Cluster(net, root)
        make_sites(cluster)
        try:
            cluster.up(*REDIS_HOSTS)
            cluster.up(APP_A, APP_B)
            cluster.up(FRONT)
            yield cluster
        finally:
            cluster.down(*HOSTS)
        # Network's exit kills whatever a failed `down` left in the namespaces.


def in_parallel(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run ``jobs`` in threads; raise the first error once all have ended."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(index: int, job: Callable[[], Any]) -> None:
        try:
            results[index] = job()
        except BaseException as e:  # noqa: BLE001 - reported below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


_libc = ctypes.CDLL(None, use_errno=True)


def enter(host: Host) -> None:
    """Move the calling thread (only it: a network namespace is per thread) into ``host``:
    the sockets it opens from now on are that host's."""
    fd = os.open(f"/run/netns/{host.netns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {host.netns}")
    finally:
        os.close(fd)


def inside(host: Host, work: Callable[[], T]) -> T:
    """Run ``work`` in a thread that stands on ``host``; its result, or its error."""
    box: list[Any] = []

    def run() -> None:
        try:
            enter(host)
            box.append((True, work()))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            box.append((False, e))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


# --- the failures, shared by tests/e2e/test_several_hosts.py and benchmarks/failover.py -----


class Publisher(threading.Thread):
    """Publishes numbered messages through the redis hosts' Sentinels, as an app would, and
    keeps those publish() acknowledged, with when."""

    def __init__(self, url: str, channel: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.url, self.channel, self.interval = url, channel, interval
        self.acknowledged: dict[int, float] = {}
        """Message number -> time.monotonic() when its publish() call began, for those it
        returned from (the app saw them accepted)."""
        self.failed = 0
        self._stopping = threading.Event()

    def run(self) -> None:
        number = 0
        while not self._stopping.is_set():
            number += 1
            began = time.monotonic()
            try:
                realtime.publish(self.channel, {"n": number}, url=self.url)
                self.acknowledged[number] = began
            except Exception:  # noqa: BLE001 - not acknowledged: the app would see the error
                self.failed += 1
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=60)


@contextmanager
def following(urls: list[str], before: Callable[[], None] | None = None,
              ) -> Iterator[list[Follower]]:  # fmt: skip
    followers = [Follower(url, ping_interval=CLIENT_PING, before=before) for url in urls]
    for follower in followers:
        follower.start()
    try:
        for follower in followers:
            assert follower.connected.wait(30), f"{follower.url} never connected"
        yield followers
    finally:
        for follower in followers:
            follower.stop()


def numbers(follower: Follower) -> list[int]:
    return [m["data"]["n"] for m in follower.messages]


@dataclass
class Outcome:
    """What the clients of one failure got, against what publish() acknowledged."""

    acknowledged: int = 0
    lost_unannounced: int = 0
    """Acknowledged messages a client never got, on a channel it was told of no gap in."""
    lost_announced: int = 0
    doubled: int = 0
    out_of_order: int = 0
    """Clients whose ids did not strictly increase."""
    told_of_a_gap: int = 0
    moved: int = 0
    """Clients that had to reconnect."""
    ok_gets: int = 0
    failed_gets: list[str] = field(default_factory=list)
    first_delivery_after: float | None = None
    """Seconds from the failure to the first delivery of a message whose publish() call
    began after it."""


def judge(followers: list[Follower], publisher: Publisher, failed_at: float) -> Outcome:
    outcome = Outcome(acknowledged=len(publisher.acknowledged))
    firsts = []
    for follower in followers:
        got = numbers(follower)
        outcome.doubled += len(got) - len(set(got))
        ids = [realtime.id_key(m["id"]) for m in follower.messages]
        outcome.out_of_order += ids != sorted(set(ids))
        missing = set(publisher.acknowledged) - set(got)
        told = publisher.channel in follower.gaps
        outcome.told_of_a_gap += told
        if told:
            outcome.lost_announced += len(missing)
        else:
            outcome.lost_unannounced += len(missing)
        outcome.moved += follower.connections > 1
        received = list(follower.received)  # its thread may still be adding to it
        times = follower.received_at[: len(received)]
        firsts += [at for m, at in zip(received, times, strict=True)
                   if "id" in m and publisher.acknowledged.get(m["data"]["n"], 0) > failed_at
                   ][:1]  # fmt: skip
    if firsts:
        outcome.first_delivery_after = min(firsts) - failed_at
    return outcome


def wait_until_delivered(followers: list[Follower], publisher: Publisher,
                         timeout: float = 30) -> None:  # fmt: skip
    """Until every client has every acknowledged message or was told of a gap."""
    wanted = set(publisher.acknowledged)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(wanted <= set(numbers(f)) or f.gaps for f in followers):
            return
        time.sleep(0.1)


@dataclass(frozen=True)
class Pace:
    """How hard a failure is run: clients, messages per second, seconds before and after."""

    clients: int = 8
    rate: float = 50
    before: float = 2
    after: float = 12


def app_host_loss(cluster: Cluster, pace: Pace = Pace(), connections: int = 16) -> Outcome:
    """Under GETs through the front and messages to websocket clients, app host A's stack is
    stopped, then its cable cut; then it comes back. Its clients must resume on B."""
    front = cluster.host(FRONT).address
    publisher = Publisher(cluster.redis_url, "app-loss", 1 / pace.rate)
    with following([cluster.ws_url + "app-loss"] * pace.clients) as followers:
        publisher.start()
        try:
            with Load(HTTP_PORT, connections=connections, host=front, only_get="/") as load:
                time.sleep(pace.before)
                failed_at = time.monotonic()
                cluster.stackctl(APP_A, "down")  # its stack, gracefully...
                time.sleep(2)
                cluster.host(APP_A).cut()  # ...then its cable
                # Long enough for the front to try it again (after fail_timeout).
                time.sleep(max(pace.after - 2, 2 * CLIENT_PING + 8))
        finally:
            publisher.stop()
        wait_until_delivered(followers, publisher)
        outcome = judge(followers, publisher, failed_at)
    outcome.ok_gets, outcome.failed_gets = load.report.ok, load.report.failures
    cluster.host(APP_A).restore()
    cluster.up(APP_A)
    return outcome


def primary_host(cluster: Cluster) -> str:
    """The redis host Sentinel names the primary."""
    import redis

    password = cluster.password_file.read_text().strip()
    for name in REDIS_HOSTS:
        # No retries: redis-py's own (with backoff) made one dead Sentinel cost 24 s.
        sentinel = redis.Redis(host=cluster.host(name).address, port=26379, socket_timeout=2,
                               socket_connect_timeout=2, password=password,
                               retry=realtime.NO_RETRY)  # fmt: skip
        with contextlib.suppress(redis.RedisError, ValueError):
            address, _ = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                                  "stackctl")  # fmt: skip
            return next(h for h in REDIS_HOSTS if cluster.host(h).address == address.decode())
    raise AssertionError("no Sentinel answers")


def kill_host(cluster: Cluster, name: str) -> None:
    """The machine dies: its cable goes silent (no refusal, no reset: the others wait for
    answers that never come), and every process on it stops at once, with no chance to
    clean up. ``revive_host`` brings the machine back."""
    cluster.host(name).cut()
    for pid in cluster.host(name).pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def redis_primary_loss(cluster: Cluster, pace: Pace = Pace()) -> tuple[Outcome, bool]:
    """Under publishing load, the redis host holding the primary dies; then it comes back
    (as a replica). Returns what the clients got, and whether Sentinel promoted a replica."""
    old = primary_host(cluster)
    publisher = Publisher(cluster.redis_url, "redis-loss", 1 / pace.rate)
    with following([cluster.ws_url + "redis-loss"] * pace.clients) as followers:
        publisher.start()
        try:
            time.sleep(pace.before)
            failed_at = time.monotonic()
            kill_host(cluster, old)
            deadline = failed_at + 30
            while primary_host(cluster) == old and time.monotonic() < deadline:
                time.sleep(0.2)
            promoted = primary_host(cluster) != old
            time.sleep(max(0.0, failed_at + pace.after - time.monotonic()))
        finally:
            publisher.stop()
        wait_until_delivered(followers, publisher)
        outcome = judge(followers, publisher, failed_at)
    revive_host(cluster, old)
    return outcome, promoted


def revive_host(cluster: Cluster, name: str) -> None:
    """The machine boots again: its cable back, its stack started (stackctl cleans up after
    the one that died); a redis host rejoins as a replica."""
    cluster.host(name).restore()
    cluster.up(name)
