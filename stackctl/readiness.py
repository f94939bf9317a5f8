"""Loading the app and marking a uWSGI worker ready, for :mod:`stackctl.wsgi` and reloads.

The mark, a file named after the worker's pid in ``<run_dir>/service/ready/``, tells a reload
(:mod:`stackctl.circusd`, and the canary of ``stackctl reload``) that a new worker has loaded
the app and is about to accept, so that old workers are stopped only once their replacements
can serve.

While circusd replaces workers it holds ``<run_dir>/reloading`` (its pid): the new workers
are the reload's to judge, and to take back if they fail, so the flapping plugin must not
stop the whole pool over them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

APP_VARIABLE = "STACKCTL_WSGI_APP"
SERVICE_DIR = "service"
"""The one directory of the run directory where the app's processes (maybe another user than
the one who started the stack) may write: their marks, Redis's socket and data."""
READY_DIR = "ready"
RELOADING_MARK = "reloading"
STARTUP_SECONDS = 30.0
"""How long new workers may take to get ready, on top of the graceful timeout."""
MTIME_SLACK = 0.05
"""Seconds a mark's time may lag the clock (a file system's timestamp granularity)."""


def load(spec: str) -> Any:
    """``"package.module:callable"`` → the callable (attributes may be dotted)."""
    module_name, _, attribute = spec.partition(":")
    target: Any = importlib.import_module(module_name)
    for name in attribute.split("."):
        target = getattr(target, name)
    return target


def load_or_explain(spec: str) -> None:
    """Load the app as a worker will; if that fails, print the app's part of the traceback
    and the error, then exit with status 1.

    ``stackctl up`` runs this in a separate interpreter before it starts anything. The frames
    of stackctl and of importlib only hide, to the app's author, where the error is.
    """
    import sys
    import traceback

    try:
        load(spec)
    except Exception as e:
        hidden = (
            str(Path(__file__).resolve().parent),
            str(Path(importlib.__file__ or "").parent),
            "<frozen importlib",
        )
        frames = [
            frame
            for frame in traceback.extract_tb(e.__traceback__)
            if not frame.filename.startswith(hidden)
        ]
        if frames:
            sys.stderr.write("Traceback (most recent call last):\n")
            sys.stderr.write("".join(traceback.format_list(frames)))
        sys.stderr.write("".join(traceback.format_exception_only(e)))
        raise SystemExit(1) from None


def startup_timeout(graceful_timeout: float) -> float:
    """How long a reload waits for new workers: an old one's graceful stop, then some."""
    return graceful_timeout + STARTUP_SECONDS


def ready_dir(run_dir: Path) -> Path:
    return run_dir / SERVICE_DIR / READY_DIR


def ready_mark(run_dir: Path, pid: int) -> Path:
    return ready_dir(run_dir) / str(pid)


def marked_since(run_dir: Path, pid: int, started: float) -> bool:
    """``pid`` marked itself ready after ``started`` (a mark left by an earlier process that
    had the same pid does not count)."""
    try:
        return ready_mark(run_dir, pid).stat().st_mtime >= started - MTIME_SLACK
    except OSError:
        return False


def forget_dead_marks(run_dir: Path) -> None:
    """Remove the marks of processes that are gone. circusd (maybe root) does it in a
    directory the service user owns: a link put there in place of the directory must not
    make it delete files elsewhere, so the directory is opened without following one."""
    try:
        directory = os.open(ready_dir(run_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return  # none yet, or not a real directory: no mark of ours to forget
    try:
        for name in os.listdir(directory):
            if name.isdigit() and not Path(f"/proc/{name}").exists():
                with suppress(OSError):  # gone meanwhile, or not a mark
                    os.unlink(name, dir_fd=directory)
    finally:
        os.close(directory)


def mark_ready() -> None:
    run_dir = os.environ.get("STACKCTL_RUN_DIR")
    if run_dir:
        mark = ready_mark(Path(run_dir), os.getpid())
        mark.parent.mkdir(exist_ok=True)
        mark.touch()


@contextmanager
def reloading(run_dir: Path) -> Iterator[None]:
    mark = run_dir / RELOADING_MARK
    mark.write_text(str(os.getpid()))
    try:
        yield
    finally:
        mark.unlink(missing_ok=True)


def reload_under_way(run_dir: Path) -> bool:
    """True while a reload by a circusd that is still alive replaces workers."""
    try:
        pid = int((run_dir / RELOADING_MARK).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False  # no mark, or its reload died without removing it
    return True
