"""Several hosts, attacked from outside: [cluster] values that cannot work, refused before
anything is written or started, with the file, key, value and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from stackctl import processes
from stackctl.errors import EXIT_STACK_ERROR
from tests.conftest import free_port, stackctl

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
    redis_host = ['cluster.roles=["redis"]', "cluster.address=127.0.0.1",  # fmt: skip
                  'cluster.redis_hosts=["127.0.0.1"]', f"cluster.redis_port={free_port()}"]
    args = [word for s in redis_host for word in ("--set", s)]
    result = stackctl("up", "--detach", "--profile", "host", *args, cwd=site, check=False)
    left = processes.find((site / ".stackctl" / "run").resolve())
    processes.kill_all(left)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert not left, "something was started"
    assert "redis-password: its first line must be the Redis password" in result.stderr
    assert "stackctl secrets" in result.stderr
    if password.strip():
        assert password.strip() not in result.stdout + result.stderr
