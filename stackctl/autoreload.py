"""Code reload for development: a worker restarts itself when a file of the app changes.

A daemon thread compares the modification times of the modules loaded from the stack
directory. On a change, the worker sends itself SIGHUP, which a master-less uWSGI worker
takes as "finish the current request, then exit"; Circus starts a fresh one on the new code
while the socket it holds queues the requests. A random pause spreads the workers out, so
the others keep serving meanwhile.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

INTERVAL = 1.0
SPREAD = 1.5


def app_files(root: Path) -> dict[Path, float]:
    """Modification times of the loaded modules that live under ``root``."""
    found: dict[Path, float] = {}
    for module in list(sys.modules.values()):
        name = getattr(module, "__file__", None)
        if not name:
            continue
        path = Path(name)
        if path.is_relative_to(root):
            try:
                found[path] = path.stat().st_mtime
            except OSError:
                continue
    return found


def changed(before: dict[Path, float]) -> Path | None:
    for path, mtime in before.items():
        try:
            if path.stat().st_mtime != mtime:
                return path
        except OSError:
            return path
    return None


def watch(root: Path) -> None:
    baseline = app_files(root)
    while True:
        time.sleep(INTERVAL)
        path = changed(baseline)
        if path is not None:
            time.sleep(random.uniform(0, SPREAD))
            print(f"stackctl: {path} changed; worker {os.getpid()} restarts", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGHUP)
            return


def start(root: Path) -> None:
    threading.Thread(target=watch, args=(root.resolve(),), name="autoreload", daemon=True).start()
