"""Reloads that lose nothing.

The uWSGI pool is replaced in three steps: a *canary* (one worker on the new config, outside
Circus, on a scratch socket) must load the app, or the reload is refused before anything is
touched; then Circus adds the new workers (``incr``) and stackctl waits until each has marked
itself ready (:mod:`stackctl.wsgi`); only then does Circus retire as many of the oldest
(``decr``), each stopped by :mod:`stackctl.graceful`, which lets a worker finish its request
before it exits. The listening socket stays open in circusd throughout, so nothing is refused.
``sequential`` does the same one worker at a time.
"""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
import textwrap
import time
from contextlib import suppress
from pathlib import Path

import psutil

from stackctl import generation
from stackctl.errors import StackError
from stackctl.flapping import failure_note, has_exception, last_crash
from stackctl.hooks import TAKE_BACK_SIGNAL
from stackctl.readiness import READY_DIR, ready_mark, reloading
from stackctl.render import File
from stackctl.render.nginx import INCLUDES as NGINX_INCLUDES
from stackctl.stack import Stack
from stackctl.supervisor import call, log_tail

POLL = 0.05
CANARY_NICENESS = 10


def patience(stack: Stack) -> float:
    """How long a reload step may take: a worker's graceful stop, and then some to start."""
    return float(stack.profile.wsgi.graceful_timeout + 30)


def wsgi_pids(stack: Stack) -> set[int]:
    return {int(pid) for pid in call(stack, "list", name="wsgi")["pids"]}


def forget_dead_marks(stack: Stack) -> None:
    directory = stack.run_dir / READY_DIR
    for mark in directory.glob("*") if directory.is_dir() else ():
        if not Path(f"/proc/{mark.name}").exists():
            mark.unlink(missing_ok=True)


def canary(stack: Stack, timeout: float, ini: Path | None = None) -> None:
    """Start one worker on ``ini`` (the running uWSGI config unless told), outside Circus;
    refuse the reload if it cannot serve."""
    socket_path = stack.run_dir / "canary.sock"
    output = stack.log_dir / "wsgi-canary.log"
    with output.open("wb") as out:
        args = [
            stack.programs.uwsgi,
            "--ini",
            str(ini or stack.uwsgi_ini),
            "--uwsgi-socket",
            str(socket_path),
        ]
        proc = subprocess.Popen(
            args, cwd=stack.stack_dir, env={**os.environ, **stack.worker_env()},
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            # A trial run: it must not take CPU from the workers serving meanwhile.
            preexec_fn=lambda: os.nice(CANARY_NICENESS),
        )  # fmt: skip
    mark = ready_mark(stack.run_dir, proc.pid)
    try:
        deadline = time.monotonic() + timeout
        while not mark.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(output.read_text(errors="replace").splitlines()[-15:])
                raise StackError(
                    "the new uWSGI workers cannot start, so the reload was refused; the running "
                    f"workers keep serving. A test worker said:\n{tail}"
                )
            time.sleep(POLL)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        mark.unlink(missing_ok=True)
        socket_path.unlink(missing_ok=True)


def wait_ready(stack: Stack, before: set[int], count: int, timeout: float) -> None:
    """Wait until ``count`` workers that were not in ``before`` have marked themselves ready."""
    deadline = time.monotonic() + timeout
    seen: set[int] = set()
    while time.monotonic() < deadline:
        current = wsgi_pids(stack)
        new = current - before
        seen |= new
        if sum(ready_mark(stack.run_dir, pid).exists() for pid in new) >= count:
            return
        died = {pid for pid in seen - current if not ready_mark(stack.run_dir, pid).exists()}
        if died:
            raise StackError(f"new uWSGI workers {sorted(died)} exited before they were ready")
        time.sleep(POLL)
    ready = sorted(pid for pid in seen if ready_mark(stack.run_dir, pid).exists())
    raise StackError(
        f"new uWSGI workers were not ready within {timeout:.0f} s: Circus started "
        f"{sorted(seen) or 'none'}, of which {ready or 'none'} marked themselves ready. "
        f"The end of circusd's log:\n{log_tail(stack, 'circusd')}"
    )


def youngest(pids: set[int]) -> int | None:
    started = {}
    for pid in pids:
        with suppress(psutil.NoSuchProcess):
            started[pid] = psutil.Process(pid).create_time()
    return max(started, key=started.__getitem__) if started else None


def take_back(stack: Stack, before: set[int], timeout: float) -> None:
    """Stop the workers started after ``before`` were, and keep ``before`` serving."""
    deadline = time.monotonic() + timeout
    while True:
        added = wsgi_pids(stack) - before
        count = int(call(stack, "numprocesses", name="wsgi")["numprocesses"])
        keeper = youngest(before)
        if keeper is None or (not added and count <= len(before)):
            break
        if time.monotonic() > deadline:
            raise StackError(f"the new uWSGI workers {sorted(added)} could not be stopped")
        # stackctl.hooks.take_back_younger_workers, in circusd, does it; asked again, it
        # takes back only what Circus started since.
        call(stack, "signal", name="wsgi", pid=keeper, signum=int(TAKE_BACK_SIGNAL))
        time.sleep(5 * POLL)
    if count < len(before):  # an old worker that exited meanwhile was taken back too
        call(stack, "set", name="wsgi", options={"numprocesses": len(before)}, waiting=True)


def last_words(stack: Stack, wait: float = 2.0) -> str:
    """The traceback of a worker that died starting: circusd writes out what a dead process
    left in its pipe only when it gets to it, so give it a moment."""
    log = stack.log_dir / "wsgi.log"
    deadline = time.monotonic() + wait
    report = last_crash(log)
    while not has_exception(report.splitlines()) and time.monotonic() < deadline:
        time.sleep(POLL)
        report = last_crash(log)
    return textwrap.indent(report, "    ")


def replace_workers(stack: Stack, sequential: bool) -> int:
    """Replace every worker, ``1`` or all at a time; returns how many were replaced."""
    with reloading(stack.run_dir):
        return replace_each(stack, sequential)


def replace_each(stack: Stack, sequential: bool) -> int:
    forget_dead_marks(stack)
    old = wsgi_pids(stack)
    step = 1 if sequential else len(old)
    timeout = patience(stack)
    for done in range(0, len(old), step):
        before = wsgi_pids(stack)
        call(stack, "incr", name="wsgi", nb=step)
        try:
            wait_ready(stack, before, step, timeout)
        except StackError as e:
            take_back(stack, before, timeout)
            mixed = f" ({done} of {len(old)} had been replaced)" if done else ""
            raise StackError(
                f"{e}; the wsgi log says:\n{last_words(stack)}\n"
                f"The reload was undone: the new workers were stopped, and the workers "
                f"that were serving{mixed} kept serving throughout."
            ) from None
        # Circus retires the oldest processes first, each with the watcher's stop signal.
        call(stack, "decr", name="wsgi", nb=step, waiting=True, timeout=timeout)
    return len(old)


def reload_watcher(stack: Stack, watcher: str, sequential: bool) -> str:
    """Reload one watcher's processes; returns what was done."""
    timeout = patience(stack)
    if watcher != "wsgi":
        call(stack, "reload", name=watcher, graceful=True, waiting=True, timeout=timeout)
        return f"reloaded {watcher}"
    # The canary imports the app as a worker would, and shows the traceback if it cannot.
    canary(stack, timeout=timeout)
    if restart_if_stopped(stack, "wsgi"):
        return "wsgi had stopped after crashing; started it again"
    replaced = replace_workers(stack, sequential=sequential)
    return f"reloaded wsgi: {replaced} workers replaced, each once its successor was ready"


def restart_if_stopped(stack: Stack, watcher: str) -> bool:
    """Start a watcher the flapping plugin stopped; True if it had to."""
    # (Asked about one watcher, Circus puts its state where "ok" would be: ask about all.)
    if call(stack, "status")["statuses"].get(watcher) != "stopped":
        return False
    failure_note(stack.run_dir, watcher).unlink(missing_ok=True)
    call(stack, "start", name=watcher, waiting=True)
    return True


def circus_differences(old: str, new: str) -> set[tuple[str, str]]:
    """The (section, key) pairs that differ between two circus.ini texts."""
    parsed = []
    for text in (old, new):
        parser = configparser.RawConfigParser()
        parser.read_string(text)
        parsed.append({(s, k): v for s in parser.sections() for k, v in parser.items(s)})
    before, after = parsed
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def changed_files(stack: Stack, files: list[File]) -> set[str]:
    def current(name: str) -> str | None:
        path = stack.run_dir / name
        return path.read_text() if path.is_file() else None

    return {f.name for f in files if current(f.name) != f.content}


def apply_config(stack: Stack) -> list[str]:
    """Re-render for ``stack`` and apply only what changed; returns what was done.

    The new generation is validated before any file or process is touched, so a bad
    profile or config leaves the running stack exactly as it was.
    """
    files = generation.render_all(stack)
    changed = changed_files(stack, files)
    if not changed:
        return []
    old_circus = stack.circus_ini.read_text()
    timeout = patience(stack)

    def try_new_workers(staged: Path) -> None:
        # Before the swap: a uWSGI config its workers cannot start on must not reach the disk,
        # where Circus would give it to the next worker it respawns.
        if "uwsgi.ini" in changed:
            canary(stack, timeout, ini=staged / stack.uwsgi_ini.name)

    generation.write(stack, files, trial=try_new_workers)
    done = []
    if "circus.ini" in changed:
        differences = circus_differences(old_circus, stack.circus_ini.read_text())
        if differences == {("watcher:wsgi", "numprocesses")}:
            call(stack, "set", name="wsgi", options={"numprocesses": stack.workers}, waiting=True,
                 timeout=timeout)  # fmt: skip
            done.append(f"wsgi now runs {stack.workers} workers")
        else:
            call(stack, "reloadconfig", waiting=True, timeout=timeout)
            done.append(
                "Circus reloaded its config: "
                + ", ".join(sorted(f"{s} {k}" for s, k in differences))
            )
    if changed & {"nginx.conf", *NGINX_INCLUDES}:
        call(stack, "signal", name="nginx", signum=int(signal.SIGHUP))
        done.append("NGiNX reloaded its config (HUP)")
    if "uwsgi.ini" in changed:
        done.append(f"wsgi: {replace_workers(stack, sequential=False)} workers replaced")
    if "redis.conf" in changed:
        call(stack, "reload", name="redis", graceful=True, waiting=True)
        done.append("Redis restarted")
    return done
