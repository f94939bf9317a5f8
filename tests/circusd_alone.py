"""circusd as stackctl runs it (``python -m stackctl.circusd``), on a config of a test's own:
for what concerns circusd alone, without a whole stack around it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def config(directory: Path, sections: str) -> str:
    """A circus.ini whose endpoints and log are in ``directory``, followed by ``sections``."""
    return f"""\
[circus]
endpoint = ipc://{directory}/circus.sock
pubsub_endpoint = ipc://{directory}/pubsub.sock
multicast_endpoint =
logoutput = {directory}/circusd.log
check_delay = 0.25
{sections}"""


def endpoint(directory: Path) -> str:
    return f"ipc://{directory}/circus.sock"


@contextmanager
def running(ini: Path) -> Iterator[subprocess.Popen[bytes]]:
    """circusd on ``ini``; on exit SIGTERM (as ``stackctl down`` ends it), then whatever of it
    is still alive is killed by pid, and named in an AssertionError."""
    process = subprocess.Popen(
        [sys.executable, "-m", "stackctl.circusd", str(ini)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        yield process
    finally:
        left = stop(process)
    assert not left, f"processes left behind: {left}"


def stop(process: subprocess.Popen[bytes]) -> list[str]:
    tree: list[psutil.Process] = []
    with suppress(psutil.NoSuchProcess):
        tree = [psutil.Process(process.pid)]
        tree += tree[0].children(recursive=True)
    if process.poll() is None:
        process.terminate()
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    left = []
    for proc in tree:
        with suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {' '.join(proc.cmdline())}")
                proc.kill()
    process.wait(timeout=15)
    return left
