"""[watchers.NAME] attacked from outside, on the real stack under circusd: a new command that
cannot start (reload, up, status), a program that ignores its stop signal and leaves children
behind, one with a child it never waited for, a Redis killed under a batch of Celery tasks,
a stop that cuts tasks short, and the demo's slow job clicked many times at once."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import psutil
import pytest
import redis
from websockets.sync.client import connect

from stackctl import realtime, supervisor
from stackctl.cli import EXIT_UNHEALTHY
from stackctl.errors import EXIT_STACK_ERROR
from stackctl.stack import Stack
from tests.conftest import (
    REPO,
    app_site,
    data_of,
    free_port,
    running_stack,
    short_dir,
    stackctl,
    stop_and_check,
    wait_for,
)

pytestmark = pytest.mark.e2e

DEMO_JOBS = 4
"""Slow jobs the demo runs or queues at once (examples/demo/demo_app.py)."""

STEADY = "python steady.py"
BROKEN = "python -c \\\"raise SystemExit('steady: broken on purpose')\\\""
"""A command that exits at once, as --set gives it (TOML, inside double quotes)."""

# Started by the stack: ignores TERM, and leaves a child and a grandchild (each in a
# process group of its own, as a task running a tool would) that a stop must not forget.
DEAF = """\
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
shell = subprocess.Popen(["sh", "-c", "sleep 999 & wait"], start_new_session=True)
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(1000)
"""
STEADY_PROGRAM = "import time\nwhile True:\n    time.sleep(1)\n"
DEAF_GRACE = 2


@pytest.fixture(scope="module")
def site() -> Path:
    site = app_site(REPO / "tests" / "apps" / "echoenv.py", "echoenv:application")
    (site / "steady.py").write_text(STEADY_PROGRAM)
    (site / "deaf.py").write_text(DEAF)
    with (site / "stack.toml").open("a") as f:
        f.write(f'\n[watchers.steady]\ncmd = "{STEADY}"\n\n'
                f'[watchers.deaf]\ncmd = "python deaf.py started.txt"\n'
                f"graceful_timeout = {DEAF_GRACE}\n")  # fmt: skip
    return site


@pytest.fixture(scope="module")
def stack(site: Path) -> Iterator[Stack]:
    with running_stack(site, "--workers", "1") as running:
        yield running


def pids_of(stack: Stack, name: str) -> set[int]:
    found = {w.name: w for w in supervisor.status(stack)}
    return {p.pid for p in found[name].processes}


def test_a_reload_onto_a_command_that_cannot_start_fails_and_says_why(stack: Stack) -> None:
    wait_for(lambda: len(pids_of(stack, "steady")) == 1, 30, "steady to run")
    broken = stackctl("reload", "--set", f'watchers.steady.cmd="{BROKEN}"',
                      cwd=stack.stack_dir, check=False)  # fmt: skip
    # Circus retired the old process and the new one dies at start: the reload failed, and
    # the user is told which watcher, why (from its log) and that nothing runs it now.
    assert broken.returncode == EXIT_STACK_ERROR, broken.stdout + broken.stderr
    assert "watchers.steady.cmd" in broken.stderr
    assert "steady: broken on purpose" in broken.stderr
    assert "none of its processes runs now" in broken.stderr
    # The key, not its value: a command line may carry a password (and up's say so may well
    # go to the journal).
    assert "raise SystemExit" not in broken.stderr
    shown = stackctl("status", cwd=stack.stack_dir, check=False)
    assert shown.returncode == EXIT_UNHEALTHY, shown.stdout
    assert "background FAILING  steady stopped after crashing" in shown.stdout
    # Once the command is fixed, a reload starts it, and says nothing is wrong.
    fixed = stackctl("reload", "--set", f'watchers.steady.cmd="{STEADY}"', cwd=stack.stack_dir)
    assert "Circus reloaded its config" in fixed.stdout
    shown = stackctl("status", cwd=stack.stack_dir)
    assert "background ok       deaf, steady running" in shown.stdout
    # Stopped on purpose later, it is not said to have crashed (the old crash is forgotten).
    supervisor.call(stack, "stop", name="steady", waiting=True)
    shown = stackctl("status", cwd=stack.stack_dir, check=False)
    assert "background FAILING  steady stopped" in shown.stdout
    assert "crash" not in shown.stdout
    supervisor.call(stack, "start", name="steady", waiting=True)


def test_stackctl_reload_of_a_watcher_whose_program_now_fails_says_so(stack: Stack) -> None:
    wait_for(lambda: len(pids_of(stack, "steady")) == 1, 30, "steady to run")
    program = stack.stack_dir / "steady.py"
    program.write_text("raise SystemExit('steady: broken on disk')\n")
    try:
        broken = stackctl("reload", "steady", cwd=stack.stack_dir, check=False)
        assert broken.returncode == EXIT_STACK_ERROR, broken.stdout + broken.stderr
        assert "steady: broken on disk" in broken.stderr
        assert "stackctl reload steady" in broken.stderr  # what starts it again once fixed
    finally:
        program.write_text(STEADY_PROGRAM)
    again = stackctl("reload", "steady", cwd=stack.stack_dir)
    assert "steady had stopped after crashing; started it again" in again.stdout
    wait_for(lambda: len(pids_of(stack, "steady")) == 1, 30, "steady to run again")


def started(stack: Stack) -> list[int]:
    """The pid of each start of deaf.py."""
    return [int(line) for line in (stack.stack_dir / "started.txt").read_text().split()]


def family(pid: int) -> list[psutil.Process]:
    """A start of deaf.py and all it started."""
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def test_a_program_that_ignores_its_stop_signal_is_killed_with_its_children(
    stack: Stack,
) -> None:
    wait_for(lambda: (stack.stack_dir / "started.txt").is_file(), 30, "deaf.py to start")
    (first,) = started(stack)
    # deaf.py, sleep 1000, sh, sleep 999
    wait_for(lambda: len(family(first)) == 4, 10, "deaf.py's children")
    old = family(first)
    begun = time.monotonic()
    stackctl("reload", "deaf", cwd=stack.stack_dir)
    took = time.monotonic() - begun
    # It ignored TERM: killed after its graceful_timeout, which the reload waited for.
    assert took >= DEAF_GRACE, took
    # What it started went with it (Circus alone left it running, reparented, until `down`);
    # the new one's are untouched.
    wait_for(lambda: not running(old), 10, "what the old deaf.py started to be stopped")
    wait_for(lambda: len(started(stack)) == 2, 30, "the new deaf.py to start")
    wait_for(lambda: len(running(family(started(stack)[1]))) == 4, 10, "the new one's children")


def test_up_says_when_a_background_watcher_does_not_start() -> None:
    site = app_site(REPO / "tests" / "apps" / "echoenv.py", "echoenv:application")
    with (site / "stack.toml").open("a") as f:
        f.write('\n[watchers.typo]\ncmd = "python -c \\"import nosuch_tasks\\""\n')
    try:
        up = stackctl("up", "--detach", "--listen", f"127.0.0.1:{free_port()}", cwd=site)
        # The site serves, so up stands; but it says that typo does not run, and why.
        assert "typo does not start" in up.stderr, up.stdout + up.stderr
        assert "No module named 'nosuch_tasks'" in up.stderr
    finally:
        assert not stop_and_check(site)


SLOPPY = """\
import subprocess, time
# Never waited for: a zombie child for as long as this runs. (Kept: a Popen dropped at once
# would reap its child on the way out if it has exited by then.)
child = subprocess.Popen(["true"])
while True:
    time.sleep(1)
"""


def test_a_program_with_a_child_it_never_waited_for_does_not_break_status() -> None:
    site = app_site(REPO / "tests" / "apps" / "echoenv.py", "echoenv:application")
    (site / "sloppy.py").write_text(SLOPPY)
    with (site / "stack.toml").open("a") as f:
        f.write('\n[watchers.sloppy]\ncmd = "python sloppy.py"\n')
    metrics = f"127.0.0.1:{free_port()}"
    with running_stack(site, "--workers", "1", "--set", f"metrics.listen={metrics}") as stack:
        # Circus's stats of all watchers fail on a zombie process: status said only "circusd
        # refused 'stats': ... it's a zombie", and exited 3.
        wait_for(lambda: any(p.status() == psutil.STATUS_ZOMBIE for p in zombies_of(stack)),
                 30, "sloppy.py's zombie child")  # fmt: skip
        # And the exporter reported circusd down, with no watcher's numbers.
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=30) as answer:
            page = answer.read().decode().splitlines()
        assert "stackctl_circus_up 1" in page
        assert 'stackctl_watcher_processes{watcher="sloppy"} 1' in page
        assert 'stackctl_watcher_processes{watcher="wsgi"} 1' in page
        shown = stackctl("status", cwd=stack.stack_dir)
        assert "sloppy  active    1 process(es)" in shown.stdout
        assert "background ok       sloppy running" in shown.stdout
        (pid,) = pids_of(stack, "sloppy")
        assert f"pid {pid} " in shown.stdout
        stackctl("reload", "sloppy", cwd=stack.stack_dir)
        assert pids_of(stack, "sloppy") and pids_of(stack, "sloppy") != {pid}


def zombies_of(stack: Stack) -> list[psutil.Process]:
    """The children of the stack's processes that run sloppy.py."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with suppress(psutil.Error):
            if (proc.info["cmdline"] or [])[-1:] == ["sloppy.py"] and \
                    proc.cwd() == str(stack.stack_dir):
                found += proc.children()
    return found


# --- a real Celery worker: its broker killed, the stack stopped under a batch -----------------

WORKER = ("celery -A celery_jobs worker --pool threads --concurrency 2 --without-mingle "
          "--without-gossip --loglevel INFO")  # fmt: skip
VISIBILITY = 8
"""Celery's visibility_timeout here (an hour by default): a task killed mid-run is handed
out again once it is that old."""


@pytest.fixture
def celery_site() -> Path:
    site = app_site(REPO / "tests" / "apps" / "celery_jobs.py", "celery_jobs:application")
    with (site / "stack.toml").open("a") as f:
        f.write(f'\n[watchers.tasks]\ncmd = "{WORKER}"\ngraceful_timeout = 1\n'
                f'env = {{ VISIBILITY_TIMEOUT = "{VISIBILITY}" }}\n')  # fmt: skip
    return site


def enqueue(stack: Stack, batch: str, count: int, seconds: float) -> None:
    url = f"{stack.url()}enqueue?batch={batch}&count={count}&seconds={seconds}"
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10) as r:
        assert r.status == 202


def published(stack: Stack, batch: str) -> Counter[int]:
    """How many times each task of ``batch`` published its result, from the channel's
    history in the stack's Redis (kept across restarts)."""
    connection = redis.Redis(unix_socket_path=str(stack.redis_socket))
    try:
        entries = connection.xrange(realtime.stream_key("results"))
    finally:
        connection.close()
    found: Counter[int] = Counter()
    for _, fields in entries:
        for value in fields.values():
            with suppress(ValueError, TypeError, KeyError):
                data = json.loads(value)
                if isinstance(data, dict) and data.get("batch") == batch:
                    found[data["number"]] += 1
    return found


def test_a_redis_killed_under_a_batch_loses_and_doubles_no_task(celery_site: Path) -> None:
    with running_stack(celery_site, "--workers", "1") as stack:
        wait_for(lambda: len(pids_of(stack, "tasks")) == 1, 30, "the Celery worker")
        count = 16
        enqueue(stack, "killed", count, 0.3)
        wait_for(lambda: sum(published(stack, "killed").values()) >= 3, 30, "a few results")
        (redis_pid,) = pids_of(stack, "redis")
        psutil.Process(redis_pid).kill()
        wait_for(lambda: len(published(stack, "killed")) == count, 90, "every result")
        time.sleep(2)  # a task run twice would report again by now
        assert published(stack, "killed") == Counter(range(count))


def test_a_task_killed_by_down_runs_again_after_the_next_up(celery_site: Path) -> None:
    with running_stack(celery_site, "--workers", "1") as stack:
        wait_for(lambda: len(pids_of(stack, "tasks")) == 1, 30, "the Celery worker")
        log = stack.log_dir / "tasks.log"
        # Longer than graceful_timeout: `down` kills the two running; the rest stay queued.
        enqueue(stack, "cut", 4, 3)
        wait_for(lambda: log.read_text().count("received") >= 2, 30, "two tasks to start")
        stackctl("down", cwd=stack.stack_dir)
    with running_stack(celery_site, "--workers", "1") as stack:
        # Not lost: in Redis, handed out again once older than the visibility timeout.
        wait_for(lambda: len(published(stack, "cut")) == 4, 3 * VISIBILITY + 60, "every task")
        time.sleep(4)  # one run twice would report again by now
        assert published(stack, "cut") == Counter(range(4))


# --- the demo's slow job, clicked many times at once -----------------------------------------

CLICKS = 12


def click_job(stack: Stack) -> tuple[int, str]:
    request = urllib.request.Request(stack.url() + "job", data=b"", method="POST",
                                     headers={"Accept": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_demos_slow_job_clicked_many_times_at_once_runs_a_few() -> None:
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    with running_stack(root / "site") as stack:
        wait_for(lambda: len(pids_of(stack, "celery")) == 1, 30, "the Celery worker")
        with ThreadPoolExecutor(CLICKS) as pool:
            answers = list(pool.map(lambda _: click_job(stack), range(CLICKS)))
        accepted = [json.loads(body)["job"] for status, body in answers if status == 202]
        refused = [body for status, body in answers if status == 429]
        # Each job is 11 messages on the board's channel, kept for every new visitor: clicks
        # without end would push everything else off the board and grow the queue for ever.
        assert 1 <= len(accepted) <= DEMO_JOBS, answers
        assert len(accepted) + len(refused) == CLICKS, answers
        assert all("slow jobs are under way" in body for body in refused), refused
        # Once they are done, the button works again.
        with connect(stack.url().replace("http", "ws", 1) + "ws/board", open_timeout=10) as ws:
            done: set[str] = set()
            while done != set(accepted):
                message = data_of(ws.recv(timeout=60))
                if isinstance(message, dict) and message.get("progress") == 100:
                    done.add(message["job"])
        wait_for(lambda: click_job(stack)[0] == 202, 30, "a new job to be accepted")
