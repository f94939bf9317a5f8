"""Finding and stopping every process of one stack, orphans included, and nothing else.

A process belongs to the stack whose run directory is ``run_dir`` when:

- it is the circusd of ``circusd.pid`` and carries the stack's mark, or a descendant of it;
- it carries the mark: ``STACKCTL_RUN_DIR`` in its environment *equal* to ``run_dir``
  (circusd is started with it and hands it down to every watcher, so the watchers of a
  circusd that was killed are still found);
- it descends from one of those (a program the app started, which may have cleared its
  environment);
- it is in the process group of the NGiNX master named in ``nginx.pid`` and runs in
  ``run_dir``: NGiNX overwrites its environment with its process title, and the workers of a
  killed master live on in its group (Circus starts each watcher in a session of its own).

Nothing is matched by a substring of a path, a working directory alone or a shared session:
a ``tail -f`` of a rendered config, a shell in the run directory and another stack whose run
directory merely starts with the same characters are none of the stack's business.
"""

from __future__ import annotations

import os
import time
from contextlib import suppress
from pathlib import Path

import psutil

MARKER = "STACKCTL_RUN_DIR"
CIRCUSD_PIDFILE = "circusd.pid"
NGINX_PIDFILE = "nginx.pid"
POLL_INTERVAL = 0.05


def is_marked(proc: psutil.Process, run_dir: str) -> bool:
    """The process carries ``STACKCTL_RUN_DIR=<run_dir>`` exactly."""
    try:
        return proc.environ().get(MARKER) == run_dir
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def circusd(run_dir: Path) -> psutil.Process | None:
    """The stack's circusd: the pid file's process, if it carries the stack's mark (a pid file
    left by a crash may name a pid that another program has since been given)."""
    pid = pid_in(run_dir / CIRCUSD_PIDFILE)
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return None
    return proc if is_marked(proc, str(run_dir)) else None


def nginx_group(run_dir: Path, everyone: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of the NGiNX master named in ``nginx.pid``, its orphaned workers included.

    A process group id is not given to a new process while a member of the group lives, so
    members of the group are the old master's; their working directory (Circus starts NGiNX
    in the run directory) rules out a pid file so old that the id was reused since.
    """
    master = pid_in(run_dir / NGINX_PIDFILE)
    if master is None:
        return []
    found = []
    for proc in everyone:
        with suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == master and proc.cwd() == str(run_dir):
                found.append(proc)
    return found


def descendants(procs: list[psutil.Process]) -> list[psutil.Process]:
    found = []
    for proc in procs:
        with suppress(psutil.Error):
            found += proc.children(recursive=True)
    return found


def find(run_dir: Path) -> list[psutil.Process]:
    """Every live process that belongs to the stack whose run directory is ``run_dir``."""
    everyone = [p for p in psutil.process_iter() if p.pid != os.getpid()]
    roots = [p for p in everyone if is_marked(p, str(run_dir))]
    head = circusd(run_dir)
    roots += [head] if head else []
    roots += nginx_group(run_dir, everyone)
    members = {p.pid: p for p in roots + descendants(roots)}
    members.pop(os.getpid(), None)
    return list(members.values())


def kill_all(procs: list[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL what is still alive after ``timeout``; returns the survivors."""
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            proc.terminate()
    alive = wait_for_exit(procs, timeout)
    for proc in alive:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    return wait_for_exit(alive, timeout)


def wait_for_exit(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        procs = [p for p in procs if not exited(p)]
        if not procs or time.monotonic() > deadline:
            return procs
        time.sleep(POLL_INTERVAL)


def exited(proc: psutil.Process) -> bool:
    """Exited, even if not reaped yet: an orphan's parent is init, which may take seconds to
    reap it (psutil's own wait waits for that)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
