"""Several hosts, attacked from outside: [cluster] values that cannot work, refused before
anything is written or started, with the file, key, value and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from stackctl.errors import EXIT_STACK_ERROR
from tests.conftest import stackctl

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
