"""Stopping a watcher whose processes keep dying young, as PM2 does (``min_uptime``,
``max_restarts``), instead of restarting it forever.

Circus's own flapping plugin counts every exit, so that a few quick graceful reloads, or
workers recycled after ``max_requests``, would look like a crash loop. Here only an
*unstable* exit counts: a uWSGI worker that exits before it marked itself ready
(:mod:`stackctl.readiness`), or any other process that exits within ``min_uptime`` seconds
of its start; a process Circus was told to stop is never one. After ``max_restarts``
unstable exits in a row the watcher is stopped, and the reason is written to
``<run_dir>/failed/<watcher>``, for ``stackctl up`` and ``stackctl status`` to show with
the end of the watcher's log.
"""

from __future__ import annotations

import ctypes
import re
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from circus.plugins import CircusPlugin

from stackctl.follow import last_lines
from stackctl.readiness import ready_mark, reload_under_way
from stackctl.watchers import WATCHERS

FAILED_DIR = "failed"
PR_SET_PDEATHSIG = 1
CONFLICT_RETRIES = 100


class RestartJudge:
    """Counts unstable exits per watcher; says when one must be stopped."""

    def __init__(self, min_uptime: float, max_restarts: int,
                 was_ready: Callable[[str, int], bool],
                 reloading: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
        self.min_uptime = min_uptime
        self.max_restarts = max_restarts
        self.was_ready = was_ready
        self.reloading = reloading
        self.started: dict[int, float] = {}
        self.stopping: set[int] = set()
        self.unstable: dict[str, int] = defaultdict(int)

    def spawned(self, pid: int, at: float) -> None:
        self.started[pid] = at

    def stopped(self, pid: int) -> None:
        """Circus sent the process its stop signal: its exit, however early, is no crash."""
        self.stopping.add(pid)

    def exited(self, watcher: str, pid: int, at: float) -> bool:
        """Record an exit; True when the watcher has now failed ``max_restarts`` times in a row."""
        started = self.started.pop(pid, None)
        if pid in self.stopping:
            # Says nothing of the watcher's health either way: the count stays as it is.
            self.stopping.discard(pid)
            return False
        if watcher == "wsgi" and self.reloading():
            return False  # the reload (stackctl.circusd) judges its new workers
        if watcher == "wsgi":
            unstable = not self.was_ready(watcher, pid)
        else:
            unstable = started is not None and at - started < self.min_uptime
        self.unstable[watcher] = self.unstable[watcher] + 1 if unstable else 0
        if self.unstable[watcher] >= self.max_restarts:
            self.unstable[watcher] = 0
            return True
        return False


def failure_note(run_dir: Path, watcher: str) -> Path:
    return run_dir / FAILED_DIR / watcher


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(last_lines(path, lines))
    except OSError:
        return f"(no log at {path})"


def last_crash(path: Path, lines: int = 15, search: int = 400) -> str:
    """The last Python traceback near the end of a log, else the log's last lines.

    When a crash-looping watcher is stopped, Circus has often started the next process
    already: the end of the log is its start-up banner, not the error that matters.
    """
    try:
        recent = last_lines(path, search)
    except OSError:
        return f"(no log at {path})"
    starts = [i for i, line in enumerate(recent) if line.startswith("Traceback (most recent")]
    if not starts:
        return "\n".join(recent[-lines:])
    # A process stopped while circusd was still reading its pipe leaves a traceback without
    # its last line, the exception: show the last one that has it.
    for start in reversed(starts):
        own, end = traceback_at(recent, start)
        if end is not None:
            return "\n".join([*own, *recent[end + 1 :]][: 2 * lines])
    return "\n".join(recent[starts[-1] :][: 2 * lines])


def traceback_at(recent: list[str], start: int) -> tuple[list[str], int | None]:
    """The traceback that begins at ``recent[start]``, and where its exception line is (None
    if it has none). Workers starting together write into one log at once: the lines of
    another's start-up banner may come between a traceback's own, which are indented (the
    frames and their code) up to the exception line, which is not."""
    own = [recent[start]]
    for index in range(start + 1, len(recent)):
        line = recent[index]
        if EXCEPTION_LINE.match(line):
            return [*own, line], index
        if line.startswith((" ", "\t")):
            own.append(line)
    return own, None


EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


def has_exception(traceback: list[str]) -> bool:
    return any(EXCEPTION_LINE.match(line) for line in traceback[1:])


class Flapping(CircusPlugin):
    """The Circus plugin around :class:`RestartJudge`."""

    name = "stackctl_flapping"

    def __init__(self, *args: Any, **config: Any) -> None:
        super().__init__(*args, **config)
        self.run_dir = Path(config["run_dir"])
        self.log_dir = Path(config["log_dir"])
        self.judged = {*WATCHERS, *str(config.get("also", "")).split(",")}
        self.judge = RestartJudge(
            float(config.get("min_uptime", 2)),
            int(config.get("max_restarts", 5)),
            lambda _watcher, pid: ready_mark(self.run_dir, pid).exists(),
            lambda: reload_under_way(self.run_dir),
        )

    def handle_init(self) -> None:
        # Like every watcher, the plugin must not outlive a killed circusd.
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def handle_recv(self, data: Any) -> None:
        watcher, action, raw = self.split_data(data)
        if watcher not in self.judged or action not in ("spawn", "kill", "reap"):
            return
        message = self.load_message(raw)
        pid, at = int(message["process_pid"]), float(message["time"])
        if action == "spawn":
            self.judge.spawned(pid, at)
        elif action == "kill":
            self.judge.stopped(pid)
        elif self.judge.exited(watcher, pid, at):
            self.stop(watcher)

    def stop(self, watcher: str) -> None:
        note = failure_note(self.run_dir, watcher)
        note.parent.mkdir(exist_ok=True)
        # Only the reason: whoever reports it reads the log then, when circusd has written
        # out the last crash's output (it may not have when this reap arrives).
        note.write_text(f"stopped after {self.judge.max_restarts} crashes in a row at start\n")
        answer = self.call("stop", name=watcher)
        for _ in range(CONFLICT_RETRIES):
            # circusd refuses commands while it runs another (a crash loop keeps it busy).
            if answer.get("status") == "ok" or "already running" not in answer.get("reason", ""):
                break
            time.sleep(0.1)
            answer = self.call("stop", name=watcher)
        if answer.get("status") != "ok":
            with note.open("a") as f:
                f.write(f"(and Circus refused to stop it: {answer.get('reason', answer)})\n")
