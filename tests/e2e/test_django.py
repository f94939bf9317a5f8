"""A real Django project: detected by init, served by the stack, its static files by NGiNX."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import running_stack, stackctl, wait_for

pytestmark = pytest.mark.e2e


def django_project(root: Path) -> Path:
    project = root / "proj"
    project.mkdir()
    subprocess.run(
        [sys.executable, "-m", "django", "startproject", "mysite", str(project)], check=True
    )
    settings = project / "mysite" / "settings.py"
    settings.write_text(settings.read_text() + '\nSTATIC_ROOT = BASE_DIR / "collected"\n')
    for command in (["collectstatic", "--noinput"], ["migrate", "--noinput"]):
        subprocess.run(
            [sys.executable, "manage.py", *command], cwd=project, check=True, capture_output=True
        )
    return project


def test_init_detects_a_django_project_and_up_serves_it(short_tmp: Path) -> None:
    project = django_project(short_tmp)
    out = stackctl("init", cwd=project).stdout
    assert "app mysite.wsgi:application" in out
    stack_file = tomllib.loads((project / "stack.toml").read_text())
    assert stack_file["app"] == {
        "wsgi": "mysite.wsgi:application",
        "django_settings": "mysite.settings",
    }
    assert stack_file["static"] == {"url": "/static/", "dir": "collected"}

    with running_stack(project, "--workers", "2") as stack:
        with urllib.request.urlopen(stack.url() + "admin/login/", timeout=10) as response:
            assert response.status == 200
            assert b"Django administration" in response.read()

        css = project / "collected" / "admin" / "css" / "base.css"
        with urllib.request.urlopen(
            stack.url() + "static/admin/css/base.css", timeout=10
        ) as response:
            assert response.status == 200
            assert response.read() == css.read_bytes()
            assert response.headers["Content-Type"] == "text/css"

        # The request log has paths, never query strings (they may carry tokens).
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(stack.url() + "marker-1/?token=x", timeout=10)
        missing.value.close()
        log = stack.log_dir / "wsgi.log"
        wait_for(lambda: "GET /marker-1/ " in log.read_text(), what="the app's request log")
        assert "token=x" not in log.read_text()
        assert "/static/admin/css/base.css" not in log.read_text()


def test_init_without_static_root_says_so(short_tmp: Path) -> None:
    project = short_tmp / "bare"
    project.mkdir()
    subprocess.run(
        [sys.executable, "-m", "django", "startproject", "bare", str(project)], check=True
    )
    out = stackctl("init", cwd=project).stdout
    assert "note: STATIC_ROOT is not set" in out
    assert tomllib.loads((project / "stack.toml").read_text())["static"]["dir"] == ""
