"""Circus's own commands (`circusctl reload`, `restart`, `reloadconfig`) against the real
circusd that stackctl runs (stackctl.circusd): as lossless as `stackctl reload`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stackctl import processes
from stackctl.errors import EXIT_STACK_ERROR
from stackctl.readiness import ready_mark
from stackctl.realtime import publish
from stackctl.stack import Stack
from stackctl.supervisor import call
from tests.conftest import running_stack, stackctl, wait_for
from tests.e2e.test_restarts import (
    NO_AUTORELOAD,
    WORKERS,
    app_edited,
    circusctl,
    crash_in_uwsgi,
    load_site,
    port,
    settle,
    wsgi_pids,
)
from tests.followers import Follower
from tests.load import Load

pytestmark = pytest.mark.e2e

SLOW_START = "1.5"  # seconds each new worker takes to load the app


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(load_site(), "--workers", str(WORKERS), *NO_AUTORELOAD) as running:
        yield running


def ws_pid(stack: Stack) -> int:
    (pid,) = call(stack, "list", name="ws")["pids"]
    return int(pid)


def nginx_master(stack: Stack) -> int:
    (pid,) = call(stack, "list", name="nginx")["pids"]
    return int(pid)


class ReadyCount(threading.Thread):
    """Samples, while it runs, how many of the pool's workers have loaded the app."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.samples: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = wsgi_pids(self.stack)
            self.samples.append(sum(ready_mark(self.stack.run_dir, p).exists() for p in pids))
            time.sleep(0.02)

    def __enter__(self) -> ReadyCount:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.join(timeout=10)


def slow_start(stack: Stack) -> Path:
    marker = stack.stack_dir / "slow-start"
    marker.write_text(SLOW_START)
    return marker


@pytest.mark.parametrize("command", ["reload", "restart"])
def test_circusctl_replaces_workers_only_once_the_new_ones_are_ready(
    stack: Stack, command: str
) -> None:
    before = wsgi_pids(stack)
    marker = slow_start(stack)
    try:
        with Load(port(stack)) as load, ReadyCount(stack) as ready:
            settle(load)
            result = circusctl(stack, "--timeout", "120", command, "wsgi", "--waiting")
            time.sleep(0.5)
    finally:
        marker.unlink()
    assert result.returncode == 0, result.stdout + result.stderr
    after = wsgi_pids(stack)
    assert len(after) == WORKERS and not after & before
    # Circus's plain reload would have left the pool with no worker ready for SLOW_START.
    assert min(ready.samples) >= WORKERS, ready.samples
    assert load.report.failures == []


@pytest.mark.parametrize("watcher", [("wsgi",), ()], ids=["wsgi", "whole-stack"])
def test_circusctl_reload_of_workers_that_crash_is_undone(
    stack: Stack, watcher: tuple[str, ...]
) -> None:
    before = wsgi_pids(stack)
    with Load(port(stack)) as load:
        settle(load)
        with app_edited(stack, before=crash_in_uwsgi("crash at start")):
            result = circusctl(stack, "--timeout", "120", "reload", *watcher, "--waiting")
        time.sleep(0.5)
    assert result.returncode != 0
    assert "reload undone" in result.stdout + result.stderr
    assert "exited before they were ready" in result.stdout + result.stderr
    assert wsgi_pids(stack) == before
    assert circusctl(stack, "status", "wsgi").stdout.strip() == "active"
    assert circusctl(stack, "numprocesses", "wsgi").stdout.strip() == str(WORKERS)
    assert load.report.failures == []


def test_circusctl_reload_nginx_is_its_own_graceful_reload(stack: Stack) -> None:
    master = nginx_master(stack)
    workers = {p.pid for p in psutil.Process(master).children()}
    with Load(port(stack)) as load:
        settle(load)
        for _ in range(3):
            assert circusctl(stack, "reload", "nginx", "--waiting").returncode == 0
            time.sleep(1)
    assert nginx_master(stack) == master  # HUP: the master stays, its workers are replaced
    assert not workers & {p.pid for p in psutil.Process(master).children()}
    assert load.report.failures == []


def test_circusctl_reload_of_the_whole_stack_loses_nothing(stack: Stack) -> None:
    url = f"ws://127.0.0.1:{port(stack)}{stack.profile.ws.prefix}flow"
    followers = [Follower(url) for _ in range(3)]
    for follower in followers:
        follower.start()
    wsgi_before, ws_before, master = wsgi_pids(stack), ws_pid(stack), nginx_master(stack)
    sent: list[int] = []

    def publish_flow() -> None:
        for n in range(80):
            publish("flow", n, url=stack.redis_url)
            sent.append(n)
            time.sleep(0.05)

    try:
        for follower in followers:
            assert follower.connected.wait(10)
        with Load(port(stack)) as load:
            settle(load)
            publisher = threading.Thread(target=publish_flow)
            publisher.start()
            result = circusctl(stack, "--timeout", "120", "reload", "--waiting")
            publisher.join()
            time.sleep(0.5)
        for follower in followers:
            follower.wait_for_count(len(sent))
    finally:
        for follower in followers:
            follower.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.report.failures == []
    assert not wsgi_pids(stack) & wsgi_before and ws_pid(stack) != ws_before
    assert nginx_master(stack) == master
    for follower in followers:
        assert [m["data"] for m in follower.received] == list(range(80))


def test_changed_app_settings_replace_the_workers_and_spare_the_ws_worker(stack: Stack) -> None:
    wsgi_before, ws_before = wsgi_pids(stack), ws_pid(stack)
    marker = slow_start(stack)
    try:
        with Load(port(stack)) as load, ReadyCount(stack) as ready:
            settle(load)
            result = stackctl("reload", "--set", "app.django_settings=site_settings",
                              cwd=stack.stack_dir)  # fmt: skip
            time.sleep(0.5)
    finally:
        marker.unlink()
    assert "watcher:wsgi" in result.stdout or "env:wsgi" in result.stdout, result.stdout
    assert not wsgi_pids(stack) & wsgi_before
    assert ws_pid(stack) == ws_before
    assert min(ready.samples) >= WORKERS, ready.samples
    assert load.report.failures == []
    # Circus now runs what circus.ini says: reloading its config again changes nothing.
    pids = wsgi_pids(stack)
    assert circusctl(stack, "reloadconfig", "--waiting").returncode == 0
    assert wsgi_pids(stack) == pids and ws_pid(stack) == ws_before


def test_settings_under_which_the_site_answers_errors_are_refused(stack: Stack) -> None:
    before = wsgi_pids(stack)
    result = stackctl("reload", "--set", "app.django_settings=refuse_all", cwd=stack.stack_dir,
                      check=False)  # fmt: skip
    assert result.returncode == EXIT_STACK_ERROR, result.stdout
    assert "answer GET / (Host: localhost) with 400 Bad Request" in result.stderr
    assert "running ones answer 200 OK" in result.stderr
    assert "host not allowed" in result.stderr
    assert wsgi_pids(stack) == before
    assert "refuse_all" not in (stack.run_dir / "circus.ini").read_text()



def test_stackctl_reload_redis_keeps_its_socket_and_the_bus_works(stack: Stack) -> None:
    url = f"ws://127.0.0.1:{port(stack)}{stack.profile.ws.prefix}bus"
    follower = Follower(url)
    follower.start()
    try:
        assert follower.connected.wait(10)
        result = stackctl("reload", "redis", cwd=stack.stack_dir)
        assert result.stdout.strip().endswith("restarted redis")
        assert stack.redis_socket.exists()
        publish("bus", "after the restart", url=stack.redis_url)
        follower.wait_for_count(1)
    finally:
        follower.stop()
    assert [m["data"] for m in follower.received] == ["after the restart"]


def test_a_listen_address_taken_by_another_program_is_refused_and_nothing_changes(
    stack: Stack,
) -> None:
    nginx_conf = (stack.run_dir / "nginx.conf").read_text()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        result = stackctl("reload", "--listen", f"127.0.0.1:{taken}", cwd=stack.stack_dir,
                          check=False)  # fmt: skip
    assert result.returncode == EXIT_STACK_ERROR, result.stdout
    assert f"server.listen: 127.0.0.1:{taken} is not available" in result.stderr
    assert (stack.run_dir / "nginx.conf").read_text() == nginx_conf
    assert urllib.request.urlopen(stack.url(), timeout=10).status == 200


def test_a_second_reload_while_one_runs_is_refused_with_a_reason(stack: Stack) -> None:
    marker = slow_start(stack)
    try:
        first = subprocess.Popen([sys.executable, "-m", "stackctl", "reload", "wsgi"],
                                 cwd=stack.stack_dir, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
        lock = stack.run_dir / "reload.lock"
        wait_for(lambda: lock.is_file() and lock.read_text() == str(first.pid),
                 what="the first reload to hold the lock")  # fmt: skip
        second = stackctl("reload", "wsgi", cwd=stack.stack_dir, check=False)
        out, err = first.communicate(timeout=120)
    finally:
        marker.unlink()
    assert second.returncode == EXIT_STACK_ERROR
    assert f"another `stackctl reload` of this stack is under way (pid {first.pid})" in (
        second.stderr
    )
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, err


def test_a_reload_killed_midway_leaves_no_trial_worker_behind(stack: Stack) -> None:
    marker = slow_start(stack)
    marker.write_text("5")
    try:
        reload = subprocess.Popen([sys.executable, "-m", "stackctl", "reload", "wsgi"],
                                  cwd=stack.stack_dir, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        name = f"canary-{reload.pid}.sock"

        def canaries() -> list[psutil.Process]:
            found = []
            for proc in psutil.process_iter(["cmdline"]):
                if any(name in arg for arg in proc.info["cmdline"] or ()):
                    found.append(proc)
            return found

        wait_for(lambda: bool(canaries()), what="the trial worker to start")
        reload.kill()
        reload.wait()
        wait_for(lambda: not canaries(), timeout=10, what="the trial worker to go")
    finally:
        marker.unlink()


def test_circusd_killed_during_a_reload_leaves_no_worker_behind() -> None:
    site = load_site()
    with running_stack(site, "--workers", "2", *NO_AUTORELOAD) as stack:
        before = wsgi_pids(stack)
        marker = slow_start(stack)
        marker.write_text("5")
        assert circusctl(stack, "reload", "wsgi").returncode == 0  # returns at once
        wait_for(lambda: len(wsgi_pids(stack) - before) == 2, what="the new workers to start")
        new = wsgi_pids(stack) - before
        os.kill(int(stack.circus_pidfile.read_text()), signal.SIGKILL)

        def gone() -> bool:
            return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                           for pid in new | before)  # fmt: skip

        wait_for(gone, timeout=10, what="every worker to die with circusd")


def test_workers_with_threads_stop_once_their_requests_are_answered() -> None:
    # uWSGI's own graceful stop of a worker with threads hangs until the graceful timeout
    # (60 s here) and Circus kills it: a reload then takes that long, under the arbiter's lock.
    site = load_site()
    options = ("--workers", "2", "--set", "wsgi.threads=4", "--set", "wsgi.graceful_timeout=60")
    with running_stack(site, *options, *NO_AUTORELOAD) as stack:
        before = wsgi_pids(stack)
        with Load(port(stack)) as load:
            settle(load)
            inside = site / "slow-request-inside"
            url = f"{stack.url()}sleep?ms=2000&mark={inside}"
            answers: list[bytes] = []
            slow = threading.Thread(target=lambda: answers.append(
                urllib.request.urlopen(url, timeout=30).read()))
            slow.start()
            wait_for(inside.exists, what="the slow request to be in a worker")
            started = time.monotonic()
            result = circusctl(stack, "--timeout", "120", "reload", "wsgi", "--waiting")
            took = time.monotonic() - started
            slow.join(timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        assert took < 30, f"the reload waited {took:.0f} s for idle threads"
        assert answers == [b"slept 2000"]
        assert not wsgi_pids(stack) & before
        assert load.report.failures == []


def test_sigterm_during_a_reload_of_hanging_workers_stops_the_stack() -> None:
    # Circus refuses its own quit while a command holds its lock: the stop has to end the
    # replacement first, or it waits for workers that never get ready.
    site = load_site()
    with running_stack(site, "--workers", "2", *NO_AUTORELOAD) as stack:
        before = wsgi_pids(stack)
        slow_start(stack).write_text("3600")
        assert circusctl(stack, "reload", "wsgi").returncode == 0  # returns at once
        wait_for(lambda: len(wsgi_pids(stack) - before) == 2, what="the new workers to start")
        circusd = psutil.Process(int(stack.circus_pidfile.read_text()))
        circusd.terminate()
        circusd.wait(timeout=15)
        assert not processes.find(stack.run_dir)
        assert "Traceback" not in (stack.log_dir / "circusd.log").read_text()
