"""Bad input gets one clear message, a non-zero exit, and nothing left running."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from stackctl import processes
from stackctl.errors import EXIT_STACK_ERROR
from tests.conftest import free_port, stackctl

pytestmark = pytest.mark.e2e


@pytest.fixture
def site(short_tmp: Path) -> Path:
    stackctl("init", str(short_tmp / "site"), "--demo", cwd=short_tmp)
    return short_tmp / "site"


def up_fails(site: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = stackctl(
        "up",
        "--detach",
        "--listen",
        f"127.0.0.1:{free_port()}",
        *args,
        cwd=site,
        env=env,
        check=False,
    )
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert "Traceback" not in result.stderr.split("\n", 1)[0]
    assert not processes.find((site / ".stackctl" / "run").resolve()), "something was left running"
    return result.stderr


def test_unknown_key(site: Path) -> None:
    (site / "profiles").mkdir()
    (site / "profiles" / "dev.toml").write_text('extends = "dev"\n[wsgi]\nworker = 4\n')
    assert up_fails(site).strip() == (
        f"stackctl: {site / 'profiles' / 'dev.toml'}: "
        "wsgi.worker: unknown key; did you mean wsgi.workers?"
    )


def test_wrong_type(site: Path) -> None:
    with (site / "stack.toml").open("a") as f:
        f.write('\n[wsgi]\nthreads = "four"\n')
    assert up_fails(site).strip() == (
        f"stackctl: {site / 'stack.toml'}: wsgi.threads: expected a positive integer up to 256, "
        "got 'four'"
    )


def test_negative_worker_count(site: Path) -> None:
    assert up_fails(site, "--workers", "-2").strip() == (
        "stackctl: command line: wsgi.workers: expected a positive integer up to 512, "
        'or "auto", got -2'
    )


def test_port_in_use(site: Path) -> None:
    with closing(socket.socket()) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = stackctl("up", "--detach", "--listen", f"127.0.0.1:{port}", cwd=site, check=False)
    assert result.returncode == EXIT_STACK_ERROR
    assert (
        f"server.listen: 127.0.0.1:{port} is not available (Address already in use)"
        in result.stderr
    )
    assert not processes.find((site / ".stackctl" / "run").resolve())


def test_app_that_cannot_be_imported(site: Path) -> None:
    (site / "demo_app.py").write_text("import no_such_module\n")
    message = up_fails(site)
    assert "app.wsgi: 'demo_app:application' cannot be imported from" in message
    assert "ModuleNotFoundError: No module named 'no_such_module'" in message


def test_app_attribute_missing(site: Path) -> None:
    message = up_fails(site, "--app", "demo_app:nothing_here")
    assert "app.wsgi: 'demo_app:nothing_here' cannot be imported" in message
    assert "AttributeError" in message


def test_missing_static_directory(site: Path) -> None:
    shutil.rmtree(site / "static")
    message = up_fails(site)
    assert (
        f"static.dir: 'static' resolves to {site / 'static'}, which is not a directory" in message
    )


def test_no_nginx_on_path(site: Path) -> None:
    bin_dir = site / "bin"
    bin_dir.mkdir()
    for name in ("circusd", "uwsgi"):
        found = shutil.which(name)
        assert found
        (bin_dir / name).symlink_to(found)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"}
    if shutil.which("nginx", path=env["PATH"]):
        pytest.fail("nginx is still on the reduced PATH; the test cannot hide it")
    assert "no nginx on PATH; install it: apt-get install -y nginx-light" in up_fails(site, env=env)


def test_app_crashing_at_start_is_reported_and_nothing_is_left(site: Path) -> None:
    # Imports fine in the check, crashes inside uWSGI: the flapping plugin stops the pool
    # after 5 crashes in a row, long before the timeout, and its error is in the report.
    (site / "demo_app.py").write_text(
        "try:\n    import uwsgi  # importable only inside a uWSGI worker\n"
        "except ImportError:\n    pass\nelse:\n    raise RuntimeError('boom at start')\n"
        "def application(environ, start_response):\n    return []\n"
    )
    message = up_fails(site, "--timeout", "60")
    assert "the stack did not start; nothing is left running" in message
    assert "wsgi: stopped after 5 crashes in a row at start" in message
    assert "RuntimeError: boom at start" in message


def test_reload_refuses_a_listen_address_that_injects_nginx_config(
    site: Path, no_leaks: Callable[[Path], None]
) -> None:
    no_leaks(site)
    port, other = free_port(), free_port()
    stackctl("up", "--detach", "--listen", f"127.0.0.1:{port}", cwd=site)
    before = (site / ".stackctl" / "run" / "nginx.conf").read_text()
    hostile = f"{other}; location /x {{ alias /etc/; }} listen 127.0.0.1:{port}"
    result = stackctl("reload", "--listen", hostile, cwd=site, check=False)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert result.stderr.startswith(
        "stackctl: command line: server.listen: expected HOST:PORT, where HOST is a host name"
    )
    assert "Traceback" not in result.stderr
    assert (site / ".stackctl" / "run" / "nginx.conf").read_text() == before
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/x/hostname", timeout=10)
    answer.value.close()
    assert answer.value.code == 404  # the app's answer: no alias of /etc/
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", other), timeout=10).close()


def test_backlog_above_the_kernel_limit_is_refused_before_anything_starts(site: Path) -> None:
    limit = int(Path("/proc/sys/net/core/somaxconn").read_text())
    message = up_fails(site, "--set", "wsgi.backlog=99999999999")
    assert message.strip() == (
        f"stackctl: command line: wsgi.backlog: expected a positive integer up to {limit} "
        "(this kernel's limit, from /proc/sys/net/core/somaxconn; raise it with sysctl "
        "net.core.somaxconn first), got 99999999999"
    )


@pytest.mark.parametrize("static_dir", [".", "..", ".stackctl", ".stackctl/run"])
def test_static_dir_may_not_expose_the_stack(site: Path, static_dir: str) -> None:
    text = (site / "stack.toml").read_text()
    assert 'dir = "static"' in text
    (site / "stack.toml").write_text(text.replace('dir = "static"', f'dir = "{static_dir}"'))
    message = up_fails(site)
    assert message.startswith(
        f"stackctl: {site / 'stack.toml'}: static.dir: {static_dir!r} resolves to "
        f"{(site / static_dir).resolve()}, which "
    )
    assert "NGiNX would serve the stack's configs, logs or the key that signs tokens" in message
    assert 'Allowed: a directory of static files only, such as "static"' in message


def test_profile_that_only_extends_base_starts(
    site: Path, no_leaks: Callable[[Path], None]
) -> None:
    # Nothing sets server.listen, so its default (127.0.0.1:8000) is used: it crashed `up`
    # with an AttributeError before defaults went through their parsers. Port 8000 may be
    # taken on a shared machine; then the answer must be the clear one.
    (site / "profiles").mkdir()
    (site / "profiles" / "bare.toml").write_text('extends = "base"\n')
    no_leaks(site)
    result = stackctl("up", "--detach", "--profile", "bare", cwd=site, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 0:
        assert "stack up: http://127.0.0.1:8000/" in result.stdout
    else:
        assert result.returncode == EXIT_STACK_ERROR, result.stderr
        assert "server.listen: 127.0.0.1:8000 is not available" in result.stderr
