"""``GET /_stackctl/health``, as a load balancer asks it: through the real NGiNX, wsgi pool,
realtime worker and Redis, each of them stopped in turn, and while the host drains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stackctl import health
from stackctl.stack import Stack
from tests.conftest import APP_AS_ROOT, free_port, running_stack, short_dir, stackctl, wait_for
from tests.e2e.test_realtime_faults import circusctl, pids

pytestmark = pytest.mark.e2e

DRAIN_SECONDS = 4


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    with running_stack(root / "site", "--workers", "2",
                       "--set", f"metrics.listen=127.0.0.1:{free_port()}") as running:  # fmt: skip
        yield running


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, dict(refused.headers), refused.read().decode()


def health_of(stack: Stack) -> tuple[int, str]:
    """The status and the reason the health check gives."""
    status, headers, body = get(stack.url() + "_stackctl/health")
    if status in (200, 503):
        assert headers["Content-Type"] == "application/json", headers
        answer = json.loads(body)
        assert answer["ok"] is (status == 200), body
        return status, answer["reason"]
    return status, body


def test_a_working_stack_answers_200_and_the_app_never_sees_the_check(stack: Stack) -> None:
    status, headers, body = get(stack.url() + "_stackctl/health")
    assert (status, json.loads(body)) == (200, {"ok": True, "reason": "serving"})
    assert headers["Cache-Control"] == "no-store"
    # The marker is NGiNX's: a visitor who sends it as a header reaches the app as ever.
    for name in ("STACKCTL_HEALTH", "Stackctl-Health"):
        status, _, body = get(stack.url(), headers={name: "1"})
        assert status == 200 and "serving" not in body, body
    # Only the exact path: what is beside it is not the check.
    assert get(stack.url() + "_stackctl/health/")[0] == 404
    assert get(stack.url() + "_stackctl/healthz")[0] == 404
    access_log = stack.nginx_access_log.read_text()
    assert "/_stackctl/health " not in access_log, "a check each second would flood the log"


@pytest.mark.parametrize(("watcher", "reason"), [
    ("redis", "realtime: "),  # "Redis does not answer", or "not subscribed to Redis"
    ("ws", "realtime: the realtime worker does not answer"),
])  # fmt: skip
def test_a_part_that_stops_turns_the_check_to_503_until_it_is_back(
    stack: Stack, watcher: str, reason: str
) -> None:
    assert health_of(stack) == (200, "serving")
    circusctl(stack, "stop", watcher)
    try:
        wait_for(lambda: health_of(stack)[0] == 503, what=f"503 without {watcher}")
        status, said = health_of(stack)
        assert said.startswith(reason) and ("Redis" in said or watcher == "ws"), said
        assert get(stack.url())[0] == 200, "the site itself still serves"
    finally:
        circusctl(stack, "start", watcher)
    wait_for(lambda: health_of(stack) == (200, "serving"), what="200 again")


def test_a_pool_that_does_not_answer_fails_the_check(stack: Stack) -> None:
    circusctl(stack, "stop", "wsgi")
    try:
        time.sleep(health.FRESH_FOR + 1.1)  # a new second: the answer of before is not used
        started = time.monotonic()
        status, _ = health_of(stack)
        # circusd still holds the socket: NGiNX waits for an answer, then gives up.
        assert status == 504
        assert time.monotonic() - started < health.ANSWER_WITHIN + 5
    finally:
        circusctl(stack, "start", "wsgi")
    wait_for(lambda: health_of(stack) == (200, "serving"), what="200 again")


def test_a_host_without_a_realtime_worker_asks_redis_itself(stack: Stack) -> None:
    """A wsgi-only host of a cluster: the worker pings Redis. Run here in a process with the
    stack's environment, against the stack's real Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKCTL_")}
    env |= {k: v for k, v in stack.worker_env().items() if k != health.REALTIME_VARIABLE}
    code = "from stackctl import health; print(health.check())"

    def check() -> str:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()  # fmt: skip

    assert check() == "(True, 'serving')"
    circusctl(stack, "stop", "redis")
    try:
        assert check().startswith("(False, 'Redis does not answer")
    finally:
        circusctl(stack, "start", "redis")
    wait_for(lambda: health_of(stack) == (200, "serving"), what="200 again")


def test_drain_turns_the_check_to_503_while_the_site_keeps_serving(stack: Stack) -> None:
    said = stackctl("drain", cwd=stack.stack_dir).stdout
    try:
        assert "503" in said
        assert health_of(stack) == (503, "draining")
        assert get(stack.url())[0] == 200
        status = stackctl("status", cwd=stack.stack_dir).stdout
        assert "draining" in status, status
    finally:
        stackctl("drain", "--off", cwd=stack.stack_dir)
    assert health_of(stack) == (200, "serving")
    assert "draining" not in stackctl("status", cwd=stack.stack_dir).stdout


def test_a_flood_of_checks_reaches_the_pool_about_once_a_second(stack: Stack) -> None:
    time.sleep(0.6)  # the exporter's reading is kept half a second: none of before counted
    before, started = pool_requests(stack), time.monotonic()
    answers: list[tuple[int, str]] = []
    with ThreadPoolExecutor(64) as pool:
        while time.monotonic() - started < 3 or len(answers) < 600:
            answers += pool.map(lambda _: health_of(stack), range(200))
    seconds = time.monotonic() - started
    assert set(answers) == {(200, "serving")}
    time.sleep(0.6)  # the exporter's reading is kept half a second
    reached = pool_requests(stack) - before
    # One for each second the flood lasted (a new second, a new answer), and some slack.
    assert 2 <= reached <= seconds / health.FRESH_FOR + 3, (reached, seconds)
    assert get(stack.url())[0] == 200


def pool_requests(stack: Stack) -> float:
    """Requests the wsgi workers answered, all together, from the stack's exporter."""
    with urllib.request.urlopen(f"http://{stack.profile.metrics.listen}/metrics",
                                timeout=30) as answer:  # fmt: skip
        lines = answer.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines
               if line.startswith("stackctl_wsgi_worker_requests_total{"))  # fmt: skip


def test_down_drains_first_then_stops() -> None:
    """Its own stack: `down` ends it. The check answers 503 for server.drain_seconds while
    pages still load; the next `up` answers 200 again."""
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    with running_stack(root / "site", "--workers", "1",
                       "--set", f"server.drain_seconds={DRAIN_SECONDS}") as running:  # fmt: skip
        assert health_of(running) == (200, "serving")
        asked = time.monotonic()
        down = subprocess.Popen([sys.executable, "-m", "stackctl", "down"], text=True,
                                cwd=running.stack_dir, stdout=subprocess.PIPE)  # fmt: skip
        try:
            wait_for(lambda: health_of(running)[0] == 503, what="503 once down began")
            assert health_of(running) == (503, "draining")
            served = 0
            while time.monotonic() - asked < DRAIN_SECONDS - 1:
                assert get(running.url())[0] == 200, "pages load while the host drains"
                served += 1
                time.sleep(0.2)
            assert served > 0
            out, _ = down.communicate(timeout=120)
        finally:
            if down.poll() is None:
                down.kill()
                down.wait()
        assert time.monotonic() - asked >= DRAIN_SECONDS
        assert "draining" in out and down.returncode == 0, out
        stackctl("up", "--detach", "--listen", f"127.0.0.1:{running.front.port}",
                 "--workers", "1", cwd=running.stack_dir)  # fmt: skip
        assert health_of(running) == (200, "serving")


@pytest.mark.parametrize("watcher", ["wsgi", "ws"])
def test_a_reload_keeps_the_check_at_200(stack: Stack, watcher: str) -> None:
    """A reload replaces workers without a gap: a balancer must not see the host fail."""
    answers: list[tuple[int, str]] = []
    reloading = subprocess.Popen([sys.executable, "-m", "stackctl", "reload", watcher],
                                 cwd=stack.stack_dir, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        while reloading.poll() is None:
            answers.append(health_of(stack))
            time.sleep(0.05)
        answers.append(health_of(stack))
    finally:
        if reloading.poll() is None:
            reloading.kill()
        out, _ = reloading.communicate()
    assert reloading.returncode == 0, out
    assert len(answers) > 5 and set(answers) == {(200, "serving")}, answers


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_a_stop_by_signal_drains_first(
    no_leaks: Callable[[Path], None], stop_signal: signal.Signals
) -> None:
    """systemd (KillMode=mixed) and Ctrl-C stop `stackctl up` by a signal: it drains too. So
    does a terminal or ssh session that closes (SIGHUP): stackctl must not die and leave
    circusd, in a session of its own, running without it."""
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    no_leaks(root / "site")
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "stackctl", "up", "--listen", f"127.0.0.1:{port}", "--workers",
         "1", "--set", f"server.drain_seconds={DRAIN_SECONDS}", *APP_AS_ROOT],
        cwd=root / "site", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        assert up.stdout is not None
        said = ""
        while "Ctrl-C stops the stack" not in said:  # up answers signals from then on
            line = up.stdout.readline()
            assert line, said
            said += line
        assert get_or_none(url + "_stackctl/health") == 200
        up.send_signal(stop_signal)
        wait_for(lambda: get_or_none(url + "_stackctl/health") == 503, what="503 on the signal")
        assert get(url)[0] == 200, "pages load while the host drains"
        out, _ = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
    assert "draining" in out and "stack stopped" in out, out


def get_or_none(url: str) -> int | None:
    try:
        return get(url)[0]
    except OSError:
        return None


def test_a_flood_of_checks_while_redis_hangs_gets_the_true_answer_at_once(stack: Stack) -> None:
    """Redis frozen: a check waits up to 1.5 s in a wsgi worker. The others wait for it and
    share its answer (health.FRESH_FOR), rather than each holding a worker."""
    (redis_pid,) = pids(stack, "redis")
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        wait_for(lambda: health_of(stack)[0] == 503, what="503 with Redis frozen")
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: health_of(stack), range(64)))
        page = get(stack.url())
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    assert page[0] == 200
    assert {status for status, _ in answers} == {503}
    assert all(reason.startswith("realtime:") for _, reason in answers), answers
    wait_for(lambda: health_of(stack) == (200, "serving"), what="200 again")
