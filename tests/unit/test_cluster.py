"""Several hosts: the [cluster] settings, checked together, and what each role renders."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from stackctl import generation, profile
from stackctl.errors import StackError
from stackctl.render import redis as redis_render
from stackctl.stack import Stack
from tests.unit.test_render import NGINX, make_stack
from tests.unit.test_render import circus_ini as circus
from tests.unit.test_render import files as rendered

REDIS_HOSTS = '["10.0.0.21", "10.0.0.22", "10.0.0.23"]'
SHARED = f"""
[cluster]
front_hosts = ["10.0.0.10"]
app_hosts = ["10.0.0.11", "10.0.0.12"]
redis_hosts = {REDIS_HOSTS}
"""
FRONT = SHARED + 'roles = ["front"]\n'
APP = SHARED + 'roles = ["wsgi", "ws"]\naddress = "10.0.0.11"\n'
FIRST_REDIS = SHARED + 'roles = ["redis"]\naddress = "10.0.0.21"\n'
OTHER_REDIS = SHARED + 'roles = ["redis"]\naddress = "10.0.0.22"\n'


def host(tmp_path: Path, text: str) -> Stack:
    """A stack whose host profile is ``text`` (it extends dev)."""
    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "profiles" / "host.toml").write_text('extends = "dev"\n' + text)
    stack = make_stack(tmp_path)
    loaded = profile.load(tmp_path, "host", [], hostnames=["h"])
    return dataclasses.replace(stack, profile=loaded)


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(StackError) as error:
        host(tmp_path, text)
    return str(error.value)


# --- the settings, each alone ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[cluster]\nroles = ["front", "db"]\n', 'cluster.roles: expected a list of the parts'),
        ("[cluster]\nroles = []\n", "cluster.roles: expected a list of the parts"),
        ('[cluster]\nroles = ["ws", "ws"]\n', "each at most once"),
        ('[cluster]\naddress = "8.8.8.8"\n', "cluster.address: expected an IP address of a"),
        ('[cluster]\naddress = "0.0.0.0"\n', "cluster.address: expected an IP address of a"),
        ('[cluster]\naddress = "app1.internal"\n', "cluster.address: expected an IP address"),
        ('[cluster]\napp_hosts = ["10.0.0.1", "1.1.1.1"]\n', "cluster.app_hosts: expected a list"),
        ('[cluster]\nfront_hosts = ["10.0.0.1", "10.0.0.1"]\n', "cluster.front_hosts: expected"),
        ("[cluster]\nwsgi_port = 0\n", "cluster.wsgi_port: expected a positive integer"),
        ('[cluster]\nmaster_name = "a b"\n', "cluster.master_name: expected a name of 1 to 64"),
    ],
)
def test_bad_cluster_values_name_file_key_value_and_rule(
    tmp_path: Path, text: str, message: str
) -> None:
    error = refused(tmp_path, text)
    assert error.startswith(f"{tmp_path / 'profiles' / 'host.toml'}: ")
    assert message in error


def test_roles_keep_one_order_whatever_the_file_says(tmp_path: Path) -> None:
    stack = host(tmp_path, SHARED + 'roles = ["ws", "wsgi"]\naddress = "10.0.0.11"\n')
    assert stack.profile.cluster.roles == ("wsgi", "ws")


# --- the settings, together ------------------------------------------------------------------


def test_an_app_host_must_list_who_may_connect(tmp_path: Path) -> None:
    text = '[cluster]\nroles = ["wsgi", "ws"]\naddress = "10.0.0.11"\nredis_hosts = ["10.0.0.21"]\n'
    assert "cluster.front_hosts: ()" in refused(tmp_path, text)
    assert "must list the front hosts allowed to connect" in refused(tmp_path, text)


def test_a_front_without_pools_must_list_the_app_hosts(tmp_path: Path) -> None:
    assert "must list the app hosts" in refused(tmp_path, '[cluster]\nroles = ["front"]\n')


def test_a_front_serving_its_own_pools_needs_both(tmp_path: Path) -> None:
    assert "needs both the wsgi and ws roles" in refused(
        tmp_path, '[cluster]\nroles = ["front", "wsgi", "redis"]\n'
    )


def test_two_redis_hosts_cannot_fail_over(tmp_path: Path) -> None:
    text = '[cluster]\nroles = ["front", "wsgi", "ws"]\nredis_hosts = ["10.0.0.1", "10.0.0.2"]\n'
    assert "two redis hosts cannot fail over" in refused(tmp_path, text)


def test_a_redis_host_must_be_one_of_the_redis_hosts(tmp_path: Path) -> None:
    text = SHARED + 'roles = ["redis"]\naddress = "10.0.0.99"\n'
    assert "must be one of cluster.redis_hosts" in refused(tmp_path, text)


def test_redis_hosts_and_redis_url_exclude_each_other(tmp_path: Path) -> None:
    error = refused(tmp_path, APP + '[redis]\nurl = "redis://10.0.0.5:6379/0"\n')
    assert "redis.url: 'redis://10.0.0.5:6379/0'" in error
    assert "keep one of them" in error


def test_app_hosts_must_share_one_redis(tmp_path: Path) -> None:
    text = '[cluster]\nroles = ["wsgi", "ws"]\naddress = "10.0.0.11"\nfront_hosts = ["10.0.0.10"]\n'
    assert "must share one Redis" in refused(tmp_path, text)


# --- what each role renders --------------------------------------------------------------------


def test_one_host_runs_everything_on_unix_sockets_by_default(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    assert stack.watchers == ("redis", "wsgi", "ws", "nginx", "metrics")
    ini = circus(stack)
    assert ini["socket:wsgi"]["path"] == str(stack.wsgi_socket)
    assert not ini.has_option("socket:wsgi", "stackctl_allow")


def test_a_front_host_runs_nginx_only_and_balances_across_the_app_hosts(tmp_path: Path) -> None:
    stack = host(tmp_path, FRONT)
    assert stack.watchers == ("nginx", "metrics")
    files = rendered(stack)
    assert set(files) >= {"circus.ini", "nginx.conf"}
    assert not {"uwsgi.ini", "redis.conf"} & set(files)
    conf = files["nginx.conf"]
    for port in (8001, 8002):
        for address in ("10.0.0.11", "10.0.0.12"):
            assert f'server "{address}:{port}" max_fails=1 fail_timeout=5s;' in conf
    # Only idempotent requests move on (NGiNX's own rule): a GET never fails for a dead host.
    assert "uwsgi_next_upstream error timeout invalid_header;" in conf
    assert "proxy_next_upstream error timeout;" in conf
    ini = circus(stack)
    assert [s for s in ini.sections() if s.startswith(("socket:", "watcher:"))] == [
        "watcher:nginx",
        "watcher:metrics",
    ]


def test_an_app_host_serves_its_pools_on_tcp_to_the_front_hosts_only(tmp_path: Path) -> None:
    stack = host(tmp_path, APP)
    assert stack.watchers == ("wsgi", "ws", "metrics")
    files = rendered(stack)
    assert "nginx.conf" not in files and "redis.conf" not in files
    ini = circus(stack)
    for name, port in (("wsgi", "8001"), ("ws", "8002")):
        assert ini[f"socket:{name}"]["host"] == "10.0.0.11"
        assert ini[f"socket:{name}"]["port"] == port
        # The front, and this host itself (stackctl's own checks).
        assert ini[f"socket:{name}"]["stackctl_allow"] == "10.0.0.10 10.0.0.11"
        assert not ini.has_option(f"socket:{name}", "path")
    env = ini["env:wsgi"]
    assert env["STACKCTL_REDIS_URL"] == (
        "sentinel://10.0.0.21:26379,10.0.0.22:26379,10.0.0.23:26379/stackctl"
    )
    # Where the password is, never the password: the workers read the file.
    assert env["STACKCTL_REDIS_PASSWORD_FILE"] == str(stack.redis_password_file)


def test_one_redis_host_is_a_shared_redis_without_sentinel(tmp_path: Path) -> None:
    text = '[cluster]\nroles = ["redis"]\naddress = "10.0.0.21"\nredis_hosts = ["10.0.0.21"]\n'
    stack = host(tmp_path, text)
    assert stack.watchers == ("redis", "metrics")
    assert stack.redis_url == "redis://10.0.0.21:6379/0"


def test_the_first_redis_host_is_the_primary_and_the_others_replicate_it(tmp_path: Path) -> None:
    first = host(tmp_path, FIRST_REDIS)
    assert first.watchers == ("redis", "sentinel", "metrics")
    conf = rendered(first)["redis.conf"]
    assert "bind 10.0.0.21\nport 6379\n" in conf
    assert "requirepass" not in conf  # the password, never in a rendered file
    seeded = circus(first)["watcher:redis"]["cmd"]
    own = first.own_conf("redis")
    assert f"-m stackctl.seed --kind redis --seed {first.redis_conf} --conf {own}" in seeded
    assert "replicaof" not in conf and "unixsocket" not in conf
    other = host(tmp_path, OTHER_REDIS)
    assert "replicaof 10.0.0.21 6379" in rendered(other)["redis.conf"]
    seed = rendered(other)["sentinel.conf"]
    assert "sentinel monitor stackctl 10.0.0.21 6379 2" in seed  # a majority of three
    for replica in ("10.0.0.22", "10.0.0.23"):  # known before the primary's first report
        assert f"sentinel known-replica stackctl {replica} 6379" in seed
    assert "sentinel announce-ip 10.0.0.22" in seed
    assert "requirepass" not in seed


def test_quorum_is_a_majority_of_the_sentinels(tmp_path: Path) -> None:
    five = '["10.0.0.21", "10.0.0.22", "10.0.0.23", "10.0.0.24", "10.0.0.25"]'
    text = f'[cluster]\nroles = ["redis"]\naddress = "10.0.0.21"\nredis_hosts = {five}\n'
    assert redis_render.quorum(host(tmp_path, text)) == 3


def test_a_front_hosts_config_passes_nginx_t(tmp_path: Path) -> None:
    stack = host(tmp_path, FRONT)
    for file in generation.render_all(stack):
        (tmp_path / file.name).write_text(file.content)
    made = (tmp_path / "static", stack.nginx_temp_dir, stack.nginx_cache_dir, stack.log_dir)
    for directory in made:
        directory.mkdir(parents=True, exist_ok=True)
    conf = tmp_path / "nginx.conf"
    result = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- this host's address, found in the lists -----------------------------------------------


def load_with_addresses(tmp_path: Path, text: str, local: set[str]) -> profile.Profile:
    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "profiles" / "host.toml").write_text('extends = "dev"\n' + text)
    (tmp_path / "stack.toml").write_text('[app]\nwsgi = "hello:application"\n')
    return profile.load(tmp_path, "host", [], hostnames=["h"], addresses=lambda: local)


def test_one_profile_serves_every_app_host_each_finding_its_own_address(tmp_path: Path) -> None:
    text = SHARED + 'roles = ["wsgi", "ws"]\n'
    for address in ("10.0.0.11", "10.0.0.12"):
        found = load_with_addresses(tmp_path, text, {"127.0.0.1", address})
        assert found.cluster.address == address
        assert found.source("cluster.address") == (
            "this host's own address, found in cluster.app_hosts"
        )


def test_a_redis_host_finds_its_address_among_the_redis_hosts(tmp_path: Path) -> None:
    found = load_with_addresses(tmp_path, SHARED + 'roles = ["redis"]\n', {"10.0.0.22"})
    assert found.cluster.address == "10.0.0.22"


def test_a_host_in_none_of_the_lists_is_told_to_add_itself(tmp_path: Path) -> None:
    with pytest.raises(StackError) as error:
        load_with_addresses(tmp_path, SHARED + 'roles = ["wsgi", "ws"]\n', {"10.9.9.9"})
    assert "none of this host's addresses is in cluster.app_hosts" in str(error.value)


def test_a_host_with_two_listed_addresses_must_say_which(tmp_path: Path) -> None:
    with pytest.raises(StackError) as error:
        load_with_addresses(tmp_path, SHARED + 'roles = ["wsgi", "ws"]\n',
                            {"10.0.0.11", "10.0.0.12"})  # fmt: skip
    assert "several of the addresses" in str(error.value)


def test_this_hosts_addresses_are_read_from_its_interfaces() -> None:
    from stackctl.cluster import local_addresses

    assert "127.0.0.1" in local_addresses()


def test_a_changed_redis_password_reaches_a_conf_the_server_rewrote(tmp_path: Path) -> None:
    """The password was changed on every host: a redis host's Redis and Sentinel, restarted,
    ask for the new one and keep what they learned (here: whose replica Redis is now)."""
    from stackctl import seed as seeding

    password = tmp_path / "redis-password"
    seeds = {"redis": "port 6379\n", "sentinel": "sentinel monitor m 10.0.0.21 6379 2\n"}
    for kind, text in seeds.items():
        seed, conf = tmp_path / f"{kind}.seed", tmp_path / f"{kind}.conf"
        seed.write_text(text)
        password.write_text("old-password-0123456789\n")
        seeding.prepare(kind, seed, conf, password)
        with conf.open("a") as f:
            f.write("replicaof 10.0.0.22 6379\nrequirepass \"old-password-0123456789\"\n"
                    'primaryauth "old-password-0123456789"\n'
                    "user default on #1fd96fc8 ~* &* +@all\n")  # as Valkey rewrites them
        password.write_text("new-password-0123456789\n")
        seeding.prepare(kind, seed, conf, password)
        made = conf.read_text()
        assert "old-password" not in made and "#1fd96fc8" not in made
        assert "replicaof 10.0.0.22 6379" in made
        assert made.count("new-password-0123456789") == 2
        assert conf.stat().st_mode & 0o777 == 0o600
