"""The Prometheus exporter and `stackctl top` on a real stack: every family is there, and the
numbers move with what the stack does (clients, messages, requests, crashes, outages)."""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path

import pytest
from websockets.sync.client import connect

from stackctl import realtime, supervisor
from stackctl.stack import Stack
from stackctl.top import Scrape, parse
from tests.conftest import free_port, running_stack, short_dir, stackctl, wait_for

pytestmark = pytest.mark.e2e

QUEUE_LIMIT = 8
HISTORY = 5
SECRET_QUERY = "token=do-not-log-me-0123456789"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    settings = ["--set", f"metrics.listen=127.0.0.1:{free_port()}", "--set",
                f"ws.queue_limit={QUEUE_LIMIT}", "--set", f"ws.history={HISTORY}"]  # fmt: skip
    with running_stack(root / "site", "--workers", "2", *settings) as running:
        yield running


def metrics_url(stack: Stack) -> str:
    assert stack.profile.metrics.listen is not None
    return f"http://{stack.profile.metrics.listen}/metrics"


def scrape_text(stack: Stack) -> str:
    with urllib.request.urlopen(metrics_url(stack), timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def scrape(stack: Stack) -> Scrape:
    return parse(scrape_text(stack), 0.0)


def value(stack: Stack, name: str, **labels: str) -> float:
    found = scrape(stack).value(name, **labels)
    return -1.0 if found is None else found


def wait_value(stack: Stack, name: str, wanted: float, timeout: float = 20.0,
               **labels: str) -> None:  # fmt: skip
    """Until the metric equals ``wanted`` (the exporter shares a reading for half a second,
    and follows the access log every half second)."""
    wait_for(lambda: value(stack, name, **labels) == wanted, timeout,
             f"{name}{labels} == {wanted} (last {value(stack, name, **labels)})")  # fmt: skip


def ws_url(stack: Stack, channel: str) -> str:
    return stack.url().replace("http", "ws", 1) + f"ws/{channel}"


def get(stack: Stack, path: str) -> int:
    try:
        with urllib.request.urlopen(stack.url().rstrip("/") + path, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        e.close()
        return int(e.code)


def test_every_family_is_there_with_sane_values(stack: Stack) -> None:
    get(stack, "/")
    now = scrape(stack)
    for watcher in ("redis", "wsgi", "ws", "nginx", "metrics"):
        assert now.value("stackctl_watcher_up", watcher=watcher) == 1, watcher
        assert now.value("stackctl_watcher_rss_bytes", watcher=watcher) > 1_000_000, watcher
        assert now.value("stackctl_watcher_cpu_percent", watcher=watcher) >= 0, watcher
        assert now.value("stackctl_watcher_restarts_total", watcher=watcher) == 0, watcher
    assert now.value("stackctl_watcher_processes", watcher="wsgi") == 2
    for source in ("circus", "nginx", "redis", "ws"):
        assert now.value(f"stackctl_{source}_up") == 1, source
    assert set(now.by("stackctl_nginx_requests_total", "status")) == {
        "1xx", "2xx", "3xx", "4xx", "5xx"}  # fmt: skip
    assert now.value("stackctl_nginx_upstream_response_seconds_count") is not None
    assert now.value("stackctl_wsgi_workers") == 2
    assert len(now.by("stackctl_wsgi_worker_busy_seconds_total", "pid")) == 2
    assert now.value("stackctl_redis_memory_bytes") > 100_000
    assert now.value("stackctl_redis_connected_clients") >= 1
    assert now.by("stackctl_ws_connected_clients", "transport") == {
        "websocket": 0, "sse": 0, "longpoll": 0}  # fmt: skip
    for counter in ("messages_received", "messages_delivered", "messages_replayed",
                    "messages_dropped", "gaps_announced", "slow_clients_closed",
                    "redis_reconnects", "client_messages_published"):  # fmt: skip
        assert now.value(f"stackctl_ws_{counter}_total") is not None, counter
    assert now.value("stackctl_ws_redis_subscribed") == 1


def test_clients_by_transport_and_every_delivery_are_counted(stack: Stack) -> None:
    clients, messages = 5, 4
    before = scrape(stack)
    with ExitStack() as open_:
        sockets = [open_.enter_context(connect(ws_url(stack, "counted"))) for _ in range(clients)]
        events = open_.enter_context(
            urllib.request.urlopen(stack.url() + "events/counted", timeout=10)
        )
        assert events.status == 200
        wait_value(stack, "stackctl_ws_connected_clients", clients, transport="websocket")
        wait_value(stack, "stackctl_ws_connected_clients", 1, transport="sse")
        assert value(stack, "stackctl_ws_channels") == 1
        for n in range(messages):
            realtime.publish("counted", {"n": n}, url=stack.redis_url)
        for ws in sockets:
            for _ in range(messages):
                ws.recv(timeout=5)
        delivered = before.value("stackctl_ws_messages_delivered_total") or 0
        wait_value(stack, "stackctl_ws_messages_delivered_total",
                   delivered + (clients + 1) * messages)  # fmt: skip
        received = before.value("stackctl_ws_messages_received_total") or 0
        assert value(stack, "stackctl_ws_messages_received_total") == received + messages
    wait_value(stack, "stackctl_ws_connected_clients", 0, transport="websocket")
    wait_value(stack, "stackctl_ws_connected_clients", 0, transport="sse")


def test_a_resuming_client_is_counted_as_replayed(stack: Stack) -> None:
    realtime.publish("again", "one", url=stack.redis_url)
    replayed = value(stack, "stackctl_ws_messages_replayed_total")
    with connect(ws_url(stack, "again") + "?since=0-0") as ws:
        ws.recv(timeout=5)
    wait_value(stack, "stackctl_ws_messages_replayed_total", replayed + 1)


def test_a_gap_announced_to_a_resuming_client_is_counted(stack: Stack) -> None:
    with connect(ws_url(stack, "gappy")) as ws:
        realtime.publish("gappy", "first", url=stack.redis_url)
        first_id = json.loads(ws.recv(timeout=5))["id"]
    for n in range(2 * HISTORY):  # the first one falls out of the history
        realtime.publish("gappy", n, url=stack.redis_url)
    gaps = value(stack, "stackctl_ws_gaps_announced_total")
    replayed = value(stack, "stackctl_ws_messages_replayed_total")
    with connect(ws_url(stack, "gappy") + f"?since={first_id}") as ws:
        assert json.loads(ws.recv(timeout=5)) == {"channel": "gappy", "gap": True}
        for _ in range(HISTORY):
            ws.recv(timeout=5)
    wait_value(stack, "stackctl_ws_gaps_announced_total", gaps + 1)
    wait_value(stack, "stackctl_ws_messages_replayed_total", replayed + HISTORY)


def raw_websocket(stack: Stack, path: str) -> socket.socket:
    """A websocket that never reads after its handshake, with a small receive buffer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(str(stack.ws_socket))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())  # fmt: skip
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_a_slow_client_cut_is_counted_with_what_it_dropped(stack: Stack) -> None:
    closed = value(stack, "stackctl_ws_slow_clients_closed_total")
    dropped = value(stack, "stackctl_ws_messages_dropped_total")
    with closing(raw_websocket(stack, "/ws/slow")):
        wait_value(stack, "stackctl_ws_connected_clients", 1, transport="websocket")
        for n in range(60):  # 2 MB: more than its buffers and its queue of QUEUE_LIMIT
            realtime.publish("slow", {"n": n, "pad": "x" * 32768}, url=stack.redis_url)
        wait_value(stack, "stackctl_ws_slow_clients_closed_total", closed + 1)
    assert value(stack, "stackctl_ws_messages_dropped_total") > dropped


def test_uwsgi_requests_are_counted_per_worker(stack: Stack) -> None:
    before = scrape(stack).by("stackctl_wsgi_worker_requests_total", "pid")
    busy = sum(scrape(stack).by("stackctl_wsgi_worker_busy_seconds_total", "pid").values())
    for _ in range(20):
        assert get(stack, "/") == 200

    def counted() -> float:
        after = scrape(stack).by("stackctl_wsgi_worker_requests_total", "pid")
        return sum(after.values()) - sum(before.values())

    wait_for(lambda: counted() == 20, 10, "20 requests counted by the workers")
    after = scrape(stack)
    assert set(after.by("stackctl_wsgi_worker_requests_total", "pid")) == set(before)
    assert sum(after.by("stackctl_wsgi_worker_busy_seconds_total", "pid").values()) > busy


def test_nginx_counts_requests_by_status_class_and_upstream_time(stack: Stack) -> None:
    missing = value(stack, "stackctl_nginx_requests_total", status="4xx")
    answered = value(stack, "stackctl_nginx_requests_total", status="2xx")
    upstream = value(stack, "stackctl_nginx_upstream_response_seconds_count")
    assert get(stack, "/no-such-page") == 404
    assert get(stack, "/") == 200
    wait_value(stack, "stackctl_nginx_requests_total", missing + 1, status="4xx")
    wait_value(stack, "stackctl_nginx_requests_total", answered + 1, status="2xx")
    assert value(stack, "stackctl_nginx_upstream_response_seconds_count") >= upstream + 1


def test_a_killed_worker_shows_as_a_restart(stack: Stack) -> None:
    pids = scrape(stack).by("stackctl_wsgi_worker_requests_total", "pid")
    restarts = value(stack, "stackctl_watcher_restarts_total", watcher="wsgi")
    victim = int(next(iter(pids)))
    os.kill(victim, signal.SIGKILL)
    wait_value(stack, "stackctl_watcher_restarts_total", restarts + 1, watcher="wsgi")
    wait_for(lambda: value(stack, "stackctl_wsgi_workers") == 2, 30, "a new worker")
    workers = scrape(stack).by("stackctl_wsgi_worker_requests_total", "pid")
    assert str(victim) not in workers and len(workers) == 2


def test_while_redis_and_nginx_are_down_the_scrape_answers_and_says_so(stack: Stack) -> None:
    reconnects = value(stack, "stackctl_ws_redis_reconnects_total")
    supervisor.call(stack, "stop", name="redis", waiting=True)
    supervisor.call(stack, "stop", name="nginx", waiting=True)
    try:
        wait_value(stack, "stackctl_redis_up", 0)  # past the reading shared by close scrapes
        now = scrape(stack)
        assert now.value("stackctl_nginx_up") == 0
        assert now.value("stackctl_watcher_up", watcher="redis") == 0
        assert now.value("stackctl_watcher_up", watcher="nginx") == 0
        assert now.value("stackctl_redis_memory_bytes") is None  # left out, not made up
        assert now.value("stackctl_ws_up") == 1  # the worker itself still answers
    finally:
        supervisor.call(stack, "start", name="redis", waiting=True)
        supervisor.call(stack, "start", name="nginx", waiting=True)
    wait_value(stack, "stackctl_redis_up", 1)
    wait_value(stack, "stackctl_nginx_up", 1)
    wait_value(stack, "stackctl_ws_redis_reconnects_total", reconnects + 1, timeout=30)
    wait_value(stack, "stackctl_ws_redis_subscribed", 1)


def exporter_pids(stack: Stack) -> list[int]:
    return [process.pid for watcher in supervisor.status(stack) if watcher.name == "metrics"
            for process in watcher.processes]  # fmt: skip


def test_a_flood_of_scrapes_is_answered_and_the_exporter_lives_on(stack: Stack) -> None:
    pids = exporter_pids(stack)
    assert len(pids) == 1
    answers: list[int] = []

    def scrape_many() -> None:
        for _ in range(20):
            with urllib.request.urlopen(metrics_url(stack), timeout=30) as response:
                response.read()
                answers.append(response.status)

    threads = [threading.Thread(target=scrape_many) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers == [200] * 200
    assert exporter_pids(stack) == pids
    with pytest.raises(urllib.error.HTTPError) as other:
        urllib.request.urlopen(metrics_url(stack).replace("/metrics", "/other"), timeout=10)
    other.value.close()
    assert other.value.code == 404


def test_up_says_where_the_metrics_are(short_tmp: Path, no_leaks: Callable[[Path], None]) -> None:
    site = short_tmp / "site"
    stackctl("init", str(site), "--demo", cwd=short_tmp)
    no_leaks(site)
    metrics = f"127.0.0.1:{free_port()}"
    shown = stackctl("up", "--detach", "--listen", f"127.0.0.1:{free_port()}", "--set",
                     f"metrics.listen={metrics}", cwd=site).stdout  # fmt: skip
    assert f"metrics on http://{metrics}/metrics (`stackctl top`)" in shown


def test_the_exporter_has_its_own_log(stack: Stack) -> None:
    shown = stackctl("logs", "metrics", "-n", "20", cwd=stack.stack_dir).stdout
    assert f"serving Prometheus metrics on http://{stack.profile.metrics.listen}/metrics" in shown


def test_no_secret_reaches_the_page(stack: Stack) -> None:
    get(stack, f"/?{SECRET_QUERY}")
    get(stack, f"/nowhere?{SECRET_QUERY}")
    text = scrape_text(stack)
    key = stack.secret_file.read_bytes().strip().decode()
    for secret in (key, SECRET_QUERY, "do-not-log-me", stack.redis_url, "password"):
        assert secret not in text


def test_top_once_prints_a_frame_of_the_live_numbers(stack: Stack) -> None:
    with connect(ws_url(stack, "topped")):
        wait_value(stack, "stackctl_ws_connected_clients", 1, transport="websocket")
        out = stackctl("top", "--once", cwd=stack.stack_dir).stdout
    assert "\x1b[" not in out  # not a terminal: plain text
    lines = out.splitlines()
    for watcher in ("redis", "wsgi", "ws", "nginx", "metrics"):
        assert any(line.split()[:2] == [watcher, "up"] for line in lines), (watcher, out)
    assert any(line.startswith("REQUESTS") for line in lines), out
    assert any(line.startswith("REDIS") and " up " in line for line in lines), out
    assert "clients: websocket 1  sse 0  longpoll 0" in out


@contextmanager
def top_in_a_terminal(stack: Stack) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`stackctl top` on a terminal of its own: the process, and the terminal's other end."""
    controller, terminal = pty.openpty()
    top = subprocess.Popen([sys.executable, "-m", "stackctl", "top"], cwd=stack.stack_dir,
                           stdin=terminal, stdout=terminal, stderr=subprocess.PIPE)  # fmt: skip
    os.close(terminal)
    try:
        yield top, controller
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        assert top.stderr is not None
        top.stderr.close()
        os.close(controller)


def test_top_redraws_each_second_in_a_terminal_and_q_leaves_it(stack: Stack) -> None:
    with top_in_a_terminal(stack) as (top, controller):
        shown = b""
        deadline = time.monotonic() + 30
        while shown.count(b"WATCHER") < 2 and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                shown += os.read(controller, 65536)
        assert shown.count(b"\x1b[H\x1b[2J") >= 2, shown  # redrawn, in colour
        os.write(controller, b"q")
        assert top.wait(10) == 0


@pytest.mark.parametrize("hostile", [
    "0.0.0.0:9108", "*:9108", "8.8.8.8:9108", "[::]:9108", "example.com:9108",
    "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1", "127.0.0.1:9108\n[watcher:x]",
])  # fmt: skip
def test_a_hostile_metrics_listen_is_refused_with_a_clear_error(hostile: str) -> None:
    site = short_dir() / "site"
    stackctl("init", str(site), "--demo", cwd=site.parent)
    result = stackctl("render", "--set", f"metrics.listen={hostile}", cwd=site, check=False)
    assert result.returncode != 0
    assert "metrics.listen" in result.stderr and "loopback or private" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_reload_onto_a_taken_metrics_port_is_refused_and_the_exporter_stays(
    stack: Stack,
) -> None:
    with closing(socket.socket()) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = stackctl("reload", "--set", f"metrics.listen=127.0.0.1:{port}",
                          cwd=stack.stack_dir, check=False)  # fmt: skip
    assert result.returncode != 0
    assert f"metrics.listen: 127.0.0.1:{port} is not available" in result.stderr
    assert value(stack, "stackctl_circus_up") == 1  # still served where it was


def test_a_taken_metrics_port_stops_up_before_it_starts_anything(
    short_tmp: Path, no_leaks: Callable[[Path], None]
) -> None:
    stackctl("init", str(short_tmp / "site"), "--demo", cwd=short_tmp)
    no_leaks(short_tmp / "site")
    with closing(socket.socket()) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = stackctl("up", "--detach", "--listen", f"127.0.0.1:{free_port()}", "--set",
                          f"metrics.listen=127.0.0.1:{port}", cwd=short_tmp / "site",
                          check=False)  # fmt: skip
    assert result.returncode != 0
    assert f"metrics.listen: 127.0.0.1:{port} is not available" in result.stderr
    assert supervisor.running_pid(_planned(short_tmp / "site")) is None


def _planned(site: Path) -> Stack:
    from stackctl import profile
    from stackctl.stack import NO_PROGRAMS, plan

    return plan(profile.load(site, "dev", []), NO_PROGRAMS, writes=False)
