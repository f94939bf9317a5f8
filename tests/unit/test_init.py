"""stackctl init: what it takes from a Django project."""

from __future__ import annotations

from pathlib import Path

import pytest

from stackctl.init import static_root_problem


class TestDjangoStaticRoot:
    """stackctl init takes Django's STATIC_ROOT as static.dir only when NGiNX may serve it."""

    def test_a_directory_of_its_own_is_taken(self, tmp_path: Path) -> None:
        assert static_root_problem(tmp_path, str(tmp_path / "collected")) == ""

    @pytest.mark.parametrize("root", [".", ".."])
    def test_the_project_itself_is_refused_with_a_note(self, tmp_path: Path, root: str) -> None:
        note = static_root_problem(tmp_path, str(tmp_path / root))
        assert note.startswith(f"STATIC_ROOT is {(tmp_path / root).resolve()}, which holds")
        assert "NGiNX would serve its source and settings" in note

    def test_unset_says_what_to_do(self, tmp_path: Path) -> None:
        assert static_root_problem(tmp_path, "").startswith("STATIC_ROOT is not set")
