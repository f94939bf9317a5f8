"""Code reload for development: a worker restarts itself when a file of the app changes.

A daemon thread compares the modification times of the modules loaded from the stack
directory. On a change, the worker stops itself gracefully (:mod:`stackctl.graceful`: it
finishes the current request, then exits); Circus starts a fresh one on the new code
while the socket it holds queues the requests. A random pause spreads the workers out, so
the others keep serving meanwhile. A change that does not compile is reported and waited
out: the workers keep the code they have until the file is fixed.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path

from stackctl import graceful

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


def changed(before: dict[Path, float]) -> list[Path]:
    def moved(path: Path, mtime: float) -> bool:
        try:
            return path.stat().st_mtime != mtime
        except OSError:
            return True

    return [path for path, mtime in before.items() if moved(path, mtime)]


def compiles(paths: list[Path]) -> bool:
    """A file saved half-way, or with a typo, must not take the workers down: wait for a fix."""
    for path in paths:
        try:
            compile(path.read_bytes(), str(path), "exec")  # checks only: writes no bytecode
        except (SyntaxError, ValueError, OSError) as e:
            print(f"stackctl: not reloading, {path} does not compile: {e}", file=sys.stderr)
            return False
    return True


def watch(root: Path) -> None:
    baseline = app_files(root)
    while True:
        time.sleep(INTERVAL)
        paths = changed(baseline)
        if not paths:
            continue
        if not compiles(paths):
            baseline.update({p: p.stat().st_mtime for p in paths if p.exists()})
            continue
        time.sleep(random.uniform(0, SPREAD))
        print(f"stackctl: {paths[0]} changed; worker {os.getpid()} restarts", file=sys.stderr)
        graceful.request_stop()
        return


def start(root: Path) -> None:
    threading.Thread(target=watch, args=(root.resolve(),), name="autoreload", daemon=True).start()
