"""A service user and a virtualenv it can run, shared by the tests that run the app as that
user (tests/e2e/test_service_user.py, tests/e2e/test_production.py).

This run's interpreter may live under /root (0700), where no other user reaches: the stacks of
those tests run from a virtualenv of the system's Python in /tmp, with uWSGI compiled against
it, and stackctl installed from this checkout (editable), so the code under test is this tree's.
The fixtures are in tests/conftest.py, made once per session.
"""

from __future__ import annotations

import grp
import importlib.metadata
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from stackctl import processes, profile
from stackctl.stack import NO_PROGRAMS, Stack, plan
from stackctl.users import ServiceUser

REPO = Path(__file__).resolve().parent.parent

SYSTEM_PYTHON = Path("/usr/bin/python3")


def make_service_user() -> Iterator[ServiceUser]:
    """A system user (and its group) made for this session, removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("creating a user and switching to it needs root; this run is not root")
    name = f"stackctl-test-{os.getpid()}"  # one of its own for each session on the machine
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True)  # fmt: skip
    try:
        entry = pwd.getpwnam(name)
        yield ServiceUser(name, entry.pw_uid, entry.pw_gid, grp.getgrgid(entry.pw_gid).gr_name)
    finally:
        subprocess.run(["userdel", name], check=False)


def make_venv() -> Iterator[Path]:
    """The interpreter of a virtualenv every user can run, with this checkout installed (and
    Celery, for the demo's worker)."""
    if not SYSTEM_PYTHON.is_file():
        pytest.skip(f"no {SYSTEM_PYTHON} to make a virtualenv that other users can run")
    root = Path(tempfile.mkdtemp(prefix="scvenv", dir="/tmp"))
    try:
        root.chmod(0o755)
        subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(root)], check=True,
                       capture_output=True)  # fmt: skip
        # uWSGI from source: a wheel built for this run's Python links its libpython.
        uwsgi = f"uwsgi=={importlib.metadata.version('uwsgi')}"
        subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--no-binary", "uwsgi", uwsgi, "-e", f"{REPO}[demo]"],
                       check=True, capture_output=True, timeout=900)  # fmt: skip
        yield root / "bin" / "python"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(python: Path, *args: str, user: ServiceUser | None = None, cwd: Path,
        check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``stackctl ARGS`` with the shared virtualenv, as root or (setpriv) as ``user``."""
    command = [str(python), "-m", "stackctl", *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
                   "--", *command]  # fmt: skip
    env = {"PATH": f"{python.parent}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "HOME": str(cwd)}  # fmt: skip
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=180)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"stackctl {' '.join(args)}: {result.stdout}\n{result.stderr}")
    return result


@contextmanager
def stopped_at_exit(run_dir: Path) -> Iterator[None]:
    """Whatever the test does, nothing of the stack in ``run_dir`` outlives it."""
    try:
        yield
    finally:
        left = processes.find(run_dir)
        processes.kill_all(left)
        assert not left, f"processes left behind: {[p.pid for p in left]}"


def new_site(python: Path, owner: ServiceUser | None) -> Path:
    """The demo in a fresh stack directory other users may reach, owned by ``owner`` (root
    if None)."""
    root = Path(tempfile.mkdtemp(prefix="scu", dir="/tmp"))
    root.chmod(0o755)
    run(python, "init", str(root / "site"), "--demo", cwd=root)
    if owner is not None:
        for path in [root / "site", *(root / "site").rglob("*")]:
            os.chown(path, owner.uid, owner.gid, follow_symlinks=False)
    return root / "site"


def loaded(site: Path) -> Stack:
    state = json.loads((site / ".stackctl" / "run" / "state.json").read_text())
    return plan(profile.load(site, state["profile"], [tuple(p) for p in state["overrides"]]),
                NO_PROGRAMS, writes=False)  # fmt: skip


@contextmanager
def running_site(python: Path, site: Path, *up_args: str) -> Iterator[Stack]:
    """``stackctl up --detach UP_ARGS`` in ``site`` (made by :func:`new_site`); on exit the
    stack is stopped, nothing of it may be left, and the site's directory is removed."""
    try:
        with stopped_at_exit(site / ".stackctl" / "run"):
            # The exporter on a port of its own (the default one is the machine's): it
            # runs as root and reads what the service user's processes write.
            with closing(socket.socket()) as probe:
                probe.bind(("127.0.0.1", 0))
                metrics = ("--set", f"metrics.listen=127.0.0.1:{probe.getsockname()[1]}")
            run(python, "up", "--detach", *up_args, *metrics, cwd=site)
            try:
                yield loaded(site)
            finally:
                run(python, "down", cwd=site, check=False)
    finally:
        shutil.rmtree(site.parent, ignore_errors=True)
