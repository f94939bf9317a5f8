"""Finding and stopping every process of one stack, orphans included.

circusd and the watchers it starts carry ``STACKCTL_RUN_DIR=<run dir>`` in their environment.
NGiNX overwrites its environment with its process title, but its master's title names the run
directory, and its workers run in the run directory (Circus starts NGiNX there): that finds
them even when their master has died. Members of a found process's session are found too.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

import psutil

MARKER = "STACKCTL_RUN_DIR"


def _is_marked(proc: psutil.Process, run_dir: str) -> bool:
    try:
        if proc.pid == os.getpid():
            return False
        if run_dir in " ".join(proc.cmdline()) or proc.cwd() == run_dir:
            return True
        return proc.environ().get(MARKER) == run_dir
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def find(run_dir: Path) -> list[psutil.Process]:
    """Every live process that belongs to the stack whose run directory is ``run_dir``."""
    wanted = str(run_dir)
    everyone = list(psutil.process_iter())
    marked = {p.pid: p for p in everyone if _is_marked(p, wanted)}
    leaders = set(marked)
    for proc in everyone:
        try:
            if proc.pid not in marked and os.getsid(proc.pid) in leaders:
                marked[proc.pid] = proc
        except (ProcessLookupError, PermissionError):
            continue
    return list(marked.values())


def kill_all(procs: list[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL what is still alive after ``timeout``; returns the survivors."""
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=timeout)
    return alive
