"""stackctl init and a Django STATIC_ROOT outside the project: left out, with a note saying why."""

from __future__ import annotations

from pathlib import Path

from stackctl.init import static_root_problem


def test_a_static_root_outside_the_project_is_left_out_with_a_note(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for root in ("/etc", str(tmp_path / "collected"), "../collected"):
        outside = (project / root).resolve()
        assert static_root_problem(project, root) == (
            f"STATIC_ROOT is {outside}, outside the project: stackctl serves static files only "
            "from inside the stack directory, so they are not served. To serve them, collect "
            "the static files into a directory inside the stack, e.g. Django's STATIC_ROOT = "
            'BASE_DIR / "staticfiles" with `manage.py collectstatic`, and set static.dir to it '
            '("staticfiles")'
        )


def test_a_static_root_inside_the_project_is_taken(tmp_path: Path) -> None:
    assert static_root_problem(tmp_path, str(tmp_path / "staticfiles")) == ""
    assert static_root_problem(tmp_path, "assets/collected") == ""
