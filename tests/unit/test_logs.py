"""Bounded logs on real files: the watchers' streams, the rotation of NGiNX's and circusd's
logs, and the follower of `stackctl logs -f`."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from circus.process import Process
from circus.stream import FileStream
from circus.stream.redirector import Redirector
from tornado.ioloop import IOLoop

from stackctl import logfile
from stackctl.flapping import last_crash
from stackctl.follow import DRAIN_SECONDS, Follower, last_lines
from stackctl.hooks import flush_output_before_reap
from stackctl.logfile import (
    LIMITS_FILE,
    MIB,
    Limits,
    LogFile,
    NoFollowWatchedFileHandler,
    backups,
    limits_json,
    no_follow_handlers,
    shift,
)
from stackctl.logrotate import HELD_LIMIT, RESIGNAL_SECONDS, Rotator
from stackctl.logstream import LogStream, QuerylessLogStream
from tests.unit.test_render import circus_ini, files, make_stack


def stream(log: Path, max_bytes: int, keep: int) -> LogStream:
    """A stream as circus.ini makes it: its limits in the rendered logs.json."""
    limits = log.parent / LIMITS_FILE
    limits.write_text(limits_json(max_bytes, keep))
    return LogStream(str(log), limits=str(limits))


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def numbered(pid: int, count: int, width: int = 30) -> bytes:
    return b"".join(f"{pid}-{n}-".encode().ljust(width, b"x") + b"\n" for n in range(count))


def all_lines(log: Path) -> list[bytes]:
    found = []
    for path in [*reversed(backups(log)), log]:
        data = path.read_bytes()
        assert data.endswith(b"\n"), f"{path} ends inside a line"
        found += data.splitlines()
    return found


def feed(stream: object, pieces: dict[tuple[int, str], list[bytes]]) -> None:
    """The pieces of several pipes, one after the other as Circus's reads would give them."""
    queues = {source: list(chunks) for source, chunks in pieces.items()}
    while any(queues.values()):
        for (pid, name), queue in queues.items():
            if queue:
                stream({"data": queue.pop(0), "pid": pid, "name": name})  # type: ignore[operator]


def test_lines_of_two_processes_cut_by_the_pipe_reads_stay_whole_across_rotations(
    tmp_path: Path,
) -> None:
    log = tmp_path / "wsgi.log"
    out, err = stream(log, 1000, 100), stream(log, 1000, 100)
    try:
        a, b = numbered(1, 200), numbered(2, 200)
        # 7-byte pieces: every line is cut; stdout of 1 and stderr of 2 alternate.
        feed(lambda d: (out if d["name"] == "stdout" else err)(d),
             {(1, "stdout"): chunks(a, 7), (2, "stderr"): chunks(b, 7)})  # fmt: skip
    finally:
        out.close()
        err.close()
    lines = all_lines(log)
    assert sorted(lines) == sorted(a.splitlines() + b.splitlines())
    assert len(backups(log)) >= 10
    assert all(p.stat().st_size <= 1000 for p in [log, *backups(log)])


def test_circus_own_file_stream_cuts_lines_and_loses_them(tmp_path: Path) -> None:
    """Why stackctl has its own stream: the same feed through Circus's FileStream."""
    log = tmp_path / "wsgi.log"
    out = FileStream(str(log), max_bytes=1000, backup_count=100)
    err = FileStream(str(log), max_bytes=1000, backup_count=100)
    a, b = numbered(1, 200), numbered(2, 200)
    feed(lambda d: (out if d["name"] == "stdout" else err)(d),
         {(1, "stdout"): chunks(a, 7), (2, "stderr"): chunks(b, 7)})  # fmt: skip
    out.close()
    err.close()
    kept = b"".join(p.read_bytes() for p in [*reversed(backups(log)), log]).splitlines()
    assert sorted(kept) != sorted(a.splitlines() + b.splitlines())


def test_only_keep_rotated_files_remain_and_they_are_the_newest(tmp_path: Path) -> None:
    log = tmp_path / "ws.log"
    ws = stream(log, 100, 3)
    for n in range(100):
        ws({"data": f"line {n:03}\n".encode(), "pid": 1, "name": "stdout"})
    ws.close()
    assert [p.name for p in backups(log)] == ["ws.log.1", "ws.log.2", "ws.log.3"]
    assert not (tmp_path / "ws.log.4").exists()
    lines = all_lines(log)
    assert lines == [f"line {n:03}".encode() for n in range(100 - len(lines), 100)]


def test_a_lower_keep_deletes_the_files_past_it(tmp_path: Path) -> None:
    log = tmp_path / "ws.log"
    for n in range(1, 7):
        (tmp_path / f"ws.log.{n}").write_text(f"{n}\n")
    log.write_text("now\n")
    shift(log, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws.log.1", "ws.log.2"]
    assert (tmp_path / "ws.log.1").read_text() == "now\n"


def test_a_line_longer_than_the_limit_gets_a_file_of_its_own(tmp_path: Path) -> None:
    log = tmp_path / "ws.log"
    ws = stream(log, 100, 5)
    for data in (b"short\n", b"L" * 250 + b"\n", b"after\n"):
        ws({"data": data, "pid": 1, "name": "stdout"})
    ws.close()
    assert [p.read_bytes() for p in [*reversed(backups(log)), log]] == [
        b"short\n", b"L" * 250 + b"\n", b"after\n"
    ]  # fmt: skip


def test_a_planted_link_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "shadow"
    target.write_text("secret\n")
    (tmp_path / "wsgi.log").symlink_to(target)
    with pytest.raises(OSError):
        LogStream(str(tmp_path / "wsgi.log"))
    assert target.read_text() == "secret\n"


def test_a_query_cut_by_a_pipe_read_is_still_removed(tmp_path: Path) -> None:
    nginx = QuerylessLogStream(str(tmp_path / "nginx.log"))
    for piece in (b'request: "GET /ws/news?tok', b'en=s3cret HTTP/1.1"\n'):
        nginx({"data": piece, "pid": 1, "name": "stderr"})
    nginx.close()
    assert (tmp_path / "nginx.log").read_text() == (
        'request: "GET /ws/news?[query removed] HTTP/1.1"\n'
    )


def test_an_unfinished_line_waits_then_is_written_whole(tmp_path: Path) -> None:
    now = [0.0]
    log = LogFile(tmp_path / "ws.log", clock=lambda: now[0])
    log.write(b"Starting", (1, "stdout"))
    assert (tmp_path / "ws.log").read_bytes() == b""
    now[0] = 10.0
    log.write(b"other\n", (2, "stdout"))
    log.close()
    assert (tmp_path / "ws.log").read_bytes() == b"Starting\nother\n"


def test_a_dead_process_last_line_without_newline_reaches_the_log(tmp_path: Path) -> None:
    loop = IOLoop()
    log = tmp_path / "wsgi.log"
    out, err = LogStream(str(log)), LogStream(str(log))
    redirector = Redirector(out, err, loop=loop)
    script = "import sys; sys.stdout.write('last words')"
    process = Process("test", 1, sys.executable, args=["-c", script])
    redirector.add_redirections(process)
    redirector.start()
    process.wait(timeout=10)
    watcher = SimpleNamespace(stream_redirector=redirector, processes={process.pid: process},
                              stdout_stream=out, stderr_stream=err)  # fmt: skip
    try:
        assert flush_output_before_reap(watcher, None, "before_reap", process.pid)
        assert log.read_bytes() == b"last words\n"
    finally:
        process.stop()
        loop.close()
        out.close()
        err.close()


def test_streams_of_one_log_share_one_file_until_the_last_closes(tmp_path: Path) -> None:
    first, second = LogStream(str(tmp_path / "a.log")), LogStream(str(tmp_path / "a.log"))
    assert first.log is second.log
    first.close()
    second({"data": b"still open\n", "pid": 1, "name": "stdout"})
    second.close()
    assert str(tmp_path / "a.log") not in logfile._OPEN
    assert (tmp_path / "a.log").read_bytes() == b"still open\n"


# --- rotation of the logs that NGiNX and circusd write themselves ----------------------------


def rotator(tmp_path: Path, sent: list[tuple[int, int]], master: int | None) -> Rotator:
    return Rotator(
        limits=Limits(None, max_bytes=100, keep=1),
        reopened_by_itself=[tmp_path / "circusd.log"],
        reopened_on_signal=[tmp_path / "nginx-access.log"],
        master=lambda: master, send=lambda pid, sig: sent.append((pid, sig)),
    )  # fmt: skip


def test_a_big_log_is_renamed_and_nginx_told_to_reopen(tmp_path: Path) -> None:
    (tmp_path / "nginx-access.log").write_text("x" * 100)
    (tmp_path / "circusd.log").write_text("y" * 99)
    sent: list[tuple[int, int]] = []
    rotator(tmp_path, sent, master=4242).check()
    assert sent == [(4242, signal.SIGUSR1)]
    assert (tmp_path / "nginx-access.log.1").read_text() == "x" * 100
    assert not (tmp_path / "nginx-access.log").exists()  # NGiNX creates it when it reopens
    assert (tmp_path / "circusd.log").read_text() == "y" * 99  # not yet at the limit


def test_no_second_rotation_while_nginx_still_writes_to_the_first(tmp_path: Path) -> None:
    access = tmp_path / "nginx-access.log"
    access.write_text("x" * 100)
    sent: list[tuple[int, int]] = []
    # This test's process plays NGiNX: it holds the file that gets renamed.
    rotate = rotator(tmp_path, sent, master=os.getpid())
    held = os.open(access, os.O_WRONLY | os.O_APPEND)
    try:
        rotate.check()
        access.write_text("z" * 100)
        rotate.check()  # .1 is still written to: deleting it now would lose lines
        assert (tmp_path / "nginx-access.log.1").read_text() == "x" * 100
        assert access.read_text() == "z" * 100
    finally:
        os.close(held)
    rotate.check()
    assert (tmp_path / "nginx-access.log.1").read_text() == "z" * 100
    assert len(sent) == 2


def test_circusd_log_is_renamed_for_its_handler_to_reopen(tmp_path: Path) -> None:
    (tmp_path / "circusd.log").write_text("y" * 150)
    sent: list[tuple[int, int]] = []
    rotator(tmp_path, sent, master=None).check()
    assert (tmp_path / "circusd.log.1").read_text() == "y" * 150
    assert sent == []


# --- stackctl logs -f -----------------------------------------------------------------------


def test_follow_reads_every_line_once_across_rotations(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "wsgi.log"
    log = LogFile(path, max_bytes=200, keep=10)
    follower = Follower(path, clock=lambda: now[0])
    seen = follower.tail(5)
    try:
        for n in range(300):
            log.write(f"line {n:03}\n".encode(), (1, "stdout"))
            if n % 7 == 0:  # several rotations between some polls
                seen += follower.poll()
        log.rotate()
        seen += follower.poll()
        # NGiNX's workers may write a last line to the renamed file after the reopen.
        with open(backups(path)[0], "ab") as late:
            late.write(b"late\n")
        seen += follower.poll()
        now[0] += DRAIN_SECONDS + 1
        seen += follower.poll()
        assert not follower.draining
    finally:
        follower.close()
        log.close()
    assert sorted(seen) == sorted([f"line {n:03}".encode() for n in range(300)] + [b"late"])


def test_follow_shows_a_line_once_complete_and_survives_truncation(tmp_path: Path) -> None:
    path = tmp_path / "ws.log"
    path.write_bytes(b"one\ntwo\nthr")
    follower = Follower(path)
    try:
        assert follower.tail(1) == [b"two"]
        assert follower.poll() == []
        with path.open("ab") as f:
            f.write(b"ee\n")
        assert follower.poll() == [b"three"]
        path.write_bytes(b"new\n")  # truncated in place (copytruncate)
        assert follower.poll() == [b"new"]
    finally:
        follower.close()


def test_new_limits_are_taken_from_the_rendered_file_without_a_new_stream(tmp_path: Path) -> None:
    log = tmp_path / "ws.log"
    now = [0.0]
    ws = stream(log, 0, 1)
    ws.log.clock = lambda: now[0]
    for _ in range(20):
        ws({"data": b"x" * 9 + b"\n", "pid": 1, "name": "stdout"})
    assert not backups(log)  # 0: never rotated
    (tmp_path / LIMITS_FILE).write_text(limits_json(50, 2))  # what a reload renders
    now[0] += 5
    ws({"data": b"y" * 9 + b"\n", "pid": 1, "name": "stdout"})
    ws.close()
    assert len(backups(log)) == 1 and log.read_bytes() == b"y" * 9 + b"\n"


def test_circusd_log_handler_reopens_after_rotation_but_never_through_a_link(
    tmp_path: Path,
) -> None:
    log = tmp_path / "circusd.log"
    logger = logging.getLogger("test_logs.circusd")
    logger.propagate = False
    logger.handlers = [logging.handlers.WatchedFileHandler(log)]  # what Circus sets up
    no_follow_handlers(logger)
    try:
        assert isinstance(logger.handlers[0], NoFollowWatchedFileHandler)
        logger.warning("before")
        shift(log, 1)
        logger.warning("after")
        assert (log.read_text(), backups(log)[0].read_text()) == ("after\n", "before\n")
        shift(log, 1)
        target = tmp_path / "shadow"
        target.write_text("secret\n")
        log.symlink_to(target)  # planted where the handler reopens
        logging.raiseExceptions, saved = False, logging.raiseExceptions
        try:
            logger.warning("through the link?")
        finally:
            logging.raiseExceptions = saved
        assert target.read_text() == "secret\n"
    finally:
        for handler in logger.handlers:
            handler.close()
        logger.handlers = []


def test_a_crash_just_before_a_rotation_is_still_found(tmp_path: Path) -> None:
    log = tmp_path / "wsgi.log"
    traceback = ["Traceback (most recent call last):", '  File "app.py"', "RuntimeError: boom"]
    (tmp_path / "wsgi.log.1").write_text("\n".join(["banner"] * 50 + traceback) + "\n")
    log.write_text("banner\nbanner\n")
    assert last_crash(log).splitlines() == [*traceback, "banner", "banner"]
    assert last_lines(log, 4) == [*traceback[1:], "banner", "banner"]


def test_circusd_is_not_asked_for_nginx_while_no_log_is_due(tmp_path: Path) -> None:
    (tmp_path / "nginx-access.log").write_text("x" * 99)
    asked: list[str] = []

    def master() -> int | None:
        asked.append("list nginx")
        return None

    rotate = Rotator(Limits(None, max_bytes=100, keep=1), reopened_by_itself=[],
                     reopened_on_signal=[tmp_path / "nginx-access.log"], master=master)  # fmt: skip
    rotate.check()
    assert asked == []


def test_a_stream_closed_when_its_watcher_stops_writes_again_when_it_starts(
    tmp_path: Path,
) -> None:
    """Circus closes a watcher's streams at its stop and opens the same ones at its start."""
    log = tmp_path / "wsgi.log"
    out = stream(log, 100, 2)
    out({"data": b"before the stop\n", "pid": 1, "name": "stdout"})
    out.close()
    out.close()  # Circus may close twice (a stop, then a reload of the stream)
    out.open()
    out({"data": b"after the start\n", "pid": 2, "name": "stdout"})
    out.close()
    assert log.read_bytes() == b"before the stop\nafter the start\n"


def test_a_renamed_log_held_too_long_is_signalled_again_then_let_go(tmp_path: Path) -> None:
    access = tmp_path / "nginx-access.log"
    access.write_text("x" * 100)
    sent: list[tuple[int, int]] = []
    now = [0.0]
    rotate = rotator(tmp_path, sent, master=os.getpid())
    rotate.clock = lambda: now[0]
    held = os.open(access, os.O_WRONLY | os.O_APPEND)  # a worker that never reopens
    try:
        rotate.check()
        access.write_text("z" * 100)
        now[0] = RESIGNAL_SECONDS + 1
        rotate.check()
        assert len(sent) == 2 and (tmp_path / "nginx-access.log.1").read_text() == "x" * 100
        now[0] = HELD_LIMIT + 1
        rotate.check()  # the log must not grow without end behind a stuck worker
        assert (tmp_path / "nginx-access.log.1").read_text() == "z" * 100
    finally:
        os.close(held)


def test_every_watcher_writes_through_stackctl_streams_with_the_rendered_limits(
    tmp_path: Path,
) -> None:
    stack = make_stack(tmp_path, "[wsgi]\nautoreload = true\n[logs]\nmax_mb = 7\nkeep = 2\n")
    rendered = files(stack)
    ini = circus_ini(stack)
    limits = str(stack.run_dir / LIMITS_FILE)
    watchers = [s for s in ini.sections() if s.startswith("watcher:")]
    assert {"watcher:wsgi", "watcher:ws", "watcher:nginx", "watcher:autoreload"} <= set(watchers)
    for section in watchers:
        for pipe in ("stdout_stream", "stderr_stream"):
            assert ini[section][f"{pipe}.class"].startswith("stackctl.logstream."), section
            assert ini[section][f"{pipe}.limits"] == limits
    assert ini["plugin:logrotate"]["limits"] == limits
    assert ini["plugin:logrotate"]["nginx_access_log"] == str(stack.nginx_access_log)
    assert json.loads(rendered[LIMITS_FILE]) == {"max_bytes": 7 * MIB, "keep": 2}
