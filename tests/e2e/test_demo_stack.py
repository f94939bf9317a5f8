"""The demo stack for real: NGiNX, the uWSGI pool, the gevent worker and Redis under Circus."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from websockets.sync.client import connect

from stackctl.stack import Stack, usable_cpus
from tests.conftest import data_of, running_stack, short_dir, stackctl, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:

    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    with running_stack(root / "site") as stack:
        yield stack


def get(url: str, data: bytes | None = None, headers: dict[str, str] | None = None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def test_page_is_served_by_the_wsgi_pool_through_nginx(demo: Stack) -> None:
    status, headers, body = get(demo.url())
    assert status == 200
    assert headers["Server"] == "nginx"
    assert b"<title>stackctl demo: live board</title>" in body


def test_static_files_are_served_by_nginx_not_the_app(demo: Stack) -> None:
    before = (demo.log_dir / "wsgi.log").read_text()
    status, headers, body = get(demo.url() + "static/board.js")
    assert status == 200
    assert headers["Content-Type"] == "application/javascript"
    assert body == (demo.stack_dir / "static" / "board.js").read_bytes()
    # A request the app does see, to flush its log (which has paths, never query strings).
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(demo.url() + "marker-after-static")
    missing.value.close()
    wait_for(
        lambda: "GET /marker-after-static " in (demo.log_dir / "wsgi.log").read_text(),
        what="the app's request log",
    )
    new_lines = (demo.log_dir / "wsgi.log").read_text()[len(before) :]
    assert "GET /marker-after-static " in new_lines
    assert "/static/board.js" not in new_lines


def test_static_files_are_gzipped(demo: Stack) -> None:
    # (gzip_min_length leaves files under 1 KB alone: realtime.js is larger.)
    _, headers, _ = get(demo.url() + "_stackctl/realtime.js", headers={"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip"


def test_message_posted_through_the_form_reaches_a_websocket_within_a_second(demo: Stack) -> None:
    ws_url = demo.url().replace("http://", "ws://") + "ws/board"
    with connect(ws_url, open_timeout=5) as ws:
        started = time.monotonic()
        status, _, body = get(
            demo.url() + "post",
            data=b"message=hello+%3Cworld%3E",
            headers={"Accept": "application/json"},
        )
        assert (status, body) == (200, b'{"ok": true}')
        received = ws.recv(timeout=1.0)
        assert time.monotonic() - started < 1.0
    assert data_of(received) == {"text": "hello <world>"}


def test_a_slow_job_runs_on_the_celery_watcher_and_reports_its_progress(demo: Stack) -> None:
    ws_url = demo.url().replace("http://", "ws://") + "ws/board"
    with connect(ws_url, open_timeout=5) as ws:
        status, _, body = get(demo.url() + "job", data=b"", headers={"Accept": "application/json"})
        assert status == 202
        job = json.loads(body)["job"]
        progress = []
        while not progress or progress[-1] < 100:
            message = data_of(ws.recv(timeout=30))
            assert isinstance(message, dict) and message["job"] == job
            progress.append(message["progress"])
    assert progress == list(range(0, 101, 10))
    # The worker that ran it is the stack's own watcher, with its own log.
    out = stackctl("logs", "celery", "-n", "50", cwd=demo.stack_dir).stdout
    assert "demo_tasks.slow_job" in out and "succeeded" in out


def test_every_open_page_gets_the_message(demo: Stack) -> None:
    ws_url = demo.url().replace("http://", "ws://") + "ws/board"
    with connect(ws_url) as first, connect(ws_url) as second:
        stackctl("publish", "board", "to everyone", cwd=demo.stack_dir)
        assert data_of(first.recv(timeout=2)) == "to everyone"
        assert data_of(second.recv(timeout=2)) == "to everyone"


def test_status_shows_twice_the_cpus_in_wsgi_workers(demo: Stack) -> None:
    out = stackctl("status", cwd=demo.stack_dir).stdout
    workers = 2 * usable_cpus()
    assert re.search(rf"^wsgi\s+active\s+{workers} process\(es\)$", out, re.M), out
    assert re.search(r"^ws\s+active\s+1 process\(es\)$", out, re.M), out
    assert re.search(r"^redis\s+active\s+1 process\(es\)$", out, re.M), out
    assert re.search(r"^nginx\s+active\s+1 process\(es\)$", out, re.M), out


def env_exports(stack_dir: Path) -> dict[str, str]:
    out = stackctl("env", cwd=stack_dir).stdout
    return dict(re.findall(r"^export (\w+)=(\S+)$", out, re.M))


def wsgi_pids(demo: Stack) -> set[int]:
    out = stackctl("status", cwd=demo.stack_dir).stdout
    section = out.split("\nwsgi", 1)[1].split("\nws ", 1)[0]
    return {int(pid) for pid in re.findall(r"pid (\d+)", section)}


def test_circusctl_reload_wsgi_with_the_env_endpoint(demo: Stack) -> None:
    exports = env_exports(demo.stack_dir)
    assert exports["CIRCUSCTL_ENDPOINT"] == demo.circus_endpoint
    before = wsgi_pids(demo)
    env = {**os.environ, **exports}
    result = subprocess.run(
        ["circusctl", "reload", "wsgi", "--waiting"], env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr
    after = wsgi_pids(demo)
    assert len(after) == 2 * usable_cpus()
    assert not before & after, "every worker process is new"
    assert get(demo.url())[0] == 200


def test_stackctl_env_lets_publish_reach_this_stacks_redis(demo: Stack) -> None:
    env = {**os.environ, **env_exports(demo.stack_dir)}
    ws_url = demo.url().replace("http://", "ws://") + "ws/cron"
    with connect(ws_url) as ws:
        subprocess.run(
            ["python", "-c", "from stackctl.realtime import publish; publish('cron', 'tick')"],
            env=env,
            check=True,
            timeout=30,
        )
        assert data_of(ws.recv(timeout=2)) == "tick"


def test_control_sockets_are_private_and_circusd_listens_on_no_ip_port(demo: Stack) -> None:
    assert demo.run_dir.stat().st_mode & 0o777 == 0o700
    assert demo.circus_endpoint == f"ipc://{demo.run_dir / 'circus.ctl'}"
    circusd = psutil.Process(int(demo.circus_pidfile.read_text()))
    inet = [c for c in circusd.net_connections(kind="inet") if c.status in ("LISTEN", "NONE")]
    assert inet == []


def test_second_up_in_the_same_directory_says_it_is_running(demo: Stack) -> None:
    result = stackctl("up", "--detach", cwd=demo.stack_dir, check=False)
    assert result.returncode == 3
    assert f"a stack is already running in {demo.stack_dir}" in result.stderr


def test_logs_show_each_watcher(demo: Stack) -> None:
    out = stackctl("logs", "wsgi", "-n", "200", cwd=demo.stack_dir).stdout
    assert "spawned uWSGI worker" in out


def test_down_leaves_none_of_the_stacks_pids_alive(tmp_path: Path) -> None:

    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    with running_stack(root / "site", "--workers", "2") as stack:
        out = stackctl("status", cwd=stack.stack_dir).stdout
        pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
        circusd = int(stack.circus_pidfile.read_text())
        nginx_workers = [
            c.pid for c in psutil.Process(int((stack.run_dir / "nginx.pid").read_text())).children()
        ]
        # The 2 wsgi workers, Redis, the ws worker, NGiNX and the demo's Celery worker.
        assert len(pids) == 2 + 4 and nginx_workers
        stackctl("down", cwd=stack.stack_dir)
        for pid in [*pids, circusd, *nginx_workers]:
            assert (
                not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            )


def test_stackctl_reload_replaces_the_workers_and_the_site_keeps_answering(demo: Stack) -> None:
    before = wsgi_pids(demo)
    out = stackctl("reload", "wsgi", cwd=demo.stack_dir).stdout
    assert out.strip().startswith(f"reloaded wsgi: {len(before)} workers replaced")
    after = wsgi_pids(demo)
    assert len(after) == len(before) and not before & after
    assert get(demo.url())[0] == 200


def test_foreground_up_stops_everything_on_ctrl_c(short_tmp: Path) -> None:
    import signal
    import sys

    from stackctl import processes
    from tests.conftest import APP_AS_ROOT, free_port

    stackctl("init", str(short_tmp / "site"), "--demo", cwd=short_tmp)
    site = short_tmp / "site"
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "stackctl", "up", "--listen", f"127.0.0.1:{port}", "--workers", "2",
         *APP_AS_ROOT],  # fmt: skip
        cwd=site,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert up.stdout is not None
        lines = []
        for line in up.stdout:
            lines.append(line)
            if "Ctrl-C stops the stack" in line:
                break
        assert f"stack up: http://127.0.0.1:{port}/" in "".join(lines)
        assert get(f"http://127.0.0.1:{port}/")[0] == 200
        # `stackctl status | head -1` once head has gone: quiet, no BrokenPipeError.
        read_end, write_end = os.pipe()
        os.close(read_end)
        status = subprocess.run(
            [sys.executable, "-m", "stackctl", "status"],
            cwd=site,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
        os.close(write_end)
        assert (status.returncode, status.stderr) == (141, "")
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 130
        assert up.stdout.read().strip().endswith("stack stopped")  # not silence
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if up.stdout is not None:
            up.stdout.close()
        left = processes.find((site / ".stackctl" / "run").resolve())
        processes.kill_all(left)
    assert left == []
