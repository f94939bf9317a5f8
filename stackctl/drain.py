"""Draining: the site keeps serving, but tells load balancers to send no new visitors.

A mark in the run directory says so. NGiNX answers ``GET /_stackctl/health`` with 503 while
it is there (a file test, so no process of the app needs to be asked); ``stackctl drain``
sets it for maintenance, ``stackctl down`` and a stop by signal set it first and wait
``server.drain_seconds`` before stopping anything, and ``stackctl up`` clears it.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

MARK = "draining"


def mark_path(run_dir: Path) -> Path:
    return run_dir / MARK


def start(run_dir: Path) -> None:
    """Set the mark. The run directory is writable by the user running stackctl alone;
    the mark is still created without following a link, as every file stackctl writes."""
    directory = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with suppress(FileExistsError):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(MARK, flags, 0o644, dir_fd=directory))
    finally:
        os.close(directory)


def stop(run_dir: Path) -> None:
    with suppress(FileNotFoundError):
        mark_path(run_dir).unlink()


def under_way(run_dir: Path) -> bool:
    return mark_path(run_dir).exists()
