"""Several hosts, for real: one front, two app hosts and three redis hosts, each a network
namespace with its own stack (tests.cluster_hosts), and the failures a cluster must survive:
an app host stopped and then cut off under load, the Redis primary killed under publishing
load, a front's host list changed by `stackctl reload`.

The guarantees: no GET fails because an app host died; a websocket client resumes on another
app host and gets every message once; every message publish() acknowledged reaches every
client once, or the client is told of a gap on its channel.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stackctl import realtime
from tests.cluster_hosts import (
    APP_A,
    APP_B,
    FRONT,
    HTTP_PORT,
    REDIS_HOSTS,
    Cluster,
    enter,
    inside,
    profile_text,
    running_cluster,
)
from tests.conftest import netns_unavailable, short_dir
from tests.followers import Follower
from tests.load import Load

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable())),
]

CLIENT_PING = 1.0
"""Seconds between the test clients' pings: a client on a host that was cut off gives up on
it after as long again, and reconnects through the front."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster(short_dir()) as running:
        saved = os.environ.get(realtime.PASSWORD_FILE_VARIABLE)
        os.environ[realtime.PASSWORD_FILE_VARIABLE] = str(running.password_file)
        try:
            yield running
        finally:
            if saved is None:
                os.environ.pop(realtime.PASSWORD_FILE_VARIABLE, None)
            else:
                os.environ[realtime.PASSWORD_FILE_VARIABLE] = saved


class Publisher(threading.Thread):
    """Publishes numbered messages through the redis hosts' Sentinels, as an app would, and
    keeps those publish() acknowledged."""

    def __init__(self, url: str, channel: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.url, self.channel, self.interval = url, channel, interval
        self.acknowledged: list[int] = []
        self.failed = 0
        self._stop = threading.Event()

    def run(self) -> None:
        number = 0
        while not self._stop.is_set():
            number += 1
            try:
                realtime.publish(self.channel, {"n": number}, url=self.url)
                self.acknowledged.append(number)
            except Exception:  # noqa: BLE001 - not acknowledged: the app would see the error
                self.failed += 1
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self.join(timeout=30)


def on(cluster: Cluster, host: str) -> object:
    """A Follower's ``before``: stand on ``host``."""
    return lambda: enter(cluster.host(host))


@contextlib.contextmanager
def following(urls: list[str], before: object = None) -> Iterator[list[Follower]]:
    followers = [Follower(url, ping_interval=CLIENT_PING, before=before) for url in urls]  # type: ignore[arg-type]
    for follower in followers:
        follower.start()
    try:
        for follower in followers:
            assert follower.connected.wait(20), f"{follower.url} never connected"
        yield followers
    finally:
        for follower in followers:
            follower.stop()


def numbers(follower: Follower) -> list[int]:
    return [m["data"]["n"] for m in follower.messages]


def check_every_message_once_or_a_gap(followers: list[Follower], sent: list[int],
                                      channel: str) -> None:  # fmt: skip
    for follower in followers:
        got = numbers(follower)
        assert len(got) == len(set(got)), f"{follower.url}: a message came twice"
        ids = [realtime.id_key(m["id"]) for m in follower.messages]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), "ids must strictly increase"
        missing = sorted(set(sent) - set(got))
        if missing:
            assert channel in follower.gaps, (
                f"{follower.url}: {len(missing)} acknowledged message(s) never delivered and no "
                f"gap announced, e.g. {missing[:5]}"
            )


def wait_until_delivered(followers: list[Follower], count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(set(numbers(f)) | set()) >= count or f.gaps for f in followers):
            return
        time.sleep(0.1)


def connect_timeout(source: Cluster | None, address: str, port: int, host: str | None) -> bool:
    """True if a connection from ``host`` (None: outside, the bridge) to address:port gets no
    answer at all, as behind a firewall that drops."""

    def attempt() -> bool:
        try:
            socket.create_connection((address, port), timeout=2).close()
        except TimeoutError:
            return True
        except OSError:
            return False
        return False

    if host is None or source is None:
        return attempt()
    return inside(source.host(host), attempt)


# --- the tests, in the order a cluster lives ----------------------------------------------


def test_a_message_published_on_app_host_a_reaches_clients_on_app_host_b(
    cluster: Cluster,
) -> None:
    # Standing on the front, the one host allowed to reach the app hosts' ports.
    urls = [cluster.app_ws_url(APP_A) + "news", cluster.app_ws_url(APP_B) + "news"]
    with following(urls, before=on(cluster, FRONT)) as (on_a, on_b):
        cluster.stackctl(APP_A, "publish", "news", "from A")
        cluster.stackctl(APP_B, "publish", "news", "from B")
        for follower in (on_a, on_b):
            follower.wait_for_count(2)
            assert [m["data"] for m in follower.messages] == ["from A", "from B"]


def test_only_the_front_reaches_the_app_hosts_ports(cluster: Cluster) -> None:
    address = cluster.host(APP_A).address
    for port in (8001, 8002):
        assert not connect_timeout(cluster, address, port, FRONT)
        assert connect_timeout(cluster, address, port, REDIS_HOSTS[0]), "another host got in"
        assert connect_timeout(cluster, address, port, None), "the outside got in"


def test_redis_asks_for_the_password(cluster: Cluster) -> None:
    import redis

    primary = redis.Redis(host=cluster.host(REDIS_HOSTS[0]).address, port=6379,
                          socket_timeout=5)  # fmt: skip
    with pytest.raises(redis.AuthenticationError):
        primary.set("x", "y")


def test_losing_an_app_host_fails_no_get_and_its_clients_resume_on_the_other(
    cluster: Cluster,
) -> None:
    front = cluster.host(FRONT).address
    publisher = Publisher(cluster.redis_url, "loss")
    with following([cluster.ws_url + "loss"] * 8) as followers:
        publisher.start()
        try:
            with Load(HTTP_PORT, connections=16, host=front, only_get="/") as load:
                time.sleep(2)
                cluster.stackctl(APP_A, "down")  # its stack, gracefully...
                time.sleep(2)
                cluster.host(APP_A).cut()  # ...then its cable
                time.sleep(2 * CLIENT_PING + 8)  # the front tries it again after fail_timeout
        finally:
            publisher.stop()
        wait_until_delivered(followers, len(publisher.acknowledged))
        assert load.report.ok > 100
        assert load.report.failures == []
        assert any(f.connections >= 2 for f in followers), "no client had to move host"
        check_every_message_once_or_a_gap(followers, publisher.acknowledged, "loss")
        assert all(not f.gaps for f in followers), "resuming on another host needs no gap"
    cluster.host(APP_A).restore()
    cluster.up(APP_A)


def test_a_changed_host_list_reloads_without_dropping_a_request(cluster: Cluster) -> None:
    front = cluster.host(FRONT).address
    conf = cluster.dirs[FRONT] / ".stackctl" / "run" / "nginx.conf"
    only_b = f'["{cluster.host(APP_B).address}"]'
    with Load(HTTP_PORT, connections=16, host=front, only_get="/") as load:
        time.sleep(1)
        cluster.write_profile(FRONT, profile_text(cluster, FRONT, app_hosts=only_b))
        cluster.stackctl(FRONT, "reload")
        assert f'"{cluster.host(APP_A).address}:8001"' not in conf.read_text()
        time.sleep(1)
        cluster.write_profile(FRONT, profile_text(cluster, FRONT))
        cluster.stackctl(FRONT, "reload")
        assert f'"{cluster.host(APP_A).address}:8001"' in conf.read_text()
        time.sleep(1)
    assert load.report.ok > 50
    assert load.report.failures == []


def primary_host(cluster: Cluster) -> str:
    import redis

    for name in REDIS_HOSTS:
        sentinel = redis.Redis(host=cluster.host(name).address, port=26379, socket_timeout=3,
                               password=cluster.password_file.read_text().strip())  # fmt: skip
        with contextlib.suppress(redis.RedisError):
            address, _ = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                                  "stackctl")  # fmt: skip
            return next(h for h in REDIS_HOSTS if cluster.host(h).address == address.decode())
    raise AssertionError("no Sentinel answers")


def kill_host(cluster: Cluster, name: str) -> None:
    """The machine dies: every process on it, at once, with no chance to clean up."""
    for pid in cluster.host(name).pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_losing_the_redis_primary_promotes_a_replica_and_loses_nothing_unannounced(
    cluster: Cluster,
) -> None:
    old = primary_host(cluster)
    publisher = Publisher(cluster.redis_url, "failover")
    with following([cluster.ws_url + "failover"] * 8) as followers:
        publisher.start()
        try:
            time.sleep(2)
            kill_host(cluster, old)
            deadline = time.monotonic() + 30
            while primary_host(cluster) == old and time.monotonic() < deadline:
                time.sleep(0.2)
            assert primary_host(cluster) != old, "Sentinel promoted no replica"
            time.sleep(3)
        finally:
            publisher.stop()
        wait_until_delivered(followers, len(publisher.acknowledged))
        assert len(publisher.acknowledged) > 100
        check_every_message_once_or_a_gap(followers, publisher.acknowledged, "failover")
        for follower in followers:  # what came after the promotion arrived
            assert numbers(follower)[-1] == publisher.acknowledged[-1]
    cluster.up(old)  # back as a replica of the new primary
    assert primary_host(cluster) != old


def test_no_password_in_any_log(cluster: Cluster) -> None:
    password = cluster.password_file.read_text().strip()
    for directory in cluster.dirs.values():
        for log in (directory / ".stackctl" / "log").glob("*"):
            if log.is_file():
                assert password not in log.read_text(errors="replace"), log


def test_run_directory_holds_no_password(cluster: Cluster) -> None:
    password = cluster.password_file.read_text().strip()
    for directory in cluster.dirs.values():
        for path in Path(directory / ".stackctl" / "run").glob("*"):
            if path.is_file() and path.suffix in (".ini", ".conf", ".json"):
                assert password not in path.read_text(errors="replace"), path
