"""Bounded logs, under load: rotations by size that lose no line, cut none, fail no request,
and `stackctl logs -f` following across them."""

from __future__ import annotations

import http.client
import itertools
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

import pytest

from stackctl.logfile import MIB, backups
from stackctl.stack import Stack
from stackctl.supervisor import call
from tests.conftest import running_stack, stackctl, wait_for

pytestmark = pytest.mark.e2e

APP = """
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""
PAD = 2000
"""Longer than the 1024 bytes Circus reads from a pipe at a time: each uWSGI log line comes in
pieces, and the pieces of two workers' lines may come one after the other."""
ACCESS_LINE = re.compile(rf'"GET /r/(\d+)/p{{{PAD}}} HTTP/1.1" 200 \d+ "" "ua-\1-u{{{PAD}}}" ')
WSGI_LINE = re.compile(rf"\] GET /r/(\d+)/p{{{PAD}}} HTTP/1.1 => 200 ")
MAX_REQUESTS = 20_000
MAX_SECONDS = 60.0
SETTLE_SECONDS = 20.0


def site(tmp: Path) -> Path:
    (tmp / "app.py").write_text(APP)
    stackctl("init", ".", "--app", "app:application", cwd=tmp)
    return tmp


def up(site: Path, keep: int, max_mb: int = 1) -> AbstractContextManager[Stack]:
    return running_stack(
        site, "--workers", "2", "--set", "wsgi.autoreload=false", "--set", f"logs.max_mb={max_mb}",
        "--set", f"logs.keep={keep}", "--set", "wsgi.log_requests=true",
    )  # fmt: skip


class TaggedLoad:
    """Paced GETs, each with its number in the path and the User-Agent; bounded in count and
    time. A request fails if it gets no answer or anything but a 200."""

    def __init__(self, port: int, threads: int = 4, pause: float = 0.01) -> None:
        self.port, self.pause = port, pause
        self.numbers = itertools.count()
        self.sent = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> TaggedLoad:
        self.deadline = time.monotonic() + MAX_SECONDS
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=40)

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                if self.sent >= MAX_REQUESTS:
                    return
                n = next(self.numbers)
                self.sent += 1
            try:
                agent = f"ua-{n}-{'u' * PAD}"
                conn.request("GET", f"/r/{n}/{'p' * PAD}", headers={"User-Agent": agent})
                response = conn.getresponse()
                response.read()
                failure = None if response.status == 200 else f"{n}: status {response.status}"
            except (OSError, http.client.HTTPException) as e:
                failure = f"{n}: {type(e).__name__}: {e}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            if failure:
                with self.lock:
                    self.failures.append(failure)
            time.sleep(self.pause)
        conn.close()


def numbers_in(lines: list[str], pattern: re.Pattern[str]) -> Counter[int]:
    """The request number of each tagged line; a tagged line that is not whole fails."""
    found: Counter[int] = Counter()
    for line in lines:
        if "/r/" not in line:
            continue
        match = pattern.search(line)
        assert match, f"a cut or mixed line: {line[:120]}...{line[-120:]}"
        found[int(match.group(1))] += 1
    return found


def assert_each_once(read: Callable[[], list[str]], pattern: re.Pattern[str], sent: int,
                     what: str) -> None:  # fmt: skip
    """Every request numbered below ``sent`` has exactly one whole line in what ``read`` gives,
    once it has all arrived (uWSGI logs a request after its answer, circusd writes it after)."""
    every = Counter(range(sent))
    wait_for(lambda: set(numbers_in(read(), pattern)) >= set(every), SETTLE_SECONDS, what)
    assert numbers_in(read(), pattern) == every, what


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def lines_on_disk(log: Path) -> list[str]:
    # Between its rename and NGiNX's reopen, a rotated access log has no current file yet.
    wait_for(log.exists, 15, f"a new {log.name} after its rotation")
    lines = []
    for path in [log, *backups(log)]:
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path} ends inside a line"
        lines += data.decode().splitlines()
    return lines


def test_logs_rotate_by_size_under_load_losing_no_line_and_failing_no_request(
    short_tmp: Path,
) -> None:
    with up(site(short_tmp), keep=50) as stack:
        access, wsgi = stack.nginx_access_log, stack.log_dir / "wsgi.log"
        circusd_log = stack.log_dir / "circusd.log"
        with circusd_log.open("a") as grown:  # as if circusd had logged for months
            grown.write("old line\n" * (MIB // 9 + 1))
        with TaggedLoad(stack.profile.server.listen.port) as load:
            wait_for(lambda: len(backups(access)) >= 3 and len(backups(wsgi)) >= 3,
                     MAX_SECONDS, "three rotations of both logs")  # fmt: skip
        assert not load.failures, load.failures[:10]
        for log, pattern in ((access, ACCESS_LINE), (wsgi, WSGI_LINE)):
            assert_each_once(partial(lines_on_disk, log), pattern, load.sent, log.name)
        # A watcher's log is rotated before the line that would take it past the limit;
        # NGiNX's once a second, when it has passed it.
        assert all(MIB - 2 * PAD < p.stat().st_size <= MIB for p in backups(wsgi))
        assert all(p.stat().st_size >= MIB for p in backups(access))
        # circusd's handler went on in a new circusd.log after the plugin renamed the old one.
        assert backups(circusd_log)[-1].read_text().endswith("old line\n")
        assert "reopens its logs" in circusd_log.read_text()
        assert "old line" not in circusd_log.read_text()


def wsgi_log_lines(stack: Stack) -> list[str]:
    return lines_on_disk(stack.log_dir / "wsgi.log")


def test_a_reload_that_changes_the_limits_restarts_nothing(short_tmp: Path) -> None:
    with up(site(short_tmp), keep=5, max_mb=0) as stack:
        wsgi = stack.log_dir / "wsgi.log"
        pids = {name: call(stack, "list", name=name)["pids"] for name in stack.watchers}
        with TaggedLoad(stack.profile.server.listen.port) as load:
            wait_for(lambda: wsgi.stat().st_size > 2 * MIB, MAX_SECONDS, "a 2 MiB log")
            assert not backups(wsgi)  # logs.max_mb = 0: never rotated
            reloaded = stackctl("reload", "--set", "logs.max_mb=1", cwd=stack.stack_dir)
            wait_for(lambda: len(backups(wsgi)) >= 2, MAX_SECONDS, "rotations at the new size")
        assert "nothing restarted" in reloaded.stdout
        assert {name: call(stack, "list", name=name)["pids"] for name in stack.watchers} == pids
        assert not load.failures, load.failures[:10]
        assert_each_once(partial(wsgi_log_lines, stack), WSGI_LINE, load.sent, "wsgi.log")


@contextmanager
def following(stack: Stack, log: str, out: Path) -> Iterator[Path]:
    with out.open("w") as sink:
        follower = subprocess.Popen(
            [sys.executable, "-m", "stackctl", "logs", "-f", "-n", "0", log],
            cwd=stack.stack_dir, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield out
        finally:
            follower.terminate()
            follower.wait(timeout=10)


def test_logs_follow_goes_on_across_rotations_without_a_line_twice_or_skipped(
    short_tmp: Path,
) -> None:
    with up(site(short_tmp), keep=1) as stack:
        port = stack.profile.server.listen.port
        with (
            following(stack, "nginx-access", short_tmp / "access.out") as access_out,
            following(stack, "wsgi", short_tmp / "wsgi.out") as wsgi_out,
        ):

            def both_follow() -> bool:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                try:
                    conn.request("GET", "/ready")
                    conn.getresponse().read()
                finally:
                    conn.close()
                return all("/ready" in out.read_text() for out in (access_out, wsgi_out))

            wait_for(both_follow, 30, "the followers to start")
            with TaggedLoad(port) as load:
                wait_for(lambda: load.sent >= 3000, MAX_SECONDS, "3000 requests")
            assert not load.failures, load.failures[:10]
            for out, pattern in ((access_out, ACCESS_LINE), (wsgi_out, WSGI_LINE)):
                assert_each_once(partial(lines_of, out), pattern, load.sent, out.name)
        for log, pattern in ((stack.nginx_access_log, ACCESS_LINE),
                             (stack.log_dir / "wsgi.log", WSGI_LINE)):  # fmt: skip
            # logs.keep = 1: the followers saw lines that the disk no longer has.
            assert len(backups(log)) == 1
            on_disk = numbers_in(lines_on_disk(log), pattern)
            assert max(on_disk.values()) == 1 and len(on_disk) < load.sent
