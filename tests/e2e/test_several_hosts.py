"""Several hosts, for real: one front, two app hosts and three redis hosts, each a network
namespace with its own stack (tests.cluster_hosts), and the failures a cluster must survive:
an app host stopped and then cut off under load, the Redis primary killed under publishing
load, a front's host list changed by `stackctl reload`.

The guarantees: no GET fails because an app host died; a websocket client resumes on another
app host and gets every message once; every message publish() acknowledged reaches every
client once, or the client is told of a gap on its channel.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster_hosts import (
    APP_A,
    APP_B,
    FRONT,
    HTTP_PORT,
    REDIS_HOSTS,
    Cluster,
    app_environment,
    app_host_loss,
    enter,
    following,
    inside,
    primary_host,
    profile_text,
    redis_primary_loss,
    running_cluster,
)
from tests.conftest import netns_unavailable, short_dir
from tests.load import Load

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable())),
]

@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster(short_dir()) as running, app_environment(running):
        yield running


def silent(cluster: Cluster, address: str, port: int, source: str | None) -> bool:
    """True if a connection from host ``source`` (None: the outside, on the bridge) to
    address:port gets no answer at all, as behind a firewall that drops it."""

    def attempt() -> bool:
        try:
            socket.create_connection((address, port), timeout=2).close()
        except TimeoutError:
            return True
        except OSError:
            return False
        return False

    return attempt() if source is None else inside(cluster.host(source), attempt)


# --- the tests, in the order a cluster lives ----------------------------------------------


def test_a_message_published_on_app_host_a_reaches_clients_on_app_host_b(
    cluster: Cluster,
) -> None:
    # Standing on the front, the one host allowed to reach the app hosts' ports.
    urls = [cluster.app_ws_url(APP_A) + "news", cluster.app_ws_url(APP_B) + "news"]
    with following(urls, before=lambda: enter(cluster.host(FRONT))) as (on_a, on_b):
        cluster.stackctl(APP_A, "publish", "news", "from A")
        cluster.stackctl(APP_B, "publish", "news", "from B")
        for follower in (on_a, on_b):
            follower.wait_for_count(2)
            assert [m["data"] for m in follower.messages] == ["from A", "from B"]


def test_the_fronts_health_check_is_answered_by_each_app_host(cluster: Cluster) -> None:
    """Each app host's wsgi worker asks its own realtime worker, over TCP, through the allow
    list of the ws socket (which lists the host's own address)."""
    url = cluster.front_url + "/_stackctl/health"
    for _ in range(6):  # NGiNX's round robin: each app host answers three
        with urllib.request.urlopen(url, timeout=10) as response:
            assert json.loads(response.read()) == {"ok": True, "reason": "serving"}


def test_each_host_exports_the_metrics_of_what_it_runs(cluster: Cluster) -> None:
    """metrics.listen's default, loopback: each host's exporter answers on its own."""

    def scrape() -> set[str]:
        with urllib.request.urlopen("http://127.0.0.1:9108/metrics", timeout=10) as answer:
            return {line for line in answer.read().decode().splitlines() if line[:1] != "#"}

    front = inside(cluster.host(FRONT), scrape)
    assert {'stackctl_watcher_up{watcher="nginx"} 1', "stackctl_nginx_up 1"} <= front
    assert not any(line.startswith(("stackctl_redis", "stackctl_ws_", "stackctl_wsgi"))
                   for line in front)  # fmt: skip
    app = inside(cluster.host(APP_A), scrape)
    wanted = {"stackctl_ws_up 1", "stackctl_redis_up 1", 'stackctl_watcher_up{watcher="wsgi"} 1'}
    assert wanted <= app
    (processes,) = [line.split()[-1] for line in app
                    if line.startswith('stackctl_watcher_processes{watcher="wsgi"}')]  # fmt: skip
    assert int(processes) >= 1 and f"stackctl_wsgi_workers {processes}" in app
    assert not any(line.startswith("stackctl_nginx") for line in app)
    # Its own Redis, which asks for the cluster's password.
    redis_host = inside(cluster.host(REDIS_HOSTS[0]), scrape)
    assert {"stackctl_redis_up 1", 'stackctl_watcher_up{watcher="sentinel"} 1'} <= redis_host



def test_only_the_front_reaches_the_app_hosts_ports(cluster: Cluster) -> None:
    address = cluster.host(APP_A).address
    for port in (8001, 8002):
        assert not silent(cluster, address, port, FRONT)
        assert silent(cluster, address, port, REDIS_HOSTS[0]), "another host got in"
        assert silent(cluster, address, port, None), "the outside got in"


def test_redis_asks_for_the_password(cluster: Cluster) -> None:
    import redis

    primary = redis.Redis(host=cluster.host(REDIS_HOSTS[0]).address, port=6379,
                          socket_timeout=5)  # fmt: skip
    with pytest.raises(redis.AuthenticationError):
        primary.set("x", "y")


def test_losing_an_app_host_fails_no_get_and_its_clients_resume_on_the_other(
    cluster: Cluster,
) -> None:
    outcome = app_host_loss(cluster)
    assert outcome.ok_gets > 100
    assert outcome.failed_gets == []
    assert outcome.moved > 0, "no client had to move host"
    assert outcome.acknowledged > 100
    assert (outcome.lost_unannounced, outcome.lost_announced, outcome.doubled) == (0, 0, 0)
    assert outcome.told_of_a_gap == 0, "resuming on another host needs no gap"
    assert outcome.out_of_order == 0


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


def test_an_app_hosts_allow_list_changes_live_with_a_reload(cluster: Cluster) -> None:
    address, other = cluster.host(APP_B).address, REDIS_HOSTS[0]
    front, extra = cluster.host(FRONT).address, cluster.host(other).address
    url = cluster.app_ws_url(APP_B) + "live"
    with following([url], before=lambda: enter(cluster.host(FRONT))) as (client,):
        try:
            more = f'["{front}", "{extra}"]'
            cluster.write_profile(APP_B, profile_text(cluster, APP_B, front_hosts=more))
            cluster.stackctl(APP_B, "reload")
            assert not silent(cluster, address, 8001, other), "the new host is still refused"
        finally:
            cluster.write_profile(APP_B, profile_text(cluster, APP_B))
            cluster.stackctl(APP_B, "reload")
        assert silent(cluster, address, 8001, other), "the removed host still gets in"
        cluster.stackctl(APP_B, "publish", "live", "still here")
        client.wait_for_count(1)
        assert [m["data"] for m in client.messages] == ["still here"]
        assert client.connections == 1, "the reload restarted the websocket worker"


def test_a_reload_that_would_move_an_app_hosts_socket_changes_nothing(cluster: Cluster) -> None:
    refused = cluster.stackctl(APP_B, "reload", "--set", "cluster.wsgi_port=8011", check=False)
    assert refused.returncode != 0
    assert "a reload cannot move a listening socket, so nothing was changed" in refused.stderr
    assert not silent(cluster, cluster.host(APP_B).address, 8001, FRONT)
    assert cluster.stackctl(APP_B, "status", check=False).returncode == 0


def test_losing_the_redis_primary_promotes_a_replica_and_loses_nothing_unannounced(
    cluster: Cluster,
) -> None:
    outcome, promoted = redis_primary_loss(cluster)
    assert promoted, "Sentinel promoted no replica"
    assert outcome.acknowledged > 100
    assert outcome.lost_unannounced == 0
    assert outcome.doubled == 0
    assert outcome.out_of_order == 0
    assert outcome.first_delivery_after is not None, "nothing published after it arrived"
    assert primary_host(cluster) in REDIS_HOSTS  # and the dead host came back as a replica


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
