"""Several hosts, attacked from outside: [cluster] values that cannot work, refused before
anything is written or started, with the file, key, value and what to do; then, on a running
cluster (tests.cluster_hosts), reloads that must change nothing, the commands on each kind of
host, and where the Redis password must never be."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stackctl import processes
from stackctl.errors import EXIT_STACK_ERROR
from tests.cluster_hosts import APP_A, APP_B, FRONT, HOSTS, REDIS_HOSTS, Cluster, running_cluster
from tests.conftest import free_port, netns_unavailable, short_dir, stackctl, wait_for
from tests.e2e.test_several_hosts import silent

pytestmark = pytest.mark.e2e

APP_PROFILE = """extends = "prod"
[server]
listen = "198.18.0.2:8000"
[cluster]
roles = ["wsgi", "ws"]
address = "198.18.0.2"
front_hosts = ["198.18.0.1"]
redis_hosts = ["198.18.0.5"]
"""


@pytest.fixture
def site(short_tmp: Path) -> Path:
    stackctl("init", str(short_tmp / "site"), "--demo", cwd=short_tmp)
    site = short_tmp / "site"
    (site / "profiles").mkdir()
    (site / "profiles" / "host.toml").write_text(APP_PROFILE)
    stackctl("secrets", cwd=site)
    return site


def refused(site: Path, *settings: str) -> str:
    """stackctl up with ``settings`` fails with one message, and writes nothing."""
    args = [word for s in settings for word in ("--set", s)]
    result = stackctl("up", "--detach", "--profile", "host", *args, cwd=site, check=False)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (site / ".stackctl" / "run").exists(), "files were written"
    return result.stderr


@pytest.mark.parametrize(
    "setting",
    [
        "cluster.address=fe80::1",
        "cluster.address=169.254.0.2",
        'cluster.front_hosts=["fd00::1", "FD00:0::1"]',
        'cluster.redis_hosts=["198.18.0.5", "::ffff:198.18.0.5", "198.18.0.6"]',
    ],
)
def test_link_local_and_twice_listed_addresses_are_refused(site: Path, setting: str) -> None:
    message = refused(site, setting)
    key, value = setting.split("=", 1)
    assert f"command line: {key}: expected " in message, message
    assert "private network" in message, message


@pytest.mark.parametrize(
    ("settings", "stranger"),
    [
        (['cluster.front_hosts=["fd00::1"]'], "fd00::1"),
        (['cluster.front_hosts=["198.18.0.1", "fd00::1"]'], "fd00::1"),
        (["cluster.address=fd00::2", 'cluster.front_hosts=["198.18.0.1"]'], "198.18.0.1"),
    ],
)
def test_a_front_host_of_the_other_ip_version_is_refused(
    site: Path, settings: list[str], stranger: str
) -> None:
    """The app's sockets are bound to cluster.address: one of the other version never hears
    the front host."""
    message = refused(site, *settings)
    assert "cluster.front_hosts: " in message and f"{stranger} could never connect" in message
    assert "other IP version" in message, message


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (["cluster.wsgi_port=8002"], "cluster.ws_port: 8002"),
        (["cluster.ws_port=8001"], "cluster.ws_port: 8001"),
        (['cluster.roles=["redis"]', 'cluster.redis_hosts=["198.18.0.2","198.18.0.3","198.18.0.4"]',
          "cluster.sentinel_port=6379"], "cluster.sentinel_port: 6379"),  # fmt: skip
        (['cluster.roles=["wsgi","ws","redis"]', 'cluster.redis_hosts=["198.18.0.2"]',
          "cluster.redis_port=8001"], "cluster.redis_port: 8001"),  # fmt: skip
        (['cluster.roles=["front","wsgi","ws"]', 'cluster.app_hosts=["198.18.0.2","198.18.0.3"]',
          "server.listen=0.0.0.0:8002"], "cluster.ws_port: 8002"),  # fmt: skip
    ],
)
def test_two_servers_on_one_port_are_refused(site: Path, settings: list[str], named: str) -> None:
    message = refused(site, *settings)
    assert named in message and "a port of its own" in message, message
    assert "command line" in message, message


BAD_PASSWORDS = ["", "\n", "two words-0123456789\n", '"quoted-0123456789"\n', "short\n"]


@pytest.mark.parametrize("password", BAD_PASSWORDS)
def test_a_redis_password_redis_would_not_take_is_refused(site: Path, password: str) -> None:
    """Empty, it would be no password at all; with a space or quotes, Redis refuses its config
    and echoes the line, password included, into its log."""
    (site / ".stackctl" / "redis-password").write_text(password)
    args = loopback_redis_host(site)
    result = stackctl("up", "--detach", "--profile", "host", *args, cwd=site, check=False)
    left = processes.find((site / ".stackctl" / "run").resolve())
    processes.kill_all(left)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert not left, "something was started"
    assert "redis-password: its first line must be the Redis password" in result.stderr
    assert "stackctl secrets" in result.stderr
    if password.strip():
        assert password.strip() not in result.stdout + result.stderr


def loopback_redis_host(site: Path) -> list[str]:
    """The --set arguments of a redis host of one, on loopback (its own cluster)."""
    settings = ['cluster.roles=["redis"]', "cluster.address=127.0.0.1",  # fmt: skip
                'cluster.redis_hosts=["127.0.0.1"]', f"cluster.redis_port={free_port()}"]
    return [word for s in settings for word in ("--set", s)]


def test_a_password_file_that_is_a_link_is_refused_and_one_others_read_made_private(
    site: Path,
) -> None:
    password = site / ".stackctl" / "redis-password"
    elsewhere = site / "elsewhere"
    password.rename(elsewhere)
    password.symlink_to(elsewhere)
    args = ["up", "--detach", "--profile", "host", *loopback_redis_host(site)]
    linked = stackctl(*args, cwd=site, check=False)
    assert linked.returncode == EXIT_STACK_ERROR, linked.stdout + linked.stderr
    assert f"{password} is a symbolic link; remove it" in linked.stderr
    assert elsewhere.read_text().strip() not in linked.stdout + linked.stderr
    password.unlink()
    elsewhere.rename(password)
    password.chmod(0o644)
    try:
        stackctl(*args, cwd=site)
        assert password.stat().st_mode & 0o777 == 0o600
    finally:
        stackctl("down", cwd=site, check=False)
        processes.kill_all(processes.find((site / ".stackctl" / "run").resolve()))


# --- on a running cluster -------------------------------------------------------------------

needs_netns = pytest.mark.skipif(netns_unavailable() is not None,
                                 reason=str(netns_unavailable()))  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster(short_dir()) as running:
        yield running


def run_files(cluster: Cluster, name: str) -> dict[str, str]:
    run = cluster.dirs[name] / ".stackctl" / "run"
    # (reload.lock stays, with the pid of the last reload: a lock, not a setting)
    return {f.name: f.read_text() for f in run.iterdir() if f.is_file() and f.suffix != ".lock"}


def front_answers(cluster: Cluster) -> None:
    with urllib.request.urlopen(cluster.front_url + "/", timeout=10) as answer:
        assert answer.status == 200


@needs_netns
@pytest.mark.parametrize(
    ("name", "setting", "named"),
    [
        (APP_A, 'cluster.roles=["front","wsgi","ws"]', "cluster.roles"),
        (REDIS_HOSTS[1], 'cluster.roles=["redis","wsgi","ws"]', "cluster.roles"),
        (APP_A, "cluster.front_hosts=[]", "cluster.front_hosts"),
        (APP_A, "cluster.ws_port=8001", "cluster.ws_port: 8001"),
        (FRONT, "cluster.app_hosts=[]", "cluster.app_hosts"),
        (FRONT, 'cluster.roles=["front","redis"]', "cluster.address"),
        (REDIS_HOSTS[0], "cluster.redis_port=6380", "cluster.redis_port: 6380: the running one"),
        (REDIS_HOSTS[1], "cluster.sentinel_port=26380", "the running one is 26379"),
        (REDIS_HOSTS[2], "cluster.master_name=other", "cluster.master_name: 'other'"),
    ],
)
def test_a_bad_reload_changes_nothing_and_says_why(
    cluster: Cluster, name: str, setting: str, named: str
) -> None:
    before = run_files(cluster, name)
    result = cluster.stackctl(name, "reload", "--set", setting, check=False)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert run_files(cluster, name) == before
    front_answers(cluster)


@needs_netns
def test_a_reload_of_an_edited_profile_that_adds_a_role_is_refused(cluster: Cluster) -> None:
    profile = cluster.dirs[APP_A] / "profiles" / "host.toml"
    text = profile.read_text()
    profile.write_text(text.replace('roles = ["wsgi", "ws"]', 'roles = ["front", "wsgi", "ws"]'))
    try:
        result = cluster.stackctl(APP_A, "reload", check=False)
    finally:
        profile.write_text(text)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert "the running stack has the roles wsgi, ws" in result.stderr, result.stderr
    assert "stackctl down" in result.stderr
    front_answers(cluster)


@needs_netns
@pytest.mark.parametrize(
    ("name", "runs", "runs_not"),
    [
        (FRONT, ["nginx"], ["wsgi", "ws ", "redis", "sentinel"]),
        (APP_A, ["wsgi", "ws "], ["nginx", "sentinel"]),
        (REDIS_HOSTS[0], ["redis", "sentinel"], ["nginx", "wsgi"]),
    ],
)
def test_status_and_logs_on_each_kind_of_host(
    cluster: Cluster, name: str, runs: list[str], runs_not: list[str]
) -> None:
    status = cluster.stackctl(name, "status").stdout
    # The first line says where the site is, or, on a host without NGiNX, what this host runs.
    first = {FRONT: "http://", APP_A: "wsgi, ws  profile", REDIS_HOSTS[0]: "redis  profile"}
    assert status.startswith(first[name]), status
    for watcher in runs:
        assert f"\n{watcher.strip()} " in status and "active" in status, status
    for watcher in runs_not:
        assert f"\n{watcher}" not in status, status
    assert cluster.stackctl(name, "logs", "-n", "5", runs[0].strip()).returncode == 0
    missing = cluster.stackctl(name, "logs", "-n", "5", runs_not[0].strip(), check=False)
    assert missing.returncode == EXIT_STACK_ERROR, missing.stdout + missing.stderr
    said = f"this host runs no {runs_not[0].strip()}, so it has no log of it; it runs circusd, "
    assert said + runs[0].strip() in missing.stderr, missing.stderr


@needs_netns
def test_another_app_host_and_a_redis_host_get_no_answer_from_an_app_hosts_ports(
    cluster: Cluster,
) -> None:
    address = cluster.host(APP_A).address
    for port in (8001, 8002):
        assert silent(cluster, address, port, APP_B), "another app host got in"
        assert silent(cluster, address, port, REDIS_HOSTS[1]), "a redis host got in"


@needs_netns
def test_no_password_in_a_command_line_or_an_environment(cluster: Cluster) -> None:
    password = (cluster.dirs[FRONT] / ".stackctl" / "redis-password").read_text().strip()
    seen = 0
    for process in psutil.process_iter():
        try:
            words = process.cmdline()
            if not any(str(cluster.root) in word for word in words):
                continue
            environment = process.environ()
        except psutil.Error:
            continue
        seen += 1
        assert not any(password in word for word in words), words
        assert not any(password in value for value in environment.values()), words
    assert seen >= len(HOSTS) * 2  # circusd and at least one server on each host


@needs_netns
def test_a_new_redis_password_is_taken_by_reloading_each_server_that_uses_it(
    cluster: Cluster,
) -> None:
    """The password changed on every host: `stackctl reload redis` and `reload sentinel` on
    each redis host, `reload ws` and `reload wsgi` on each app host, and realtime delivers
    again; the old password is refused."""
    import redis

    old = (cluster.dirs[FRONT] / ".stackctl" / "redis-password").read_text().strip()
    for name in HOSTS:
        (cluster.dirs[name] / ".stackctl" / "redis-password").write_text(
            "rotated-password-0123456789abcdef\n"
        )
    for name in REDIS_HOSTS:
        cluster.stackctl(name, "reload", "redis")
        cluster.stackctl(name, "reload", "sentinel")
    for name in (APP_A, APP_B):
        cluster.stackctl(name, "reload", "ws")
        cluster.stackctl(name, "reload", "wsgi")
    for name in (APP_A, APP_B):
        wait_for(lambda n=name: "realtime  ok" in cluster.stackctl(n, "status", check=False).stdout,
                 30, f"realtime delivering on {name}")  # fmt: skip
    for name in REDIS_HOSTS:
        address = cluster.host(name).address
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=address, port=6379, password=old, socket_timeout=5).ping()


@needs_netns
def test_an_app_host_with_another_password_is_told_before_it_starts(cluster: Cluster) -> None:
    """Last: it stops app host B (and starts it again with the right password)."""
    password = cluster.dirs[APP_B] / ".stackctl" / "redis-password"
    right = password.read_text()
    cluster.down(APP_B)
    password.write_text("another-password-0123456789\n")
    try:
        result = cluster.stackctl(APP_B, "up", "--detach", check=False, timeout=60)
        status = cluster.stackctl(APP_B, "status", check=False)
    finally:
        password.write_text(right)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert f"{password}: the redis hosts refuse this password" in result.stderr, result.stderr
    output = result.stdout + result.stderr
    assert "another-password" not in output and right.strip() not in output
    assert status.returncode != 0 and "no stack running" in status.stderr, status.stdout
    cluster.up(APP_B)
    front_answers(cluster)


@needs_netns
def test_down_on_each_kind_of_host_leaves_nothing_running(cluster: Cluster) -> None:
    """Last of all: it stops the cluster, front first, as the README says."""
    for name in (FRONT, APP_A, REDIS_HOSTS[0]):
        assert "stack stopped" in cluster.stackctl(name, "down").stdout
        left = processes.find((cluster.dirs[name] / ".stackctl" / "run").resolve())
        processes.kill_all(left)
        assert not left, f"{name}: left running after down"
        status = cluster.stackctl(name, "status", check=False)
        assert status.returncode == EXIT_STACK_ERROR and "no stack running" in status.stderr
