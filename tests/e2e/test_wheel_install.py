"""The built wheel, installed into a fresh virtualenv far from this checkout, runs the demo.

Nothing of the repository is in reach of the installed stackctl: its working directory, the
stack and the venv are under /tmp, PATH has no directory of the checkout (nor its .venv) and
PYTHONPATH is unset. Dependencies come from the package index, as for a user (pip's cache makes
it quick).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect

from stackctl import processes
from tests.conftest import APP_AS_ROOT, REPO, data_of, free_port
from tests.wheels import build_wheel

pytestmark = pytest.mark.e2e

# Every step but the install answers in seconds; pip may have to fetch (or compile uWSGI) once.
STEP_TIMEOUT = 120
INSTALL_TIMEOUT = 600
# The fresh venv is made with the interpreter running the tests, and with each one listed here
# (e.g. STACKCTL_WHEEL_PYTHONS=/usr/bin/python3.12:/usr/bin/python3.13).
PYTHONS = [sys.executable, *filter(None, os.environ.get("STACKCTL_WHEEL_PYTHONS", "").split(":"))]


def outside_env() -> dict[str, str]:
    """This environment with every trace of the checkout removed."""
    env = {
        name: value
        for name, value in os.environ.items()
        if str(REPO) not in value and name not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
    }
    env["PATH"] = os.pathsep.join(
        part
        for part in os.environ.get("PATH", "").split(os.pathsep)
        if part and not Path(part).resolve().is_relative_to(REPO)
    )
    return env


def run(*command: str | Path, cwd: Path, timeout: float = STEP_TIMEOUT) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


@pytest.fixture
def outside() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="scwheel", dir="/tmp")).resolve()
    assert not root.is_relative_to(REPO)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("python", PYTHONS)
def test_the_wheel_installed_in_a_fresh_venv_runs_the_demo(outside: Path, python: str) -> None:
    wheel = build_wheel(outside / "dist")
    wheel_version = wheel.name.split("-")[1]
    venv = outside / "venv"
    run(python, "-m", "venv", venv, cwd=outside)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel, cwd=outside,
        timeout=INSTALL_TIMEOUT)  # fmt: skip
    stackctl = venv / "bin" / "stackctl"
    assert run(stackctl, "--version", cwd=outside).strip() == f"stackctl {wheel_version}"

    run(stackctl, "init", "--demo", "site", cwd=outside)
    site = outside / "site"
    run_dir = site / ".stackctl" / "run"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    try:
        run(stackctl, "up", "--detach", "--listen", f"127.0.0.1:{port}", *APP_AS_ROOT, cwd=site)
        status, body = get(url)
        assert status == 200 and b"<title>stackctl demo: live board</title>" in body
        assert get(url + "_stackctl/realtime.js")[0] == 200  # the client, from the venv

        # Every config the installed stackctl wrote names files of the venv, none of the checkout.
        for config in run_dir.glob("*.*"):
            if config.is_file() and config.suffix in {".ini", ".conf", ".json"}:
                assert str(REPO) not in config.read_text(), config
        assert f"{venv}/" in (run_dir / "circus.ini").read_text()

        # The realtime worker (gevent, chaussette and wsproto of the venv) delivers a message.
        with connect(url.replace("http://", "ws://") + "ws/board", open_timeout=10) as ws:
            run(stackctl, "publish", "board", "from the wheel", cwd=site)
            assert data_of(ws.recv(timeout=10)) == "from the wheel"

        run(stackctl, "reload", cwd=site)
        status, body = get(url)
        assert status == 200 and b"<title>stackctl demo: live board</title>" in body

        run(stackctl, "down", cwd=site)
        left = processes.find(run_dir.resolve())
        assert not left, f"left running after down: {[p.pid for p in left]}"
    finally:
        # Whatever failed above, nothing of this stack outlives the test.
        subprocess.run([str(stackctl), "down"], cwd=site, env=outside_env(),
                       capture_output=True, timeout=STEP_TIMEOUT)  # fmt: skip
        processes.kill_all(processes.find(run_dir.resolve()))
