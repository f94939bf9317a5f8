"""Resolving a profile against the machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stackctl import profile, stack
from stackctl.errors import StackError
from tests.unit.test_render import PROGRAMS


def load(tmp_path: Path, extra: str = "") -> profile.Profile:
    (tmp_path / "stack.toml").write_text('[app]\nwsgi = "hello:application"\n' + extra)
    return profile.load(tmp_path, "dev", [], hostnames=["h"])


def test_auto_workers_is_twice_the_usable_cpus(tmp_path: Path) -> None:
    planned = stack.plan(load(tmp_path), PROGRAMS)
    assert planned.workers == 2 * stack.usable_cpus()
    assert 1 <= stack.usable_cpus() <= len(os.sched_getaffinity(0))


def test_explicit_workers(tmp_path: Path) -> None:
    assert stack.plan(load(tmp_path, "[wsgi]\nworkers = 3\n"), PROGRAMS).workers == 3


def test_paths_are_relative_to_the_stack_dir(tmp_path: Path) -> None:
    planned = stack.plan(load(tmp_path, '[paths]\nrun_dir = "r"\n'), PROGRAMS)
    assert planned.run_dir == tmp_path.resolve() / "r"
    assert planned.static_dir == tmp_path.resolve() / "static"


def test_run_dir_too_long_for_unix_sockets(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"paths.run_dir: .* is too long for unix sockets"):
        stack.plan(load(tmp_path, f'[paths]\nrun_dir = "{"x" * 120}"\n'), PROGRAMS)


def test_missing_program_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(StackError, match=r"no nginx on PATH; install it: apt-get install"):
        stack.find_program("nginx", hint=f"install it: {stack.NGINX_INSTALL_HINT}", also=())


def test_a_ready_mark_left_by_an_earlier_process_with_the_same_pid_does_not_count(
    tmp_path: Path,
) -> None:
    from stackctl.readiness import marked_since, ready_mark

    mark = ready_mark(tmp_path, 4242)
    mark.parent.mkdir(parents=True)
    mark.touch()
    os.utime(mark, (time.time() - 60, time.time() - 60))  # written a minute ago
    assert not marked_since(tmp_path, 4242, started=time.time() - 1)
    mark.touch()
    assert marked_since(tmp_path, 4242, started=time.time() - 1)
    assert not marked_since(tmp_path, 4343, started=0.0)
