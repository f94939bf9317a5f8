"""Finding the programs a stack runs: PATH first, then the sbin directories PATH may lack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stackctl.errors import StackError
from stackctl.stack import SBIN_DIRS, find_program


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_a_program_missing_from_path_is_found_in_an_sbin_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    found = executable(tmp_path / "sbin" / "nginx-test-only")
    assert find_program("nginx-test-only", hint="-", also=(str(tmp_path / "sbin"),)) == str(found)


def test_path_comes_before_sbin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = executable(tmp_path / "bin" / "nginx-test-only")
    executable(tmp_path / "sbin" / "nginx-test-only")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert find_program("nginx-test-only", hint="-", also=(str(tmp_path / "sbin"),)) == str(on_path)


def test_a_missing_program_names_where_it_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(StackError) as error:
        find_program("nginx-test-only", hint="install it", also=(str(tmp_path / "sbin"),))
    assert str(error.value) == f"no nginx-test-only on PATH or in {tmp_path / 'sbin'}; install it"


def test_the_sbin_directories_are_the_usual_ones() -> None:
    assert "/usr/sbin" in SBIN_DIRS and all(os.path.isabs(d) for d in SBIN_DIRS)
