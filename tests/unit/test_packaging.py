"""The wheel carries the templates, profiles and demo, so that `pip install .` works anywhere."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO


def test_wheel_ships_templates_profiles_and_demo(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("stackctl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "circus.ini.j2",
        "uwsgi.ini.j2",
        "redis.conf.j2",
        "stackctl.service.j2",
        "nginx/nginx.conf.j2",
        "nginx/uwsgi_params",
        "nginx/mime.types",
        "profiles/base.toml",
        "profiles/dev.toml",
        "profiles/prod.toml",
        "demo/demo_app.py",
        "demo/static/board.js",
    ):
        assert f"stackctl/_data/{name}" in names
    assert "stackctl/static/realtime.js" in names  # the browser client NGiNX serves
