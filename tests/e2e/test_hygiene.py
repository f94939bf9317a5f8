"""Request hygiene from the profile: timeouts that kill hung requests, and worker recycling."""

from __future__ import annotations

import shutil
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from stackctl.readiness import ready_mark
from stackctl.stack import Stack
from tests.conftest import running_stack, short_dir, stackctl, wait_for
from tests.e2e.test_restarts import load_site, port, wsgi_pids
from tests.load import Load

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    settings = ["--set", "server.timeout=2", "--set", "wsgi.max_rss_mb=100"]
    with running_stack(load_site(), "--workers", "2", *settings) as running:
        yield running


def test_hung_request_gets_504_and_its_worker_is_replaced(stack: Stack) -> None:
    before = wsgi_pids(stack)
    started = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(stack.url() + "hang", timeout=30)
    error.value.close()
    assert error.value.code == 504
    assert 1.5 < time.monotonic() - started < 5
    wait_for(lambda: len(wsgi_pids(stack)) == 2 and wsgi_pids(stack) != before,
             what="the hung worker to be killed and replaced")  # fmt: skip
    wait_for(lambda: "Killing the current process" in (stack.log_dir / "wsgi.log").read_text(),
             what="uWSGI to log the harakiri")  # fmt: skip


def test_an_upstream_error_logs_no_token(stack: Stack) -> None:
    # NGiNX's error line for a timed-out request quotes its request line, query included.
    secret = "SECRET7c21"
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{stack.url()}hang?token={secret}", timeout=30)
    error.value.close()
    assert error.value.code == 504
    nginx_log = stack.log_dir / "nginx.log"
    wait_for(lambda: 'request: "GET /hang?[query removed] HTTP/1.1"' in nginx_log.read_text(),
             what="NGiNX to log the timeout, without the query")  # fmt: skip
    for path in stack.log_dir.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), f"the token is in {path}"


def test_max_requests_recycles_workers_without_failing_a_request() -> None:
    seen: set[int] = set()
    with (
        running_stack(load_site(), "--workers", "2", "--set", "wsgi.max_requests=25") as stack,
        Load(port(stack), connections=16, max_sleep_ms=20) as load,
    ):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(seen) < 6:
            seen |= wsgi_pids(stack)
            time.sleep(0.1)
    assert len(seen) >= 6, "workers were recycled"
    assert load.report.failures == []
    assert load.report.ok > 100


def test_memory_limit_recycles_a_worker_after_its_request(stack: Stack) -> None:
    with Load(port(stack), connections=8, max_sleep_ms=20) as load:
        wait_for(lambda: load.report.ok > 0, what="the first answers")
        with urllib.request.urlopen(stack.url() + "grow", timeout=10) as response:
            grown = int(response.read())
        wait_for(lambda: grown not in wsgi_pids(stack) and len(wsgi_pids(stack)) == 2,
                 what="the worker over the memory limit to be replaced")  # fmt: skip
        time.sleep(0.5)
    assert load.report.failures == []


def test_dev_profile_reloads_workers_when_an_app_file_changes() -> None:
    site = load_site()
    app = site / "loadapp.py"
    with (
        running_stack(site, "--workers", "2", "--profile", "dev") as stack,
        Load(port(stack), connections=8, max_sleep_ms=50) as load,
    ):
        wait_for(lambda: load.report.ok > 0, what="the first answers")
        before = wsgi_pids(stack)
        app.write_text(app.read_text().replace('f"pid {os.getpid()}"', 'f"new code {os.getpid()}"'))
        wait_for(lambda: not before & wsgi_pids(stack) and len(wsgi_pids(stack)) == 2,
                 what="every worker to restart on the new code")  # fmt: skip
        # Loaded, not just started: a worker still importing would read the typo below.
        wait_for(lambda: all(ready_mark(stack.run_dir, pid).exists() for pid in wsgi_pids(stack)),
                 what="the new workers to load the app")  # fmt: skip
        with urllib.request.urlopen(stack.url(), timeout=10) as response:
            assert response.read().startswith(b"new code")
        # A file saved with a typo is waited out: the workers keep serving the code they have.
        serving = wsgi_pids(stack)
        app.write_text(app.read_text() + "\ndef half_typed(:\n")
        time.sleep(3)  # several check intervals: nothing may restart
        assert wsgi_pids(stack) == serving
        with urllib.request.urlopen(stack.url(), timeout=10) as response:
            assert response.read().startswith(b"new code")
    assert load.report.failures == []


def test_prod_profile_does_not_reload_by_itself() -> None:
    site = load_site()
    app = site / "loadapp.py"
    with running_stack(site, "--workers", "2", "--profile", "prod") as stack:
        before = wsgi_pids(stack)
        app.write_text(app.read_text().replace('f"pid {os.getpid()}"', 'f"new code {os.getpid()}"'))
        time.sleep(4)  # several autoreload intervals: nothing may happen
        assert wsgi_pids(stack) == before


BACKLOG = 777


@pytest.fixture(scope="module")
def demo() -> Iterator[Stack]:
    site = short_dir() / "site"
    stackctl("init", str(site), "--demo", cwd=site.parent)
    (site / "static" / ".env").write_text("SECRET_KEY=do-not-serve\n")
    (site / "static" / "sub" / ".git").mkdir(parents=True)
    (site / "static" / "sub" / ".git" / "config").write_text("[core]\n")
    # Links a user of the stack may leave in the static directory, to what is not static.
    (site / "static" / "private").symlink_to("../.stackctl", target_is_directory=True)
    (site / "static" / "board-link.css").symlink_to("board.css")
    (site / "static" / "passwd").symlink_to("/etc/passwd")
    with running_stack(site, "--workers", "1", "--set", f"wsgi.backlog={BACKLOG}") as running:
        yield running
    shutil.rmtree(site.parent, ignore_errors=True)


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


def test_nginx_never_serves_dotfiles_from_the_static_dir(demo: Stack) -> None:
    assert status_of(demo.url() + "static/board.css") == 200
    assert status_of(demo.url() + "static/.env") == 404
    assert status_of(demo.url() + "static/sub/.git/config") == 404
    assert status_of(demo.url() + "static/%2eenv") == 404  # decoded before it is matched


def test_nginx_follows_no_symlink_in_the_static_dir(demo: Stack) -> None:
    assert demo.secret_file.is_file()
    assert status_of(demo.url() + "static/board.css") == 200
    assert status_of(demo.url() + "static/private/secret") in (403, 404)
    assert status_of(demo.url() + "static/board-link.css") in (403, 404)
    assert status_of(demo.url() + "static/passwd") in (403, 404)
    # stackctl's own files are served with the same rule, and still answer.
    assert status_of(demo.url() + "_stackctl/realtime.js") == 200


def test_no_token_in_any_log_and_logs_are_private(demo: Stack) -> None:
    secret = "SECRET4f9a"
    referer = f"http://127.0.0.1/page?token={secret}"
    for path in ("", "static/board.css", "poll/news", "events/news", "nothing-here"):
        url = f"{demo.url()}{path}?token={secret}&since=0"
        request = urllib.request.Request(url, headers={"Referer": referer})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                response.read(1)
        except (urllib.error.HTTPError, TimeoutError) as e:
            if isinstance(e, urllib.error.HTTPError):
                e.close()
    # A request whose lines mark the end of what the logs must hold.
    status_of(demo.url() + "flush-marker?token=" + secret)

    def logged() -> bool:
        wsgi = (demo.log_dir / "wsgi.log").read_text(errors="replace")
        access = (demo.log_dir / "nginx-access.log").read_text(errors="replace")
        return "GET /flush-marker " in wsgi and "GET /flush-marker " in access

    wait_for(logged, what="the marker request in the wsgi and NGiNX access logs")
    access = (demo.log_dir / "nginx-access.log").read_text()
    assert '"GET /nothing-here HTTP/1.1" 404' in access
    assert '"http://127.0.0.1/page"' in access  # the referer, without its query string
    files = [p for p in demo.log_dir.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for path in files:
        assert secret not in path.read_text(errors="replace"), f"the token is in {path}"
    assert stat.S_IMODE(demo.log_dir.stat().st_mode) == 0o700
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}: others may read it"


def test_a_client_cannot_write_a_line_of_its_own_into_the_apps_log(demo: Stack) -> None:
    """uWSGI logged the decoded path: a %0A in it began a line the client wrote."""
    assert status_of(demo.url() + "forged%0A1.2.3.4%20FORGED%20LINE%0d%1b[2J?token=x") == 404
    wsgi = demo.log_dir / "wsgi.log"
    wait_for(lambda: "/forged" in wsgi.read_text(errors="replace"),
             what="the request in wsgi.log")  # fmt: skip
    lines = wsgi.read_text(errors="replace").splitlines()
    (logged,) = [line for line in lines if "/forged" in line]
    assert "GET /forged%0A1.2.3.4%20FORGED%20LINE%0d%1b[2J HTTP/1.1 => 404" in logged
    assert not [line for line in lines if "FORGED" in line and line is not logged]
    assert "\x1b" not in wsgi.read_text(errors="replace")


def test_the_wsgi_backlog_logged_is_the_one_the_socket_has(demo: Stack) -> None:
    # circusd binds the socket with wsgi.backlog; uWSGI used to log its own default of 100.
    log = (demo.log_dir / "wsgi.log").read_text()
    assert f"your server socket listen backlog is limited to {BACKLOG} connections" in log
    assert "limited to 100 connections" not in log
    listed = subprocess.run(["ss", "-lxn"], capture_output=True, text=True, check=True).stdout
    line = next(line for line in listed.splitlines() if str(demo.wsgi_socket) in line)
    assert line.split()[3] == str(BACKLOG)  # Send-Q of a listening socket: its backlog
