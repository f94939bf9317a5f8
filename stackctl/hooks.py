"""Circus hooks, run inside circusd (it imports them from its own Python path)."""

from __future__ import annotations

import logging
import os
import signal
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("stackctl.hooks")


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
    for proc in psutil.process_iter(["name"]):
        with suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == old_master and (proc.info["name"] or "").startswith("nginx"):
                log.warning("killing NGiNX worker %d orphaned by master %d", proc.pid, old_master)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=5)
    return True
