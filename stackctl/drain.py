"""Draining: the site keeps serving, but tells load balancers to send no new visitors.

A mark in the run directory says so. NGiNX answers ``GET /_stackctl/health`` with 503 while
it is there (a file test, so no process of the app needs to be asked); ``stackctl drain``
sets it for maintenance, ``stackctl down`` and a stop by signal set it first and wait
``server.drain_seconds`` before stopping anything, and ``stackctl up`` clears it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from stackctl.errors import StackError

MARK = "draining"


def mark_path(run_dir: Path) -> Path:
    return run_dir / MARK


def start(run_dir: Path) -> None:
    """Set the mark. The run directory is writable by the user running stackctl alone;
    the mark is still created without following a link, as every file stackctl writes.
    A link left in its place is replaced: NGiNX follows no link (disable_symlinks), so to
    it the link is no mark, and the drain would be said but not done."""
    directory = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            os.close(os.open(MARK, flags, 0o644, dir_fd=directory))
        except FileExistsError:
            found = os.stat(MARK, dir_fd=directory, follow_symlinks=False).st_mode
            if stat.S_ISREG(found):
                return
            if not stat.S_ISLNK(found):
                raise not_a_file(run_dir) from None
            os.unlink(MARK, dir_fd=directory)
            os.close(os.open(MARK, flags, 0o644, dir_fd=directory))
    finally:
        os.close(directory)


def stop(run_dir: Path) -> None:
    try:
        mark_path(run_dir).unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise not_a_file(run_dir) from None


def under_way(run_dir: Path) -> bool:
    """As NGiNX sees it: a file, not a link to one."""
    try:
        return stat.S_ISREG(os.lstat(mark_path(run_dir)).st_mode)
    except FileNotFoundError:
        return False


def not_a_file(run_dir: Path) -> StackError:
    return StackError(
        f"{mark_path(run_dir)}: not a file (a directory?): stackctl keeps its draining mark "
        "there; remove it, then run the command again"
    )
