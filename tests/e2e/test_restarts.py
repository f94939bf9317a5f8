"""Restarts that lose nothing, measured under load: every failed request is counted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from stackctl import processes
from stackctl.errors import EXIT_STACK_ERROR
from stackctl.stack import Stack
from stackctl.supervisor import call
from tests.conftest import REPO, app_site, data_of, running_stack, stackctl, wait_for
from tests.load import Load

pytestmark = pytest.mark.e2e

WORKERS = 4
# These tests edit the app on purpose; the dev profile's code reload must not react to that.
NO_AUTORELOAD = ("--set", "wsgi.autoreload=false")
LOAD_APP = REPO / "tests" / "apps" / "loadapp.py"


def load_site() -> Path:
    return app_site(LOAD_APP, "loadapp:application")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(load_site(), "--workers", str(WORKERS), *NO_AUTORELOAD) as running:
        yield running


def port(stack: Stack) -> int:
    return stack.profile.server.listen.port


def wsgi_pids(stack: Stack) -> set[int]:
    return {int(pid) for pid in call(stack, "list", name="wsgi")["pids"]}


def circusctl(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CIRCUSCTL_ENDPOINT": stack.circus_endpoint}
    return subprocess.run(
        ["circusctl", *args], env=env, capture_output=True, text=True, timeout=120
    )


def crash_in_uwsgi(message: str) -> str:
    """App code that imports fine in a plain interpreter and dies inside a uWSGI worker."""
    return ("try:\n    import uwsgi\nexcept ImportError:\n    pass\nelse:\n"
            f"    raise RuntimeError({message!r})\n")  # fmt: skip


@contextmanager
def app_edited(stack: Stack, before: str = "", after: str = "") -> Iterator[None]:
    """The load app with code added around it, restored on exit."""
    app = stack.stack_dir / "loadapp.py"
    good = app.read_text()
    app.write_text(before + good + after)
    try:
        yield
    finally:
        app.write_text(good)


def settle(load: Load, seconds: float = 1.0) -> None:
    """Let the load run a moment, so that the action below happens mid-flow."""
    wait_for(lambda: load.report.ok > 0, what="the first answers")
    time.sleep(seconds)


def test_circusctl_reload_five_times_loses_nothing(stack: Stack) -> None:
    with Load(port(stack)) as load:
        settle(load)
        for _ in range(5):
            # Without --waiting the command returns while Circus is still reloading, and
            # Circus refuses the next one ("arbiter is already running arbiter_reload command").
            reload = circusctl(stack, "--timeout", "60", "reload", "wsgi", "--waiting")
            assert reload.stdout.strip() == "ok", reload.stderr
        time.sleep(1)
    assert load.report.failures == []
    assert load.report.ok > 100
    assert len(wsgi_pids(stack)) == WORKERS


def test_stackctl_reload_sequential_three_times_loses_nothing(stack: Stack) -> None:
    with Load(port(stack)) as load:
        settle(load)
        for _ in range(3):
            before = wsgi_pids(stack)
            stackctl("reload", "wsgi", "--sequential", cwd=stack.stack_dir)
            assert not before & wsgi_pids(stack)
        time.sleep(1)
    assert load.report.failures == []
    assert load.report.ok > 100


def test_reload_with_a_broken_app_keeps_the_old_workers(stack: Stack) -> None:
    before = wsgi_pids(stack)
    with Load(port(stack)) as load:
        settle(load)
        with app_edited(stack, after="\ndef broken(:\n"):
            result = stackctl("reload", "wsgi", cwd=stack.stack_dir, check=False)
        time.sleep(1)
    assert result.returncode == EXIT_STACK_ERROR
    assert "SyntaxError" in result.stderr
    assert load.report.failures == []
    assert wsgi_pids(stack) == before


def test_reload_refused_when_workers_crash_at_start(stack: Stack) -> None:
    # Imports fine in a plain interpreter, dies inside uWSGI: only the canary can tell.
    app = stack.stack_dir / "loadapp.py"
    good = app.read_text()
    before = wsgi_pids(stack)
    try:
        app.write_text("try:\n    import uwsgi\nexcept ImportError:\n    pass\nelse:\n"
                       "    raise RuntimeError('crash at start')\n" + good)  # fmt: skip
        result = stackctl("reload", "wsgi", cwd=stack.stack_dir, check=False)
    finally:
        app.write_text(good)
    assert result.returncode == EXIT_STACK_ERROR
    assert "the reload was refused; the running workers keep serving" in result.stderr
    assert "RuntimeError: crash at start" in result.stderr
    assert wsgi_pids(stack) == before


def test_reload_whose_workers_crash_only_under_circus_is_undone(stack: Stack) -> None:
    # The canary starts, the real workers do not: the reload must take them back.
    app = stack.stack_dir / "loadapp.py"
    good = app.read_text()
    before = wsgi_pids(stack)
    crash = ("try:\n    import uwsgi\nexcept ImportError:\n    pass\nelse:\n"
             "    if 'canary' not in str(uwsgi.opt.get('uwsgi-socket')):\n"
             "        raise RuntimeError('crash outside the canary')\n")  # fmt: skip
    try:
        with Load(port(stack)) as load:
            settle(load)
            app.write_text(crash + good)
            result = stackctl("reload", "wsgi", cwd=stack.stack_dir, check=False)
            time.sleep(1)
    finally:
        app.write_text(good)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout
    assert "RuntimeError: crash outside the canary" in result.stderr
    assert "The reload was undone" in result.stderr
    assert load.report.failures == []
    assert wsgi_pids(stack) == before
    assert circusctl(stack, "status", "wsgi").stdout.strip() == "active"
    assert circusctl(stack, "numprocesses", "wsgi").stdout.strip() == str(WORKERS)


def test_sigkill_of_one_worker_fails_at_most_its_request(stack: Stack) -> None:
    with Load(port(stack)) as load:
        settle(load)
        victim = sorted(wsgi_pids(stack))[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(wsgi_pids(stack)) == WORKERS and victim not in wsgi_pids(stack),
                 what="Circus to respawn the worker")  # fmt: skip
        time.sleep(1)
    # One thread per worker: at most one request was in flight on it.
    assert len(load.report.failures) <= stack.profile.wsgi.threads, load.report.failures
    assert all("502" in f for f in load.report.failures)


def test_nginx_killed_is_restarted(stack: Stack) -> None:
    master = int((stack.run_dir / "nginx.pid").read_text())
    os.kill(master, signal.SIGKILL)

    def answers_again() -> bool:
        try:
            return int((stack.run_dir / "nginx.pid").read_text()) != master and bool(
                urlopen_status(stack) == 200
            )
        except (OSError, ValueError):
            return False

    wait_for(answers_again, timeout=30, what="NGiNX to come back")
    orphans = [p.pid for p in psutil.process_iter() if _process_group(p.pid) == master]
    assert orphans == [], "workers of the killed master are still alive"


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def urlopen_status(stack: Stack) -> int:
    import urllib.request

    with urllib.request.urlopen(stack.url() + "sleep?ms=1", timeout=5) as response:
        return int(response.status)


def test_killing_circusd_leaves_no_process_and_up_starts_again() -> None:
    site = load_site()
    with running_stack(site, "--workers", "2") as stack:
        members = processes.find(stack.run_dir)
        assert len(members) >= 6
        os.kill(int(stack.circus_pidfile.read_text()), signal.SIGKILL)
        # An exiting process has lost its cmdline and environment before it is a zombie, so
        # find() alone can miss one that is not gone yet: wait for the known ones as well.
        wait_for(lambda: not processes.find(stack.run_dir) and not any(map(alive, members)),
                 timeout=10, what="every child of the killed circusd to exit")  # fmt: skip

        out = stackctl("up", "--detach", "--listen", stack.profile.server.listen.__str__(),
                       "--workers", "2", cwd=site).stdout  # fmt: skip
        assert "stack up:" in out
        assert urlopen_status(stack) == 200


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watcher_pids(stack: Stack, name: str) -> set[int]:
    out = circusctl(stack, "list", name).stdout.strip()
    return {int(pid) for pid in out.split(",") if pid.strip()}


@pytest.fixture
def local_profile(stack: Stack) -> Iterator[Path]:
    """A stack-local profiles/dev.toml, removed (and applied away) after the test."""
    path = stack.stack_dir / "profiles" / "dev.toml"
    path.parent.mkdir(exist_ok=True)
    yield path
    path.unlink(missing_ok=True)
    stackctl("reload", cwd=stack.stack_dir)


def test_worker_count_change_applied_by_reload_loses_nothing(
    stack: Stack, local_profile: Path
) -> None:
    others = {name: watcher_pids(stack, name) for name in ("ws", "nginx", "redis")}
    kept = wsgi_pids(stack)
    with Load(port(stack)) as load:
        settle(load)
        local_profile.write_text('extends = "dev"\n[wsgi]\nworkers = 2\n')
        out = stackctl("reload", "--set", "wsgi.workers=2", cwd=stack.stack_dir).stdout
        time.sleep(1)
    assert "wsgi now runs 2 workers" in out
    assert load.report.failures == []
    assert len(wsgi_pids(stack)) == 2 and wsgi_pids(stack) < kept  # no worker restarted
    assert {name: watcher_pids(stack, name) for name in others} == others


def test_nginx_config_change_applied_by_reload_loses_nothing(
    stack: Stack, local_profile: Path
) -> None:
    master = watcher_pids(stack, "nginx")
    with Load(port(stack)) as load:
        settle(load)
        local_profile.write_text('extends = "dev"\n[server]\nmax_body = "5m"\n')
        out = stackctl("reload", cwd=stack.stack_dir).stdout
        time.sleep(2)
    assert "NGiNX reloaded its config (HUP)" in out
    assert "client_max_body_size 5m;" in (stack.run_dir / "nginx.conf").read_text()
    assert watcher_pids(stack, "nginx") == master
    assert load.report.failures == []


def test_bad_profile_change_touches_nothing(stack: Stack, local_profile: Path) -> None:
    files = {p.name: p.read_text() for p in stack.run_dir.glob("*.ini")}
    pids = {name: watcher_pids(stack, name) for name in ("wsgi", "ws", "nginx", "redis")}
    local_profile.write_text('extends = "dev"\n[server]\nmax_body = "lots"\n')
    result = stackctl("reload", cwd=stack.stack_dir, check=False)
    assert result.returncode == EXIT_STACK_ERROR
    assert f"{local_profile}: server.max_body: expected a size" in result.stderr
    assert {p.name: p.read_text() for p in stack.run_dir.glob("*.ini")} == files
    assert {name: watcher_pids(stack, name) for name in pids} == pids


def test_uwsgi_change_its_workers_cannot_start_on_is_not_written(
    stack: Stack, local_profile: Path
) -> None:
    app = stack.stack_dir / "loadapp.py"
    good = app.read_text()
    uwsgi_ini = stack.uwsgi_ini.read_text()
    before = wsgi_pids(stack)
    try:
        app.write_text("try:\n    import uwsgi\nexcept ImportError:\n    pass\nelse:\n"
                       "    raise RuntimeError('crash at start')\n" + good)  # fmt: skip
        local_profile.write_text('extends = "dev"\n[wsgi]\nmax_requests = 4000\n')
        result = stackctl("reload", cwd=stack.stack_dir, check=False)
    finally:
        app.write_text(good)
    assert result.returncode == EXIT_STACK_ERROR
    assert "RuntimeError: crash at start" in result.stderr
    # Not on disk, so a worker Circus respawns later still starts on the running config.
    assert stack.uwsgi_ini.read_text() == uwsgi_ini
    assert wsgi_pids(stack) == before


def test_redis_killed_comes_back_and_the_ws_worker_resubscribes(stack: Stack) -> None:
    from websockets.sync.client import connect

    ws_pid = watcher_pids(stack, "ws")
    url = stack.url().replace("http", "ws", 1) + "ws/alerts"
    with connect(url) as client:
        stackctl("publish", "alerts", "before", cwd=stack.stack_dir)
        assert data_of(client.recv(timeout=2)) == "before"
        (redis_pid,) = watcher_pids(stack, "redis")
        os.kill(redis_pid, signal.SIGKILL)
        wait_for(lambda: watcher_pids(stack, "redis") not in (set(), {redis_pid}), timeout=20,
                 what="Circus to restart Redis")  # fmt: skip

        def delivered() -> bool:
            # Publishing reports how many subscribers got it: 1 once the worker is back.
            out = stackctl("publish", "alerts", "after", cwd=stack.stack_dir, check=False).stdout
            return "(1 worker(s) listening)" in out

        wait_for(delivered, timeout=20, what="the ws worker to subscribe again")
        assert data_of(client.recv(timeout=2)) == "after"
    assert watcher_pids(stack, "ws") == ws_pid, "the ws worker was not restarted"


def test_down_lets_in_flight_requests_finish() -> None:
    import threading
    import urllib.request

    site = load_site()
    with running_stack(site, "--workers", "2") as stack:
        answers: list[bytes] = []
        started = site / "request-started"

        def slow_request() -> None:
            url = f"{stack.url()}sleep?ms=2000&mark={started}"
            with urllib.request.urlopen(url, timeout=30) as response:
                answers.append(response.read())

        request = threading.Thread(target=slow_request)
        request.start()
        wait_for(started.exists, what="the slow request to reach a worker")
        stackctl("down", cwd=stack.stack_dir)
        request.join(timeout=30)
        assert answers == [b"slept 2000"]
        assert not processes.find(stack.run_dir)


def test_worker_crashing_at_every_start_is_stopped_with_its_error_in_status() -> None:
    site = load_site()
    app = site / "loadapp.py"
    good = app.read_text()
    with running_stack(site, "--workers", "2", *NO_AUTORELOAD) as stack:
        app.write_text("try:\n    import uwsgi\nexcept ImportError:\n    pass\nelse:\n"
                       "    raise RuntimeError('crash at every start')\n" + good)  # fmt: skip
        # A reload would be undone; workers that die find the broken app when Circus
        # respawns them, again and again.
        for pid in wsgi_pids(stack):
            os.kill(pid, signal.SIGKILL)

        def stopped() -> bool:
            return circusctl(stack, "status", "wsgi").stdout.strip() == "stopped"

        wait_for(stopped, timeout=30, what="the flapping pool to be stopped")
        result = stackctl("status", cwd=site, check=False)
        status = result.stdout
        assert result.returncode == 1 and re.search(r"^site +FAILING", status, re.M), status
        assert "wsgi    stopped" in status
        assert "stopped after 5 crashes in a row at start" in status
        assert "RuntimeError: crash at every start" in status

        app.write_text(good)
        out = stackctl("reload", "wsgi", cwd=site).stdout
        assert "wsgi had stopped after crashing; started it again" in out
        wait_for(lambda: urlopen_status(stack) == 200, what="the site to answer again")
        assert "stopped after" not in stackctl("status", cwd=site).stdout


def test_down_leaves_no_orphan_when_a_worker_ignores_the_stop_signal() -> None:
    import urllib.request

    site = load_site()
    with running_stack(site, "--workers", "1", "--set", "wsgi.graceful_timeout=2") as stack:
        with urllib.request.urlopen(stack.url() + "stubborn", timeout=10) as response:
            assert response.status == 200
        (stubborn,) = wsgi_pids(stack)
        started = time.monotonic()
        stackctl("down", cwd=stack.stack_dir)
        assert time.monotonic() - started < 20
        assert (
            not psutil.pid_exists(stubborn)
            or psutil.Process(stubborn).status() == psutil.STATUS_ZOMBIE
        )
        assert not processes.find(stack.run_dir)
