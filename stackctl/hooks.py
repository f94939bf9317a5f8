"""Circus hooks, run inside circusd (it imports them from its own Python path)."""

from __future__ import annotations

import logging
import os
import select
import signal
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

from stackctl.cache import CACHE_SOCKET

log = logging.getLogger("stackctl.hooks")
READ = 1  # tornado's IOLoop.READ, the event a Circus stream handler expects


def flush_output_before_reap(watcher: Any, arbiter: Any, hook_name: str, process_pid: int,
                             **_: Any) -> bool:  # fmt: skip
    """Before Circus reaps a dead process: copy what is left in its pipes to the log, then
    take the pipes off circusd's event loop.

    Circus 0.19 closes the pipes of a reaped process without unregistering them when the
    reap comes before the event loop has read their end (a busy machine, a graceful stop).
    The next process to get the same fd number then fails to spawn ("fd added twice"), and
    the watcher stays short of processes for good.
    """
    redirector = watcher.stream_redirector
    process = watcher.processes.get(process_pid)
    if redirector is None or process is None:
        return True
    for fd, (name, owner, pipe) in list(redirector.pipes.items()):
        if owner is not process:
            continue
        handler = redirector.Handler(redirector, name, process, pipe)
        # The process is dead, but a child of it (an NGiNX worker) may still hold the pipe:
        # read only what is there, never wait.
        while fd in redirector.pipes and select.select([fd], [], [], 0)[0]:
            handler(fd, READ)
    redirector.remove_redirections(process)
    for stream in (watcher.stdout_stream, watcher.stderr_stream):
        # A last line without its newline (a crash mid-print) is written out now.
        end_of_process = getattr(stream, "end_of_process", None)
        if end_of_process is not None:
            end_of_process(process_pid)
    return True


def stop_orphaned_nginx_workers(watcher: Any, arbiter: Any, hook_name: str, **_: Any) -> bool:
    """Before NGiNX starts: kill workers left by a master that died without stopping them.

    NGiNX workers do not exit when their master is killed, and they keep the listening port,
    so a new master could not bind it. They are in the dead master's process group (Circus
    starts each watcher in a session of its own), whose id is in the old ``nginx.pid``.
    """
    pid_file = Path(watcher.working_dir) / "nginx.pid"
    try:
        old_master = int(pid_file.read_text())
    except (OSError, ValueError):
        return True
    if psutil.pid_exists(old_master):
        return True  # a running master stops its own workers
    # NGiNX removes its unix socket (stackctl.cache's cache.sock) when it stops, but a dead
    # master leaves it, and binding it again would fail.
    (Path(watcher.working_dir) / CACHE_SOCKET).unlink(missing_ok=True)
    for proc in psutil.process_iter(["name"]):
        with suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == old_master and (proc.info["name"] or "").startswith("nginx"):
                log.warning("killing NGiNX worker %d orphaned by master %d", proc.pid, old_master)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=5)
    return True
