"""The dev code reload's decisions: which files changed, and whether they may be loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from stackctl.autoreload import changed_sources, compiles


def test_a_batch_of_changes_names_each_file_once_in_order(tmp_path: Path) -> None:
    batch = {("modified", str(tmp_path / "b.py")), ("added", str(tmp_path / "a.py")),
             ("deleted", str(tmp_path / "b.py"))}  # fmt: skip
    assert changed_sources(batch) == [tmp_path / "a.py", tmp_path / "b.py"]


def test_a_file_with_a_typo_is_reported_and_waited_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("ANSWER = 1\n")
    bad.write_text("def half_typed(:\n")
    assert compiles([good, tmp_path / "deleted.py"])
    assert not compiles([good, bad])
    assert f"not reloading, {bad} does not compile" in capsys.readouterr().err
