"""[watchers.NAME] for real: a Celery worker under the stack's circusd, with the stack's Redis
as its broker. A view enqueues, the task publishes, a websocket client receives; reloads in
the middle of a batch lose and double nothing; a watcher that crashes in a loop is stopped
while the rest of the stack serves on."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from stackctl import supervisor
from stackctl.cli import EXIT_UNHEALTHY
from stackctl.errors import EXIT_STACK_ERROR
from stackctl.stack import Stack
from tests.conftest import REPO, app_site, data_of, running_stack, stackctl, wait_for

pytestmark = pytest.mark.e2e

WORKER = ("celery -A celery_jobs worker --pool threads --concurrency 2 --without-mingle "
          "--without-gossip --loglevel INFO")  # fmt: skip
WATCHERS = f"""
[watchers.tasks]
cmd = "{WORKER}"
graceful_timeout = 20
env = {{ GREETING = "hello from the profile" }}

[watchers.crashy]
cmd = "python -c \\"raise SystemExit('crashy: failing on purpose')\\""
"""
DUPLICATE_WINDOW = 1.0
"""Seconds to wait, once a batch is complete, for a task run twice to report again."""


@pytest.fixture(scope="module")
def site() -> Path:
    site = app_site(REPO / "tests" / "apps" / "celery_jobs.py", "celery_jobs:application")
    with (site / "stack.toml").open("a") as f:
        f.write(WATCHERS)
    return site


@pytest.fixture(scope="module")
def stack(site: Path) -> Iterator[Stack]:
    with running_stack(site, "--workers", "2") as running:
        yield running


class Results:
    """A websocket client of the "results" channel, collecting what the tasks publish."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.received: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self) -> None:
        try:
            for message in self.socket:
                self.received.append(data_of(message))  # type: ignore[arg-type]
        except ConnectionClosed:
            pass

    def of(self, batch: str) -> list[dict[str, Any]]:
        return [m for m in list(self.received) if m["batch"] == batch]

    def wait(self, batch: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.of(batch)) >= count, timeout, f"{count} results of {batch}")
        return self.of(batch)



@contextmanager
def results_of(stack: Stack) -> Iterator[Results]:
    url = stack.url().replace("http", "ws", 1) + "ws/results"
    with connect(url, open_timeout=10) as socket:
        client = Results(socket)
        yield client
    client.thread.join(5)


@pytest.fixture
def results(stack: Stack) -> Iterator[Results]:
    with results_of(stack) as client:
        yield client


def enqueue(stack: Stack, batch: str, count: int, seconds: float) -> None:
    url = f"{stack.url()}enqueue?batch={batch}&count={count}&seconds={seconds}"
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10) as r:
        assert r.status == 202


def worker_pids(stack: Stack, name: str = "tasks") -> set[int]:
    found = {w.name: w for w in supervisor.status(stack)}
    return {p.pid for p in found[name].processes}


def test_a_view_enqueues_a_task_whose_result_reaches_a_websocket_client(
    stack: Stack, results: Results
) -> None:
    wait_for(lambda: len(worker_pids(stack)) == 1, 30, "the Celery worker")
    enqueue(stack, "first", 1, 0)
    (result,) = results.wait("first", 1)
    # It ran in the watcher's process, with the wsgi workers' environment and its own.
    assert result["pid"] in worker_pids(stack)
    assert result["has_redis_url"] is True
    assert result["greeting"] == "hello from the profile"


def reload_mid_batch(stack: Stack, results: Results, batch: str, reload: list[str]) -> None:
    """Enqueue a batch of slow-ish tasks, reload the watcher once some have arrived, then
    check that every task's result arrives exactly once, from old and new workers."""
    before = worker_pids(stack)
    count = 12
    enqueue(stack, batch, count, 0.4)
    results.wait(batch, 2)
    subprocess.run(reload, cwd=stack.stack_dir, check=True, capture_output=True, timeout=60)
    wait_for(lambda: worker_pids(stack) and not worker_pids(stack) & before, 60,
             "the old worker to be retired")  # fmt: skip
    results.wait(batch, count)
    # A duplicate would come late (a task run again): give it the time of two more tasks.
    time.sleep(DUPLICATE_WINDOW)
    arrived = results.of(batch)
    assert Counter(m["number"] for m in arrived) == Counter(range(count))
    pids = {m["pid"] for m in arrived}
    assert pids & before, "the old worker ran none of the batch: the reload came too late"
    assert pids - before, "the new worker ran none of the batch"


def test_stackctl_reload_of_the_watcher_loses_no_task(stack: Stack, results: Results) -> None:
    command = [sys.executable, "-m", "stackctl", "reload", "tasks"]
    reload_mid_batch(stack, results, "stackctl", command)


def test_circusctl_reload_of_the_watcher_loses_no_task(stack: Stack, results: Results) -> None:
    command = [sys.executable, "-m", "circus.circusctl", "--endpoint", stack.circus_endpoint,
               "reload", "tasks"]  # fmt: skip
    reload_mid_batch(stack, results, "circusctl", command)


def test_a_watcher_crashing_in_a_loop_is_stopped_and_the_rest_serves(stack: Stack) -> None:
    def crashy_stopped() -> bool:
        crashy = next(w for w in supervisor.status(stack) if w.name == "crashy")
        return crashy.state == "stopped" and crashy.failure is not None

    wait_for(crashy_stopped, 60, "the flapping plugin to stop crashy")
    shown = stackctl("status", cwd=stack.stack_dir, check=False)
    # The site works, but nothing does crashy's work: status fails, and says so.
    assert shown.returncode == EXIT_UNHEALTHY, shown.stdout
    assert "background FAILING  crashy stopped after crashing" in shown.stdout
    assert "crashy  stopped" in shown.stdout
    assert "stopped after 5 crashes in a row at start" in shown.stdout
    assert "crashy: failing on purpose" in shown.stdout  # the end of its log
    assert "tasks   active    1 process(es)" in shown.stdout
    with urllib.request.urlopen(stack.url(), timeout=10) as response:
        assert response.read() == b"ok\n"
    logs = stackctl("logs", "crashy", "-n", "5", cwd=stack.stack_dir)
    assert "crashy: failing on purpose" in logs.stdout
    # Once fixed, a reload starts it again (here it only crashes anew, and the reload says so).
    again = stackctl("reload", "crashy", cwd=stack.stack_dir, check=False)
    assert "crashy had stopped after crashing; started it again" in again.stdout
    assert again.returncode == EXIT_STACK_ERROR, again.stdout + again.stderr
    assert "crashy: failing on purpose" in again.stderr
    wait_for(crashy_stopped, 60, "the flapping plugin to stop crashy again")


def test_logs_and_reload_take_a_watchers_name_and_refuse_others(stack: Stack) -> None:
    logs = stackctl("logs", "tasks", "-n", "200", cwd=stack.stack_dir)
    assert "celery_jobs.job" in logs.stdout  # the worker's own banner lists its tasks
    for command in (("logs", "nosuch"), ("reload", "nosuch")):
        refused = stackctl(*command, cwd=stack.stack_dir, check=False)
        assert refused.returncode == EXIT_STACK_ERROR
        assert "this host runs no nosuch" in refused.stderr
        assert "tasks" in refused.stderr


def test_down_lets_a_running_task_finish_before_redis_stops(stack: Stack) -> None:
    log = stack.log_dir / "tasks.log"
    enqueue(stack, "last", 1, 2.0)
    wait_for(lambda: "celery_jobs.job" in log.read_text().rsplit("celery@", 1)[-1]
             and "received" in log.read_text().rsplit("celery@", 1)[-1], 30,
             "the worker to take the task")  # fmt: skip
    stackctl("down", cwd=stack.stack_dir)
    tail = log.read_text().rsplit("Task celery_jobs.job", 1)[-1]
    # The task published its result (Redis was still up) before the worker stopped.
    assert "succeeded" in tail, tail


# --- hostile and bad values: refused before anything is written -------------------------------


@pytest.mark.parametrize(
    ("setting", "wanted"),
    [
        ('watchers.evil.cmd="sleep 1\\n[watcher:root]\\ncmd = sh"', "expected a command line"),
        ('watchers.evil.cmd="celery -n $(circus.env.HOME)"', 'without "$"'),
        ("watchers.wsgi.cmd=sleep", "'wsgi' is a name of the stack's own"),
        ('watchers.tasks.env={STACKCTL_SECRET_FILE="/tmp/mine"}', "is the stack's own"),
        ('watchers.tasks.env={A="x\\n[env:wsgi]"}', "cannot be given to the program"),
        ("watchers.tasks.numprocesses=1000", "up to 64, got 1000"),
        ('watchers.tasks.stop_signal="KILL"', 'expected one of "TERM"'),
        ("watchers.tasks.graceful_timeout=-1", "positive integer"),
        ('watchers.tasks.working_dir="../.."', "inside the stack directory"),
        ('watchers.tasks.working_dir="missing"', "missing is not a directory"),
        ('watchers.tasks.role="everything"', 'expected one of "front"'),
    ],
)
def test_a_bad_watcher_value_is_refused_and_nothing_is_written(setting: str, wanted: str) -> None:
    site = app_site(REPO / "tests" / "apps" / "celery_jobs.py", "celery_jobs:application")
    with (site / "stack.toml").open("a") as f:
        f.write(WATCHERS)
    result = stackctl("up", "--detach", "--set", setting, cwd=site, check=False)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert result.stderr.startswith("stackctl: command line: watchers."), result.stderr
    assert wanted in result.stderr
    assert not (site / ".stackctl" / "run").exists()


# --- a Redis of redis.url with a password: Sentinel's, as on several hosts --------------------


def test_a_worker_finds_a_password_protected_redis_through_sentinel(short_tmp: Path) -> None:
    from tests.redis_ha import redis_ha

    directory = short_tmp / "redis"
    directory.mkdir()
    with redis_ha(directory) as ha:
        site = app_site(REPO / "tests" / "apps" / "celery_jobs.py", "celery_jobs:application")
        with (site / "stack.toml").open("a") as f:
            f.write(WATCHERS.split("[watchers.crashy]")[0])
        private = site / ".stackctl"
        private.mkdir(mode=0o700, exist_ok=True)
        (private / "redis-password").write_text(ha.password + "\n")
        with running_stack(site, "--workers", "1", "--set", f"redis.url={ha.url}") as stack:
            with results_of(stack) as client:
                enqueue(stack, "sentinel", 1, 0)
                (result,) = client.wait("sentinel", 1)
            assert result["pid"] in worker_pids(stack)
            log = (stack.log_dir / "tasks.log").read_text()
            assert "sentinel://:**@127.0.0.1" in log  # Celery's banner shows the broker masked
            assert ha.password not in log
