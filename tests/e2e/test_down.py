"""`stackctl down` and the clean-up after a crash stop the stack's processes, and only those."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import psutil
import pytest

from stackctl import processes
from tests.conftest import free_port, running_stack, stackctl, wait_for
from tests.e2e.test_restarts import (
    LOAD_APP,
    NO_AUTORELOAD,
    alive,
    circusctl,
    load_site,
    port,
    settle,
    wsgi_pids,
)
from tests.load import Load

pytestmark = pytest.mark.e2e


def run_dir_option(site: Path, run_dir: Path) -> tuple[str, str]:
    return ("--set", f"paths.run_dir={run_dir.relative_to(site)}")


def down(site: Path, run_dir: Path) -> str:
    return stackctl("down", *run_dir_option(site, run_dir), cwd=site).stdout


@contextmanager
def stack_in(site: Path, run_dir: Path) -> Iterator[Path]:
    """A load-app stack in ``site`` whose run directory is ``run_dir`` (inside the site, as
    run directories are); stopped, and checked, on exit."""
    site.mkdir(exist_ok=True)
    shutil.copy(LOAD_APP, site)
    stackctl("init", ".", "--app", "loadapp:application", cwd=site)
    try:
        stackctl("up", "--detach", "--workers", "2", "--listen", f"127.0.0.1:{free_port()}",
                 *run_dir_option(site, run_dir), *NO_AUTORELOAD, cwd=site)  # fmt: skip
        yield site
    finally:
        with suppress(AssertionError, subprocess.TimeoutExpired):
            down(site, run_dir)
        left = processes.find(run_dir)
        processes.kill_all(left)
    assert not left, f"processes left behind: {[p.cmdline() for p in left]}"


@contextmanager
def bystanders(run_dir: Path) -> Iterator[list[psutil.Process]]:
    """Processes of the user that have to do with the run directory but are not the stack's."""
    spawned = [
        # Reads a rendered config: the run directory is in its command line.
        subprocess.Popen(["tail", "-f", str(run_dir / "nginx.conf")], start_new_session=True),
        # Works in the run directory.
        subprocess.Popen(["sleep", "600"], cwd=run_dir, start_new_session=True),
        # A shell cd'ed there, leading a session whose other member is elsewhere.
        subprocess.Popen(
            ["sh", "-c", "(cd / && exec sleep 601) & wait"], cwd=run_dir, start_new_session=True
        ),  # fmt: skip
    ]
    try:
        wait_for(lambda: len(psutil.Process(spawned[2].pid).children()) == 1,
                 what="the shell's child")  # fmt: skip
        procs = [psutil.Process(p.pid) for p in spawned]
        yield procs + psutil.Process(spawned[2].pid).children()
    finally:
        for p in spawned:
            with suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def pids_of(run_dir: Path) -> set[tuple[int, float]]:
    return {(p.pid, p.create_time()) for p in processes.find(run_dir)}


def test_down_and_crash_clean_up_stop_only_the_stacks_processes(short_tmp: Path) -> None:
    # The other stack's run directory starts like mine: its stack directory holds mine (so
    # neither reloads its code by itself: the outer one would see the inner one's files).
    other_site, my_site = short_tmp, short_tmp / "s"
    mine, other = my_site / "r", my_site / "r2"
    with ExitStack() as stacks:
        stacks.enter_context(stack_in(other_site, other))
        others = pids_of(other)
        assert len(others) >= 6
        site = stacks.enter_context(stack_in(my_site, mine))
        with bystanders(mine) as bystanding:
            members = processes.find(mine)
            assert len(members) >= 6 and not set(members) & set(bystanding)

            assert "stack stopped" in down(site, mine)
            assert not any(map(alive, members))
            assert all(map(alive, bystanding))
            assert pids_of(other) == others

            # A crash: circusd is killed while NGiNX's master is gone, which orphans its
            # workers (they outlive their master). Held stopped, circusd cannot replace it.
            stackctl("up", "--detach", "--workers", "2", "--listen", f"127.0.0.1:{free_port()}",
                     *run_dir_option(site, mine), *NO_AUTORELOAD, cwd=site)  # fmt: skip
            members = processes.find(mine)
            names = {p.pid: p.name() for p in members}
            circusd = processes.circusd(mine)
            assert circusd is not None
            circusd.suspend()
            nginx_master = processes.pid_in(mine / "nginx.pid")
            assert nginx_master is not None
            os.kill(nginx_master, signal.SIGKILL)
            circusd.kill()
            orphans = [p for p in members if p.pid != nginx_master and names[p.pid] == "nginx"]
            assert orphans and all(map(alive, orphans))

            out = down(site, mine)
            assert "killed leftover pids" in out
            assert not any(map(alive, members))
            assert all(map(alive, bystanding))
            assert pids_of(other) == others
        assert "stack stopped" in down(other_site, other)


def test_down_under_load_stops_the_front_first_and_leaves_no_request_hanging() -> None:
    with running_stack(load_site(), "--workers", "2") as stack:
        with Load(port(stack), connections=32) as load:
            settle(load)
            started = time.monotonic()
            stackctl("down", cwd=stack.stack_dir)
            took = time.monotonic() - started
        print(f"down took {took:.1f} s under load; {load.report.ok} answers")
        # Once NGiNX is gone, new connections are refused: that is how a stopped site says so.
        # Anything else (a 5xx, a request that waited out its timeout, a wrong answer) is not.
        failures = [f for f in load.report.failures if "Connection refused" not in f]
        assert failures == []
        assert load.report.ok > 50
        assert max(load.report.latencies) < 10
        assert took < 15  # it took 32 s when the pools stopped with NGiNX still passing to them


def test_reload_and_down_leave_no_traceback_in_the_circusd_log() -> None:
    site = load_site()
    with running_stack(site, "--workers", "2") as stack:
        stackctl("reload", cwd=site)
        stackctl("reload", "wsgi", "--sequential", cwd=site)
        circusd_log = stack.log_dir / "circusd.log"
        stackctl("down", cwd=site)
        log = circusd_log.read_text()
        assert "Arbiter exiting" in log  # the stop is in it
        assert "Traceback" not in log, log


def test_down_closes_websockets_with_1012_and_does_not_wait_for_them() -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with running_stack(load_site(), "--workers", "2") as stack:
        with connect(stack.url().replace("http", "ws", 1) + "ws/alerts") as client:
            started = time.monotonic()
            stackctl("down", cwd=stack.stack_dir)
            took = time.monotonic() - started
            with pytest.raises(ConnectionClosed) as closed:
                client.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        assert took < 15  # NGiNX waits for open websockets, until it is killed after 30 s


def test_down_during_a_reload_whose_new_workers_hang_ends_it_and_stops_gracefully() -> None:
    # Circus refused every stop while a reload waited for new workers (up to the graceful
    # timeout + 30 s), and `down` then killed everything: 50 s, requests cut.
    site = load_site()
    with running_stack(site, "--workers", "2", *NO_AUTORELOAD) as stack:
        before = wsgi_pids(stack)
        (site / "slow-start").write_text("3600")  # the new workers never finish loading
        with Load(port(stack), connections=16) as load:
            settle(load)
            assert circusctl(stack, "reload", "wsgi").returncode == 0  # returns at once
            wait_for(lambda: len(wsgi_pids(stack) - before) == 2, what="the new workers")
            started = time.monotonic()
            stackctl("down", cwd=site)
            took = time.monotonic() - started
        failures = [f for f in load.report.failures if "Connection refused" not in f]
        assert failures == [], f"down took {took:.1f} s"
        assert took < 15, f"down took {took:.0f} s"
        assert "Traceback" not in (stack.log_dir / "circusd.log").read_text()
