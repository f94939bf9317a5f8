"""The exporter's pure parts: metrics.listen, the access log's lines, the page's format, the
uWSGI workers' files, the realtime counters, and `stackctl top`'s frame."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stackctl import metrics, top, workerstats
from stackctl.errors import StackError
from stackctl.settings import Invalid, Listen, metrics_listen
from stackctl.ws.counters import Counters, exposition
from stackctl.ws.hub import Delivery, Hub


@pytest.mark.parametrize("good, wanted", [
    ("127.0.0.1:9108", Listen("127.0.0.1", 9108)),
    ("[::1]:9108", Listen("::1", 9108)),
    ("10.0.0.5:9100", Listen("10.0.0.5", 9100)),
    ("", None),
])  # fmt: skip
def test_metrics_listen_takes_loopback_and_private_addresses(
    good: str, wanted: Listen | None
) -> None:
    assert metrics_listen(good) == wanted


@pytest.mark.parametrize("bad", ["0.0.0.0:9108", "*:9108", "[::]:9108", "8.8.8.8:9108",
                                 "localhost:9108", "127.0.0.1", "127.0.0.1:0", 9108, None,
                                 "127.0.0.1:9108 ; evil", "169.254.1.1:9108"])  # fmt: skip
def test_metrics_listen_refuses_public_wildcard_and_malformed_values(bad: object) -> None:
    with pytest.raises(Invalid, match="loopback or private IP address"):
        metrics_listen(bad)


LINE = (b'127.0.0.1 - - [29/Nov/2026:23:30:00 +0000] "GET /a\\x22b HTTP/1.1" 404 12 "" '
        b'"curl \\x22x\\x22 1 2" 0.004 0.003')  # fmt: skip


def test_the_access_log_gives_status_classes_and_times(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(b"before the exporter started: not counted 200\n")
    access = metrics.AccessLog(log)
    with log.open("ab") as f:
        f.write(LINE + b"\n")
        f.write(LINE.replace(b" 404 ", b" 200 ").replace(b"0.003", b"0.1, 0.2") + b"\n")
        f.write(LINE.replace(b" 404 ", b" 101 ").replace(b" 0.003", b" -") + b"\n")
        f.write(b"garbage\n")
    access.poll()
    assert access.requests == {"1xx": 1, "2xx": 1, "3xx": 0, "4xx": 1, "5xx": 0}
    assert access.upstream_responses == 2
    assert access.upstream_seconds == pytest.approx(0.303)
    assert access.request_seconds == pytest.approx(0.012)
    page = metrics.exposition(access.families())
    assert 'stackctl_nginx_requests_total{status="4xx"} 1\n' in page
    assert "stackctl_nginx_upstream_response_seconds_count 2\n" in page
    assert "# TYPE stackctl_nginx_upstream_response_seconds summary\n" in page


def test_labels_are_escaped_and_values_plain() -> None:
    family = metrics.Family("x_total", "counter", "X.").add(3.0, a='q"\\\n').add(0.25)
    assert metrics.exposition([family]) == (
        '# HELP x_total X.\n# TYPE x_total counter\nx_total{a="q\\"\\\\\\n"} 3\nx_total 0.25\n'
    )


def test_close_scrapes_share_one_reading() -> None:
    now = [0.0]
    calls: list[float] = []

    def scrape() -> str:
        calls.append(now[0])
        return f"reading {len(calls)}"

    cache = metrics.Cache(scrape, clock=lambda: now[0])
    assert cache.get() == b"reading 1"
    now[0] = 0.4
    assert cache.get() == b"reading 1"
    now[0] = 0.6
    assert cache.get() == b"reading 2"


def test_a_worker_file_is_read_while_it_lives_and_removed_after(tmp_path: Path) -> None:
    stats = workerstats.WorkerStats(tmp_path / "stats", os.getpid())
    app = workerstats.measured(lambda environ, start: [b"ok"], stats)
    for _ in range(3):
        app({}, None).close()
    [sample] = workerstats.read_all(tmp_path / "stats")
    assert sample.pid == os.getpid() and sample.requests == 3 and sample.busy_seconds > 0
    dead = tmp_path / "stats" / "999999999"
    dead.write_bytes(b"\0" * workerstats.RECORD.size)
    assert [s.pid for s in workerstats.read_all(tmp_path / "stats")] == [os.getpid()]
    assert not dead.exists()


class Member:
    last_heard = 0.0

    def __init__(self) -> None:
        self.got: list[str] = []

    def deliver(self, delivery: Delivery) -> None:
        self.got.append(delivery.text)

    def keepalive(self) -> None: ...

    def abort(self) -> None: ...


@pytest.mark.parametrize("counting", [True, False])
def test_the_fan_out_counts_per_message_or_not_at_all(counting: bool) -> None:
    hub = Hub("unix:///nonexistent", 20, counting=counting)
    members = [Member() for _ in range(3)]
    for member in members:
        hub.members["news"].add(member)
    for n in range(4):
        hub.fan_out("news", Delivery(f'{{"id": "1-{n}"}}'))
    assert all(len(member.got) == 4 for member in members)
    assert (hub.counters.received, hub.counters.delivered) == ((4, 12) if counting else (0, 0))


def test_the_worker_page_names_clients_by_transport() -> None:
    counters = Counters()
    counters.delivered = 7

    class EventStream:
        pass

    page = exposition(counters, [Member(), EventStream()], channels=2, subscribed=True,
                      skipped=1)  # fmt: skip
    assert 'stackctl_ws_connected_clients{transport="sse"} 1\n' in page
    assert 'stackctl_ws_connected_clients{transport="websocket"} 0\n' in page
    assert 'stackctl_ws_connected_clients{transport="other"} 1\n' in page
    assert "stackctl_ws_messages_delivered_total 7\n" in page
    assert "stackctl_ws_skipped_messages_total 1\n" in page
    assert "stackctl_ws_channels 2\n" in page


def test_top_turns_two_scrapes_into_rates() -> None:
    page = (
        'stackctl_watcher_up{watcher="wsgi"} 1\nstackctl_watcher_processes{watcher="wsgi"} 2\n'
        'stackctl_watcher_rss_bytes{watcher="wsgi"} 104857600\n'
        'stackctl_nginx_requests_total{status="2xx"} %d\nstackctl_nginx_up 1\n'
        'stackctl_wsgi_worker_requests_total{pid="41"} %d\n'
        "stackctl_ws_up 1\nstackctl_ws_messages_delivered_total %d\n"
        'stackctl_ws_connected_clients{transport="websocket"} 3\n'
    )
    before = top.parse(page % (10, 5, 100), 0.0)
    now = top.parse(page % (30, 15, 400), 2.0)
    assert top.rate(now, before, "stackctl_nginx_requests_total", status="2xx") == 10.0
    assert top.rate(before, now, "stackctl_nginx_requests_total", status="2xx") == 0.0
    text = top.ANSI.sub("", top.frame(now, before, "title"))
    assert "wsgi       up         2" in text and "100.0M" in text
    assert "REQUESTS   10.0/s   2xx 10.0" in text
    assert "41             5.0" in text
    assert "delivered 150.0/s" in text and "websocket 3" in text


def test_the_exporter_gets_a_redis_password_in_its_environment_not_its_command_line(
    tmp_path: Path,
) -> None:
    from tests.unit.test_render import circus_ini, make_stack

    url = "redis://:s3cret-pw@10.0.0.9:6379/0"
    ini = circus_ini(make_stack(tmp_path, f'[redis]\nurl = "{url}"\n'))
    command = ini["watcher:metrics"]["cmd"]
    assert "--redis" in command.split() and "s3cret-pw" not in command
    assert ini["env:metrics"]["STACKCTL_REDIS_URL"] == url
    for section in ini.sections():
        if section.startswith("watcher:"):
            assert "s3cret-pw" not in ini[section]["cmd"], section


def test_a_source_that_fails_unforeseen_costs_its_own_numbers_only() -> None:
    def broken() -> str:
        raise ValueError("redis://:secret@host: unexpected answer")

    assert metrics.guarded("redis", "Redis", broken) == (
        "# HELP stackctl_redis_up 1 if Redis answered this scrape.\n"
        "# TYPE stackctl_redis_up gauge\nstackctl_redis_up 0\n"
    )


def test_hostile_worker_files_are_neither_followed_nor_waited_on(tmp_path: Path) -> None:
    """The service user writes the workers' files, and root's exporter reads them: a link to
    a file of root's, a pipe nobody writes to, a name that only looks like a pid, a file of
    the wrong size: skipped, quickly, and the real worker still counted."""
    directory = tmp_path / "stats"
    workerstats.WorkerStats(directory, os.getpid())
    secret = tmp_path / "root-only"
    secret.write_bytes(workerstats.RECORD.pack(1234, 5678))
    (directory / "1").symlink_to(secret)  # pid 1 is alive
    os.mkfifo(directory / str(os.getppid()))
    for name in ("²", "9" * 40, "-1"):
        (directory / name).write_bytes(b"\0" * workerstats.RECORD.size)
    found: list[list[int]] = []
    with subprocess.Popen(["sleep", "60"]) as other:
        (directory / str(other.pid)).write_bytes(b"\0" * (workerstats.RECORD.size + 1))
        reader = threading.Thread(target=lambda: found.append(
            [s.pid for s in workerstats.read_all(directory)]), daemon=True)  # fmt: skip
        reader.start()
        reader.join(10)
        if reader.is_alive():  # stuck on the pipe: let it go
            with open(directory / str(os.getppid()), "wb"):
                pass
            reader.join(10)
        other.kill()
    assert found == [[os.getpid()]]
    assert secret.read_bytes() == workerstats.RECORD.pack(1234, 5678)


def test_a_linked_statistics_directory_is_not_followed(tmp_path: Path) -> None:
    """The service user owns the directory around the workers' files: if it puts a link
    there, root's exporter must not remove the files with pid-like names it points to."""
    elsewhere = tmp_path / "someone-elses"
    elsewhere.mkdir()
    (elsewhere / "999999999").write_bytes(b"\0" * workerstats.RECORD.size)
    (tmp_path / "stats").symlink_to(elsewhere)
    assert workerstats.read_all(tmp_path / "stats") == []
    assert (elsewhere / "999999999").exists()


def answering(path: Path, answer: Callable[[socket.socket], None]) -> threading.Thread:
    """A server on ``path`` that answers one connection with ``answer``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as connection, contextlib.suppress(OSError):
            answer(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def trickle(connection: socket.socket) -> None:
    for _ in range(20):
        connection.sendall(b"#")
        time.sleep(0.3)


GOOD = exposition(Counters(), [], 0, True, 0)


@pytest.mark.parametrize("answer", [
    lambda c: c.sendall(b"not prometheus at all\n"),
    lambda c: c.sendall(GOOD.encode() + b"stackctl_redis_up 1\n"),
    lambda c: c.sendall(GOOD.encode() + b"stackctl_ws_up 1\n"),
    lambda c: c.sendall(GOOD.encode() * 2),
    lambda c: c.sendall(b'stackctl_ws_connected_clients{transport="\x1b[2J"} 1\n'),
    lambda c: c.sendall(b"stackctl_ws_channels 1"),  # cut short
    trickle,
], ids=["garbage", "other-family", "own-up", "twice", "escape", "cut", "trickle"])  # fmt: skip
def test_a_hostile_websocket_counters_socket_costs_its_numbers_only(
    short_tmp: Path, answer: Callable[[socket.socket], None]
) -> None:
    """The service user can put its own server on the counters' socket: whatever it says
    (garbage, other families, too much, too slowly), the exporter's page stays a valid page
    with the realtime numbers left out, and comes within the source's time."""
    server = answering(short_tmp / "ws.sock", answer)
    started = time.monotonic()
    page = metrics.ws_text(short_tmp / "ws.sock")
    assert time.monotonic() - started < metrics.SOURCE_TIMEOUT + 1
    assert page == metrics.exposition([metrics.up("ws", False, "the websocket worker")])
    server.join(15)


def test_the_websocket_workers_own_page_is_taken(short_tmp: Path) -> None:
    server = answering(short_tmp / "ws.sock", lambda c: c.sendall(GOOD.encode()))
    page = metrics.ws_text(short_tmp / "ws.sock")
    assert page.endswith(GOOD) and "stackctl_ws_up 1\n" in page
    server.join(15)


def test_a_flood_on_the_websocket_counters_socket_is_not_read_into_memory(
    short_tmp: Path,
) -> None:
    """Before, a server that sent without end had the exporter (root) hold a second of it:
    some 1 GB, each scrape."""
    sent: list[int] = []

    def flood(connection: socket.socket) -> None:
        block = b"stackctl_ws_channels 1\n" * 4096
        deadline = time.monotonic() + 5
        sent.append(0)
        while time.monotonic() < deadline:
            connection.sendall(block)
            sent[0] += len(block)

    server = answering(short_tmp / "ws.sock", flood)
    page = metrics.ws_text(short_tmp / "ws.sock")
    server.join(15)
    assert page == metrics.exposition([metrics.up("ws", False, "the websocket worker")])
    assert sent[0] < 16 * 2**20  # the limit, and what the socket's buffers hold


def test_a_source_that_hangs_holds_one_thread_and_no_scrape(
    monkeypatch: pytest.MonkeyPatch, short_tmp: Path
) -> None:
    """A scrape waits SCRAPE_DEADLINE at most for a source; while one reading hangs, the next
    scrapes start no other for that source."""
    monkeypatch.setattr(metrics, "SCRAPE_DEADLINE", 0.3)
    release = threading.Event()
    monkeypatch.setattr(metrics, "wsgi_families", lambda directory: [release.wait(30), []][1])
    sources = metrics.Sources("tcp://127.0.0.1:1", [], metrics.Restarts(""),
                              wsgi_stats=short_tmp)  # fmt: skip
    monkeypatch.setattr(metrics, "circus_families", lambda *args: [metrics.up("circus", True, "")])
    before = threading.active_count()
    try:
        for _ in range(5):
            started = time.monotonic()
            page = sources.scrape()
            assert time.monotonic() - started < 2
            assert "stackctl_wsgi_up 0\n" in page and "stackctl_circus_up 1\n" in page
        assert threading.active_count() - before <= 1
    finally:
        release.set()


def test_top_fits_its_frame_to_the_terminal() -> None:
    """A narrow or short terminal would wrap or scroll the frame, and lose its top at each
    redraw: each line is cut (colour codes take no room) and the frame leaves the last line
    free."""
    text = f"{top.BOLD}WATCHER{top.RESET} {'x' * 50}\n" + "".join(f"{n}\n" for n in range(30))
    shown = top.fit(text, 20, 10)
    rows = shown.split("\n")[:-1]
    assert len(rows) == 9 and rows[0] == f"{top.BOLD}WATCHER{top.RESET} {'x' * 12}{top.RESET}"
    assert all(len(top.ANSI.sub("", row)) <= 20 for row in rows)
    assert top.ANSI.sub("", rows[-1]).startswith("(23 more lines")
    assert top.fit("a\nb\n", 80, 24) == "a\nb\n"


def test_top_takes_no_terminal_codes_and_no_endless_page_from_the_port() -> None:
    """top is often run as root, and while the exporter restarts any local user may take its
    port: what it reads there must not reach the terminal as codes, nor fill the memory."""
    page = (f'stackctl_watcher_up{{watcher="wsgi"}} 1\n'
            f'stackctl_watcher_up{{watcher="x{top.CLEAR}\x1b]0;owned\x07"}} 1\n')  # fmt: skip
    scrape = top.parse(page, 0.0)
    assert scrape.by("stackctl_watcher_up", "watcher") == {"wsgi": 1.0}
    assert "\x1b" not in top.frame(scrape, scrape, "t").replace(top.BOLD, "").replace(
        top.RESET, "").replace(top.DIM, "")  # fmt: skip
    endless = io.BytesIO(b"x" * (top.PAGE_LIMIT + 10))
    with pytest.raises(StackError, match="more than"):
        top.read_page(endless, "http://127.0.0.1:9108/metrics")
