"""Helpers shared by the end-to-end tests: real processes on loopback, always cleaned up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path

import pytest

from stackctl import processes, profile
from stackctl.stack import NO_PROGRAMS, Stack, plan
from stackctl.users import ServiceUser
from tests import netns, service_users

REPO = Path(__file__).resolve().parent.parent


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A CI timeout or a `kill` sends SIGTERM, which would end pytest with no teardown at all:
    # make it the Ctrl-C pytest handles, so that fixtures and `with running_stack(...)` blocks
    # still stop the processes they started.
    signal.signal(signal.SIGTERM, _interrupt)


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


APP_AS_ROOT: tuple[str, ...] = ("--set", "server.user=root") if os.geteuid() == 0 else ()
"""The tests' stacks live in root's directories under /tmp, and stackctl refuses to run an app
as root unless told so: the tests that are not about the service user tell it (the service
user's own tests, tests/e2e/test_service_user.py, run the split for real)."""
STARTS_APP = ("up", "render")
METRICS_OFF = ("--set", "metrics.listen=")
"""The exporter's default port (metrics.listen) is one per machine, and other stacks (other
tests, other checkouts) run at the same time: a test that wants metrics names a free port."""


def stackctl(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run the real command line, as a user would (as root: see APP_AS_ROOT)."""
    words = [a for i, a in enumerate(args) if i == 0 or args[i - 1] not in ("-C", "--stack")]
    command = next((a for a in words if not a.startswith("-")), None)
    extra = APP_AS_ROOT if command in STARTS_APP else ()
    if command in STARTS_APP and not any("metrics.listen" in a for a in args):
        extra += METRICS_OFF
    result = subprocess.run(
        [sys.executable, "-m", "stackctl", *args, *extra],
        cwd=cwd,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"stackctl {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def data_of(envelope: str | bytes) -> object:
    """The published message inside what a realtime client receives."""
    return json.loads(envelope)["data"]


def wait_for(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def app_site(app: Path, wsgi: str) -> Path:
    """A new stack directory (short path, under /tmp) holding a copy of the test app ``app``,
    initialised for its callable ``wsgi``."""
    site = short_dir() / "site"
    site.mkdir()
    shutil.copy(app, site)
    stackctl("init", ".", "--app", wsgi, cwd=site)
    return site


_MADE: list[Path] = []


def short_dir() -> Path:
    """A temp dir with a short path (unix socket paths are limited to 107 bytes), removed at
    the end of the session at the latest."""
    path = Path(tempfile.mkdtemp(prefix="sc", dir="/tmp"))
    _MADE.append(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _remove_short_dirs() -> Iterator[None]:
    yield
    for path in _MADE:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def stop_and_check(stack_dir: Path) -> list[str]:
    """``stackctl down``, then kill (and report) whatever of the stack is still alive."""
    subprocess.run(
        [sys.executable, "-m", "stackctl", "down"], cwd=stack_dir, capture_output=True, timeout=120
    )
    left = processes.find((stack_dir / ".stackctl" / "run").resolve())
    leaked = [f"{p.pid} {' '.join(p.cmdline())}" for p in left]
    processes.kill_all(left)
    return leaked


@contextmanager
def running_stack(stack_dir: Path, *args: str) -> Iterator[Stack]:
    """``stackctl up --detach`` on a free port; stopped, and checked for leaks, on exit."""
    port = free_port()
    try:
        stackctl("up", "--detach", "--listen", f"127.0.0.1:{port}", *args, cwd=stack_dir)
        state = json.loads((stack_dir / ".stackctl" / "run" / "state.json").read_text())
        loaded = profile.load(stack_dir, state["profile"], [tuple(p) for p in state["overrides"]])
        yield plan(loaded, NO_PROGRAMS)
    finally:
        leaked = stop_and_check(stack_dir)
    assert not leaked, f"processes left behind: {leaked}"


@pytest.fixture
def no_leaks() -> Iterator[Callable[[Path], None]]:
    """Register stack directories; at teardown, stop them and fail if anything was left."""
    stacks: list[Path] = []
    yield stacks.append
    leaked = [line for stack_dir in stacks for line in stop_and_check(stack_dir)]
    assert not leaked, f"processes left behind: {leaked}"


@pytest.fixture(scope="session")
def service_user() -> Iterator[ServiceUser]:
    """A system user made for this session (removed at its end), for the app's processes."""
    yield from service_users.make_service_user()


@pytest.fixture(scope="session")
def python(service_user: ServiceUser) -> Iterator[Path]:
    """The interpreter of a virtualenv the service user can run, with this checkout in it."""
    yield from service_users.make_venv()


def netns_unavailable() -> str | None:
    """Why this machine cannot build network namespaces here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip` command"
    return None


@pytest.fixture(scope="session", autouse=True)
def _netns_leaks() -> Iterator[None]:
    """Leftovers of earlier runs that were killed are removed first; at the end, nothing this
    session made (namespace, link) may remain."""
    if netns_unavailable():
        yield
        return
    netns.sweep()
    yield
    me = netns.Owner.me()
    left = netns.leftovers(lambda owner: owner == me)
    if left:
        netns.kill_processes(left.netns)
        netns.remove(left.netns, left.links)
    assert not left, f"network namespaces or links left behind: {left}"


@pytest.fixture
def network() -> Iterator[Callable[[Sequence[str]], netns.Network]]:
    """Builds a ``netns.Network`` of the given hosts, removed when the test ends."""
    if reason := netns_unavailable():
        pytest.skip(reason)
    with ExitStack() as stack:
        yield lambda hosts: stack.enter_context(netns.Network(hosts))
