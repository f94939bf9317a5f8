"""The exporter on a real stack, attacked from outside: by the service user (who writes the
files and the socket the exporter reads, while the exporter may run as root), by any local
user (who reaches its port), and by clients that misbehave."""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.sync.client import connect

from stackctl import metrics, supervisor, workerstats
from stackctl.stack import Stack
from stackctl.top import ANSI, parse
from tests.conftest import free_port, running_stack, short_dir, stackctl, wait_for
from tests.e2e.test_metrics import top_in_a_terminal

pytestmark = pytest.mark.e2e

# A line of the text format: a comment, or a sample whose label values are quoted strings.
SAMPLE = re.compile(r'[a-zA-Z_:][\w:]*(\{(\w+="([^"\\\n]|\\.)*",?)*\})? -?[\d.e+-]+|NaN')
COMMENT = re.compile(r"# (HELP|TYPE) [a-zA-Z_:][\w:]* .*")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    listen = f"metrics.listen=127.0.0.1:{free_port()}"
    with running_stack(root / "site", "--workers", "2", "--set", listen) as running:
        yield running


@dataclass
class Site:
    """A demo stack of the test's own, started with metrics on."""

    path: Path
    listen: str  # metrics.listen
    port: int  # the site's
    up: tuple[str, ...]  # the command that started it, to start it again


def started_site(short_tmp: Path, no_leaks: Callable[[Path], None], *settings: str) -> Site:
    site = Site(short_tmp / "site", f"127.0.0.1:{free_port()}", free_port(), ())
    stackctl("init", str(site.path), "--demo", cwd=short_tmp)
    no_leaks(site.path)
    site.up = ("up", "--detach", "--listen", f"127.0.0.1:{site.port}", "--set",
               f"metrics.listen={site.listen}", *settings)  # fmt: skip
    stackctl(*site.up, cwd=site.path)
    return site


def scrape_text(stack: Stack, timeout: float = 10) -> str:
    time.sleep(metrics.FRESH_FOR)  # not the reading an earlier scrape shares
    with urllib.request.urlopen(f"http://{stack.profile.metrics.listen}/metrics",
                                timeout=timeout) as response:  # fmt: skip
        assert response.status == 200
        return str(response.read().decode())


def assert_valid_page(text: str) -> None:
    """What Prometheus's parser insists on: every line in form, each family typed once."""
    typed = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(typed) == len(set(typed)), "a family is typed twice"
    bad = [line for line in text.splitlines()
           if not (COMMENT.fullmatch(line) or SAMPLE.fullmatch(line))]  # fmt: skip
    assert bad == []


def exporter_pid(stack: Stack) -> int:
    [pid] = [process.pid for watcher in supervisor.status(stack) if watcher.name == "metrics"
             for process in watcher.processes]  # fmt: skip
    return pid


def test_a_pipe_and_a_link_among_the_workers_files_neither_stall_nor_leak(
    stack: Stack, short_tmp: Path
) -> None:
    """The service user writes that directory. Before: a pipe named after a live pid froze
    every scrape for good; a link made root's exporter read the file it points to."""
    secret = short_tmp / "root-only"
    secret.write_bytes(workerstats.RECORD.pack(424242, 0))
    secret.chmod(0o600)
    pipe, link = stack.wsgi_stats_dir / str(os.getpid()), stack.wsgi_stats_dir / "1"
    os.mkfifo(pipe)
    link.symlink_to(secret)
    try:
        text = scrape_text(stack)
        assert "424242" not in text and 'pid="1"' not in text
        assert "stackctl_wsgi_workers 2\n" in text  # the real ones still counted
    finally:
        with contextlib.suppress(OSError):  # a reader stuck on the pipe: let it go
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        pipe.unlink()
        link.unlink()


def hostile_server(path: Path, answer: bytes) -> tuple[socket.socket, threading.Thread]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    listener.settimeout(0.2)

    def serve() -> None:
        while listener.fileno() != -1:
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            with connection, contextlib.suppress(OSError):
                connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_a_stranger_on_the_counters_socket_cannot_spoil_the_page(stack: Stack) -> None:
    """Whoever runs as the service user can answer on the websocket worker's socket. Before,
    what it said went into the page as it came: one bad line and Prometheus refuses the
    whole scrape; a line of its choosing (Redis up while it is down) was believed."""
    path = stack.ws_metrics_socket
    aside = path.with_name(path.name + ".real")
    path.rename(aside)  # the worker keeps listening on it, under this name
    listener, thread = hostile_server(path, b"stackctl_redis_up 0\nnot a metric\n")
    try:
        text = scrape_text(stack)
        assert_valid_page(text)
        assert "stackctl_ws_up 0\n" in text
        redis_up = [line for line in text.splitlines() if line.startswith("stackctl_redis_up")]
        assert redis_up == ["stackctl_redis_up 1"]
    finally:
        listener.close()
        thread.join(5)
        path.unlink()
        aside.rename(path)
    assert "stackctl_ws_up 1\n" in scrape_text(stack)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_slow_clients_do_not_hold_the_exporters_files(stack: Stack) -> None:
    """Any local user reaches the port. Before, each connection that sent its request slowly
    held a thread and a file for as long as it trickled: some hundreds of them and the
    process (1024 files under a stock systemd) can accept no scrape."""
    pid = exporter_pid(stack)
    before = open_files(pid)
    host, port = metrics.host_port(str(stack.profile.metrics.listen))
    with contextlib.ExitStack() as connections:
        for _ in range(300):
            connection = connections.enter_context(socket.create_connection((host, port)))
            connection.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        time.sleep(2)
        assert open_files(pid) - before < 100
        assert "stackctl_circus_up 1\n" in scrape_text(stack)
    assert exporter_pid(stack) == pid


def exporter_log(stack: Stack) -> str:
    return stackctl("logs", "metrics", "-n", "2000", cwd=stack.stack_dir).stdout


def test_clients_that_leave_before_their_answer_leave_no_tracebacks(stack: Stack) -> None:
    """Before, each one printed a traceback of some twenty lines into the exporter's log:
    a loop of them filled the disk."""
    host, port = metrics.host_port(str(stack.profile.metrics.listen))
    for _ in range(100):
        with socket.create_connection((host, port)) as connection:
            connection.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            # Closed at once with a reset, as a scraper that gave up.
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert "stackctl_circus_up 1\n" in scrape_text(stack)
    assert "Traceback" not in exporter_log(stack)


@pytest.mark.parametrize("request_bytes, status", [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage\r\n\r\n", b""),  # TLS hello
    (b"GET /metrics HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", b"431"),
    (b"GET /../../etc/passwd HTTP/1.0\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", b"501"),
])  # fmt: skip
def test_malformed_requests_get_an_error_and_the_exporter_lives_on(
    stack: Stack, request_bytes: bytes, status: bytes
) -> None:
    pid = exporter_pid(stack)
    host, port = metrics.host_port(str(stack.profile.metrics.listen))
    with socket.create_connection((host, port), timeout=10) as connection:
        connection.sendall(request_bytes)
        answer = connection.recv(200)
    if status:
        assert answer.split(b" ")[1] == status, answer
    else:  # taken for HTTP/0.9: an error page without a status line
        assert b"Error code: 400" in answer, answer
    assert exporter_pid(stack) == pid


BATCHES, PER_THREAD = 3, 170
ROTATED_REQUESTS = BATCHES * 3 * PER_THREAD


def test_requests_are_counted_once_across_access_log_rotations(
    short_tmp: Path, no_leaks: Callable[[Path], None]
) -> None:
    """The access log rotates (logs.max_mb = 1) three times while requests come in: the
    exporter, following it, counts each request once, none missed and none twice."""
    started = started_site(short_tmp, no_leaks, "--set", "logs.max_mb=1", "--set", "logs.keep=3")
    site, listen, port = started.path, started.listen, started.port
    url = f"http://{listen}/metrics"

    def counted() -> float:
        time.sleep(metrics.FRESH_FOR)
        with urllib.request.urlopen(url, timeout=10) as response:
            page = parse(response.read().decode(), 0.0)
        return sum(page.by("stackctl_nginx_requests_total", "status").values())

    wait_for(lambda: counted() >= 0, 20, "the exporter answers")
    time.sleep(2 * metrics.LOG_POLL)
    before = counted()
    path = "/nowhere/" + "x" * 2500  # some 2.6 kB a line: 1 MiB in some 400 requests

    def send(count: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(count):
            connection.request("GET", path)
            connection.getresponse().read()
        connection.close()

    for _ in range(BATCHES):  # each some 1.3 MB, then time for the rotation (once a second)
        threads = [threading.Thread(target=send, args=(PER_THREAD,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        time.sleep(2.5)
    access_log = site / ".stackctl" / "log" / "nginx-access.log"
    assert access_log.with_name("nginx-access.log.3").exists()  # rotated while followed
    wait_for(lambda: counted() - before >= ROTATED_REQUESTS, 30,
             f"{ROTATED_REQUESTS} requests counted")  # fmt: skip
    time.sleep(3 * metrics.LOG_POLL)
    assert counted() - before == ROTATED_REQUESTS


def read_until(controller: int, wanted: bytes, timeout: float) -> bytes:
    shown = b""
    deadline = time.monotonic() + timeout
    while wanted not in shown and time.monotonic() < deadline:
        if select.select([controller], [], [], 0.5)[0]:
            try:
                shown += os.read(controller, 65536)
            except OSError:  # top left: its terminal is closed
                break
    return shown


def test_top_waits_out_an_exporter_that_stops_and_comes_back(stack: Stack) -> None:
    """Before, top ended on the first scrape that failed: a reload or a crash of the exporter
    threw out whoever was watching, at the moment worth watching."""
    with top_in_a_terminal(stack) as (top, controller):
        try:
            assert b"WATCHER" in read_until(controller, b"WATCHER", 30)
            supervisor.call(stack, "stop", name="metrics", waiting=True)
            assert b"does not answer" in read_until(controller, b"does not answer", 30)
            assert top.poll() is None
        finally:
            supervisor.call(stack, "start", name="metrics", waiting=True)
        assert b"WATCHER" in read_until(controller, b"WATCHER", 30)
        os.write(controller, b"q")
        assert top.wait(10) == 0


def wsgi_pids(stack: Stack) -> set[int]:
    return {process.pid for watcher in supervisor.status(stack) if watcher.name == "wsgi"
            for process in watcher.processes}  # fmt: skip


def kill_a_worker(stack: Stack) -> None:
    pids = wsgi_pids(stack)
    victim = min(pids)
    os.kill(victim, 9)
    wait_for(lambda: victim not in wsgi_pids(stack) and len(wsgi_pids(stack)) == len(pids),
             30, "Circus to start a worker in place of the killed one")  # fmt: skip


def test_files_of_replaced_workers_go_even_when_nobody_scrapes(stack: Stack) -> None:
    """A worker leaves its file behind when it ends (killed, recycled by wsgi.max_requests, a
    reload, dev's restarts on each save). Before, only a scrape removed them: a stack nobody
    scraped gathered one per worker ever started, and a pid used again by another process
    was taken for a worker."""
    for _ in range(2):
        kill_a_worker(stack)
    wait_for(lambda: {int(name) for name in os.listdir(stack.wsgi_stats_dir)}
             <= wsgi_pids(stack), 20,
             "only the files of live workers")  # fmt: skip


def test_top_into_a_pipe_writes_plain_frames(stack: Stack) -> None:
    """`stackctl top | less`, `> file`: before, each frame began with the codes that clear a
    screen and carried colours, unreadable in a file."""
    top = subprocess.Popen([sys.executable, "-m", "stackctl", "top"], cwd=stack.stack_dir,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert top.stdout is not None
        shown = b""
        deadline = time.monotonic() + 30
        while shown.count(b"WATCHER") < 2 and time.monotonic() < deadline:
            if select.select([top.stdout], [], [], 0.5)[0]:
                shown += os.read(top.stdout.fileno(), 65536)
        top.send_signal(signal.SIGINT)
        assert top.wait(10) == 0
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        for stream in (top.stdout, top.stderr):
            assert stream is not None
            stream.close()
    assert shown.count(b"WATCHER") >= 2, shown
    assert b"\x1b" not in shown


def trickling_redis(path: Path) -> tuple[socket.socket, threading.Event]:
    """A "Redis" that announces a reply of 100 MB and sends it a byte at a time: each read
    comes within any timeout, the reply never ends."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    listener.settimeout(0.2)
    done = threading.Event()

    def answer(connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            connection.recv(65536)
            connection.sendall(b"$100000000\r\n")
            while not done.wait(0.3):
                connection.sendall(b"#")

    def serve() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                connection, _ = listener.accept()
                threading.Thread(target=answer, args=(connection,), daemon=True).start()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener, done


def test_a_redis_that_never_finishes_its_reply_does_not_hold_the_scrape(stack: Stack) -> None:
    """Redis's socket is in the service user's directory. Before, a server there that sent
    its reply a byte at a time held the scrape, and every scrape after it, for as long as
    it went on: the exporter answered nobody."""
    path = stack.redis_socket
    aside = path.with_name(path.name + ".real")
    path.rename(aside)
    _, done = trickling_redis(path)
    try:
        started = time.monotonic()
        text = scrape_text(stack, timeout=30)
        assert time.monotonic() - started < metrics.SOURCE_TIMEOUT * 10
        assert "stackctl_redis_up 0\n" in text and "stackctl_circus_up 1\n" in text
        assert_valid_page(text)
    finally:
        done.set()
        time.sleep(0.5)
        path.unlink()
        aside.rename(path)
    wait_for(lambda: "stackctl_redis_up 1\n" in scrape_text(stack), 20, "Redis up again")


def test_metrics_turned_off_by_a_reload_and_on_again_count_from_every_source(
    short_tmp: Path, no_leaks: Callable[[Path], None]
) -> None:
    started = started_site(short_tmp, no_leaks)
    site, listen = started.path, started.listen
    host, port = metrics.host_port(listen)
    stackctl("reload", "--set", "metrics.listen=", cwd=site)
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=5):
        pass  # nothing serves the port any more
    off = stackctl("top", "--once", cwd=site, check=False)
    assert off.returncode != 0 and 'metrics.listen is ""' in off.stderr
    stackctl("reload", "--set", f"metrics.listen={listen}", cwd=site)

    def page() -> str:
        try:
            with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as response:
                return str(response.read().decode())
        except OSError:
            return ""  # the exporter still starting

    wait_for(lambda: all(f"stackctl_{source}_up 1\n" in page()
                         for source in ("circus", "nginx", "redis", "ws")), 30,
             "every source up again")  # fmt: skip
    assert re.search(r"^stackctl_wsgi_workers [1-9]", page(), re.MULTILINE)


def test_a_statistics_directory_the_workers_cannot_use_does_not_take_the_site_down(
    short_tmp: Path, no_leaks: Callable[[Path], None]
) -> None:
    """The workers' directory outlives `down`; left unusable (made by the user the stack ran
    as before server.user changed, or anything else in its place), it made every worker fail
    to load the app: the site down for the sake of its metrics."""
    started = started_site(short_tmp, no_leaks)
    site, listen, port, up = started.path, started.listen, started.port, started.up
    stats = site / ".stackctl" / "run" / "service" / "wsgi-stats"
    assert stats.is_dir()
    stackctl("down", cwd=site)
    shutil.rmtree(stats)
    stats.write_bytes(b"")  # not a directory: no worker can make its file there
    stackctl(*up, cwd=site)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as response:
        assert "stackctl_wsgi_workers 0\n" in response.read().decode()  # uncounted, and seen
    assert "not counted for the metrics" in stackctl("logs", "wsgi", "-n", "50", cwd=site).stdout


def test_a_counters_socket_path_the_worker_cannot_take_does_not_take_realtime_down(
    short_tmp: Path, no_leaks: Callable[[Path], None]
) -> None:
    """As with the uWSGI workers' files: a directory left where the websocket worker puts its
    counters' socket made the worker fail at start, and realtime with it."""
    started = started_site(short_tmp, no_leaks)
    site, listen, port, up = started.path, started.listen, started.port, started.up
    path = site / ".stackctl" / "run" / "service" / "ws-metrics.sock"
    stackctl("down", cwd=site)
    path.unlink()
    path.mkdir()
    (path / "something").write_bytes(b"")
    stackctl(*up, cwd=site)
    with connect(f"ws://127.0.0.1:{port}/ws/still-here", open_timeout=10) as client:
        client.ping().wait(10)
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as response:
        assert "stackctl_ws_up 0\n" in response.read().decode()  # uncounted, and seen


def test_top_in_a_narrow_short_terminal_keeps_its_frame_whole(stack: Stack) -> None:
    with top_in_a_terminal(stack) as (top, controller):
        fcntl.ioctl(controller, termios.TIOCSWINSZ, struct.pack("HHHH", 12, 40, 0, 0))
        shown = read_until(controller, b"more lines", 30)
        os.write(controller, b"q")
        assert top.wait(10) == 0
    frame = shown.rsplit(b"\x1b[2J", 1)[-1].decode()
    rows = metrics_top_rows(frame)
    assert rows[1].startswith("WATCHER") and len(rows) <= 11, rows
    assert all(len(row) <= 40 for row in rows), rows


def metrics_top_rows(frame: str) -> list[str]:
    """The lines of a frame as the terminal shows them: without colour codes."""
    return [ANSI.sub("", row) for row in frame.replace("\r", "").split("\n") if row]


def test_a_killed_exporter_is_back_on_its_port_within_seconds(stack: Stack) -> None:
    pid = exporter_pid(stack)
    os.kill(pid, 9)

    def answers() -> bool:
        try:
            return "stackctl_circus_up 1\n" in scrape_text(stack, timeout=5)
        except OSError:
            return False

    wait_for(answers, 15, "the exporter to answer again")
    assert exporter_pid(stack) != pid
    assert_valid_page(scrape_text(stack))
