"""Pages kept at NGiNX (``[cache]``), on the real stack: what is kept, what never is, who
skips it, one app call for many visitors, stale copies while the app is slow, failing or
reloading, and stackctl.cache's refresh and purge from the command line and from the app."""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stackctl import cache
from stackctl.errors import EXIT_STACK_ERROR
from stackctl.stack import Stack
from stackctl.tls import self_signed_paths
from stackctl.users import ServiceUser
from tests.conftest import REPO, app_site, free_port, running_stack, stackctl, wait_for
from tests.load import Load
from tests.service_users import run, running_site

pytestmark = pytest.mark.e2e

CACHE_APP = REPO / "tests" / "apps" / "cacheapp.py"
CACHED = ("--set", "cache.enabled=true", "--set", "wsgi.autoreload=false")
WORKERS = 4


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    site = app_site(CACHE_APP, "cacheapp:application")
    with running_stack(site, "--workers", str(WORKERS), *CACHED) as running:
        yield running


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.body = response.read().decode()
        self.cache = response.getheader("X-Cache-Status")


def ask(stack: Stack, path: str, method: str = "GET", headers: dict[str, str] | None = None,
        body: bytes | None = None) -> Answer:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", stack.profile.server.listen.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return Answer(conn.getresponse())
    finally:
        conn.close()


def calls(stack: Stack, uri: str) -> int:
    """How many times the app was asked for ``uri``, by any worker."""
    log = stack.stack_dir / "calls.log"
    return sum(1 for line in log.read_text().splitlines() if line.split(" ", 1)[1] == uri)


def set_content(stack: Stack, text: str) -> None:
    (stack.stack_dir / "content.txt").write_text(text)


def test_a_marked_page_is_fetched_once_then_served_from_the_cache(stack: Stack) -> None:
    for path in ("/public?t=hit", "/accel?t=hit", "/smaxage?t=hit"):
        first = ask(stack, path)
        second = ask(stack, path)
        assert (first.status, first.cache) == (200, "MISS"), path
        assert (second.cache, second.body) == ("HIT", first.body), path
        assert calls(stack, path) == 1, path


def test_the_query_is_part_of_the_page(stack: Stack) -> None:
    ask(stack, "/public?t=q1")
    other = ask(stack, "/public?t=q2")
    assert other.cache == "MISS" and "of /public?t=q2" in other.body


@pytest.mark.parametrize("path", ["/plain?t=u", "/private?t=u", "/nostore?t=u", "/cookie?t=u"])
def test_unmarked_private_and_set_cookie_answers_are_never_kept(stack: Stack, path: str) -> None:
    bodies = {ask(stack, path).body for _ in range(3)}
    assert len(bodies) == 3 and calls(stack, path) == 3


def test_a_session_cookie_or_authorization_skips_the_cache_and_is_not_kept(stack: Stack) -> None:
    path = "/public?t=session"
    kept = ask(stack, path).body
    for headers in ({"Cookie": "theme=dark; sessionid=abc"}, {"Cookie": "csrftoken=x"},
                    {"Authorization": "Basic dXNlcjpwYXNz"}):  # fmt: skip
        own = ask(stack, path, headers=headers)
        assert own.cache == "BYPASS" and own.body != kept, headers
    # Their fresh answers replaced nothing: the visitors without a session get the kept copy.
    assert ask(stack, path).body == kept
    # Other cookies, even one whose name ends like a session cookie's, share the kept page.
    for cookie in ("theme=dark", "xsessionid=1", "a=sessionid"):
        assert ask(stack, path, headers={"Cookie": cookie}).cache == "HIT", cookie

    fresh = "/public?t=session-first"
    assert ask(stack, fresh, headers={"Cookie": "sessionid=abc"}).cache == "BYPASS"
    assert ask(stack, fresh).cache == "MISS"  # the logged-in answer was not stored


def test_post_is_never_answered_from_the_cache_nor_kept(stack: Stack) -> None:
    path = "/public?t=post"
    for _ in range(2):
        posted = ask(stack, path, "POST", body=b"x", headers={"Content-Type": "text/plain"})
        assert posted.status == 200 and posted.cache is None
    assert ask(stack, path).cache == "MISS"
    assert ask(stack, path, "POST", body=b"x").body != ask(stack, path).body
    assert calls(stack, path) == 4  # three POSTs and one GET


def test_head_is_served_from_a_kept_page_but_its_own_answer_is_not_kept(stack: Stack) -> None:
    assert ask(stack, "/public?t=head", "HEAD").cache == "MISS"
    got = ask(stack, "/public?t=head")
    assert got.cache == "MISS" and got.body.startswith("call 2 ")  # the HEAD left nothing
    head = ask(stack, "/public?t=head", "HEAD")
    assert (head.cache, head.body) == ("HIT", "")


def test_concurrent_first_requests_reach_the_app_once(stack: Stack) -> None:
    path = "/slow?ms=1500&t=lock"
    answers: list[Answer] = []
    lock = threading.Lock()

    def one() -> None:
        answer = ask(stack, path)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == 16 and {a.status for a in answers} == {200}
    assert len({a.body for a in answers}) == 1
    assert calls(stack, path) == 1


def test_an_outdated_page_is_served_while_a_new_one_is_fetched(stack: Stack) -> None:
    path = "/short?t=stale"  # fresh for one second
    first = ask(stack, path).body
    wait_for(lambda: ask(stack, path).cache in ("STALE", "UPDATING"), what="an outdated copy")
    wait_for(lambda: (a := ask(stack, path)).cache == "HIT" and a.body != first,
             what="the page fetched in the background")  # fmt: skip


def test_an_outdated_page_is_served_while_the_app_fails(stack: Stack) -> None:
    path = "/short?t=error"
    kept = ask(stack, path).body
    fail = stack.stack_dir / "fail"
    fail.touch()
    try:
        wait_for(lambda: ask(stack, path).status == 200 and calls(stack, path) >= 2,
                 what="the app asked again (answering 500)")  # fmt: skip
        for _ in range(5):
            answer = ask(stack, path)
            assert (answer.status, answer.body) == (200, kept)
            assert answer.cache in ("STALE", "UPDATING")
    finally:
        fail.unlink()


def test_a_reload_of_the_pool_fails_no_request_and_keeps_serving_the_page(stack: Stack) -> None:
    path = "/short?t=reload"
    ask(stack, path)
    before = calls(stack, path)
    with Load(stack.profile.server.listen.port, connections=8, only_get=path) as load:
        wait_for(lambda: load.report.ok > 50, what="the first answers")
        stackctl("reload", "wsgi", cwd=stack.stack_dir)
        served = load.report.ok
        wait_for(lambda: load.report.ok > served + 50, what="answers after the reload")
    assert not load.report.failures, load.report.failures[:5]
    # Served from the cache: the app saw about one request a second, not the load's.
    assert calls(stack, path) - before < load.report.ok / 5


def cli(stack: Stack, *args: str, check: bool = True) -> str:
    result = stackctl("cache", *args, cwd=stack.stack_dir, check=check)
    return result.stdout + result.stderr


def test_refresh_from_the_command_line_puts_the_new_page_in_the_cache(stack: Stack) -> None:
    path = "/public?t=refresh"
    set_content(stack, "old")
    assert ask(stack, path).body.endswith("old")
    set_content(stack, "new")
    assert ask(stack, path).body.endswith("old")  # kept for 60 s
    assert "the app answered 200" in cli(stack, "refresh", path)
    now = ask(stack, path)
    assert now.cache == "HIT" and now.body.endswith("new") and calls(stack, path) == 2


def test_purge_from_the_command_line_drops_the_page_file(stack: Stack) -> None:
    path = "/public?t=purge"
    ask(stack, path)
    target = cache.load_target(stack.run_dir)
    dirs, name = cache.cache_file(target, path)
    page = Path(target.pages_dir, *dirs, name)
    assert page.is_file()  # where stackctl.cache computes NGiNX keeps it
    assert "purged" in cli(stack, "purge", path)
    assert not page.exists()
    assert ask(stack, path).cache == "MISS"
    assert "was not in the cache" in cli(stack, "purge", "/public?t=never-asked")


def test_refresh_and_purge_from_the_app(stack: Stack) -> None:
    path = "/public?t=app"
    set_content(stack, "before")
    ask(stack, path)
    set_content(stack, "after")
    assert ask(stack, "/do-refresh?path=%2Fpublic%3Ft%3Dapp").body == "200"
    assert ask(stack, path).body.endswith("after")
    assert ask(stack, "/do-purge?path=%2Fpublic%3Ft%3Dapp").body == "True"
    assert ask(stack, path).cache == "MISS"


@pytest.mark.parametrize("hostile", [
    "http://evil.example/", "//evil.example/x", "/a\r\nX-Injected: 1", "/a b", "news",
    "/a#frag", "/caf\u00e9", "/%zz", "/" + "a" * 5000,
])  # fmt: skip
def test_hostile_paths_are_refused_and_reach_nothing(stack: Stack, hostile: str) -> None:
    before = (stack.stack_dir / "calls.log").read_text()
    for action in ("refresh", "purge"):
        result = stackctl("cache", action, hostile, cwd=stack.stack_dir, check=False)
        assert result.returncode == EXIT_STACK_ERROR, result
        assert "is not a path of the site" in result.stderr
        assert "Traceback" not in result.stderr
    assert (stack.stack_dir / "calls.log").read_text() == before
    hosted = stackctl("cache", "refresh", "/", "--host", "evil.example\r\nX: 1",
                      cwd=stack.stack_dir, check=False)  # fmt: skip
    assert hosted.returncode == EXIT_STACK_ERROR and "expected a host name" in hosted.stderr


def test_a_link_planted_in_the_cache_is_never_followed_by_purge(
    stack: Stack, tmp_path: Path
) -> None:
    path = "/public?t=planted"
    ask(stack, path)
    target = cache.load_target(stack.run_dir)
    dirs, name = cache.cache_file(target, path)
    first = Path(target.pages_dir, dirs[0])
    # Elsewhere, a file at the same place under a directory a link leads to.
    outside = tmp_path / "outside"
    (outside / dirs[1]).mkdir(parents=True)
    victim = outside / dirs[1] / name
    victim.write_text("not the cache's")
    moved = first.with_name(first.name + ".moved")
    first.rename(moved)
    first.symlink_to(outside)
    try:
        said = cli(stack, "purge", path, check=False)
        assert "not a directory of the cache" in said and "nothing was deleted" in said
        assert victim.read_text() == "not the cache's"
    finally:
        first.unlink()
        moved.rename(first)
    # A link in place of the page file itself: the link is removed, not what it names.
    page = first / dirs[1] / name
    page.unlink()
    page.symlink_to(victim)
    assert "purged" in cli(stack, "purge", path)
    assert not page.is_symlink() and victim.read_text() == "not the cache's"


def test_the_cache_is_private_to_the_stack(stack: Stack) -> None:
    for directory in (stack.nginx_cache_dir, stack.cache_pages_dir):
        mode = os.lstat(directory).st_mode
        assert mode & 0o077 == 0, oct(mode)  # no other user may enter, let alone plant a link
    socket_dir = os.stat(stack.cache_socket.parent).st_mode
    assert socket_dir & 0o007 == 0  # the refresh socket: only the stack's users reach it


def test_pages_outlive_a_reload_and_a_restart() -> None:
    site = app_site(CACHE_APP, "cacheapp:application")
    path = "/public?t=restart"
    # The same address both times: a page is kept for the Host header it was asked with.
    same = ("--listen", f"127.0.0.1:{free_port()}")
    with running_stack(site, "--workers", "2", *CACHED, *same) as running:
        ask(running, path)
        # NGiNX re-reads its config, with the cache's size changed.
        said = stackctl("reload", "--workers", "2", *CACHED, "--set", "cache.max_size=2g",
                        cwd=site).stdout  # fmt: skip
        assert "nginx" in said.lower()
        assert ask(running, path).cache == "HIT"
    with running_stack(site, "--workers", "2", *CACHED, *same) as running:
        wait_for(lambda: ask(running, path).cache == "HIT", what="the page loaded from disk")
        assert calls(running, path) == 1


def test_refresh_over_https_asks_the_app_as_a_visitor_would() -> None:
    site = app_site(CACHE_APP, "cacheapp:application")
    port = free_port()
    tls = ("--set", "tls.certificate=self-signed", "--set", f"tls.listen=127.0.0.1:{port}")
    path = "/public?t=https"
    with running_stack(site, "--workers", "2", *CACHED, *tls):
        context = ssl.create_default_context(cafile=self_signed_paths(site)[0])
        context.check_hostname = False  # the certificate names the site's names, not 127.0.0.1

        def fetch() -> Answer:
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
            try:
                conn.request("GET", path)
                return Answer(conn.getresponse())
            finally:
                conn.close()

        (site / "content.txt").write_text("old")
        assert fetch().body.endswith("over https: old")
        (site / "content.txt").write_text("new")
        assert "answered 200" in stackctl("cache", "refresh", path, cwd=site).stdout
        now = fetch()
        assert now.cache == "HIT" and now.body.endswith("over https: new")


def test_a_link_in_place_of_the_cache_directory_is_refused(short_tmp: Path) -> None:
    site = app_site(CACHE_APP, "cacheapp:application")
    run_dir = site / ".stackctl" / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "nginx-cache").symlink_to(short_tmp)
    result = stackctl("render", *CACHED, cwd=site, check=False)
    assert result.returncode == EXIT_STACK_ERROR
    assert "not a symbolic link" in result.stderr and "Traceback" not in result.stderr
    assert list(short_tmp.iterdir()) == []  # nothing was made or chowned through the link


def test_the_service_user_writes_the_pages_and_the_app_refreshes_and_purges_them(
    python: Path, service_user: ServiceUser
) -> None:
    """Root starts the stack, the app and NGiNX's workers run as the service user: they own
    the pages, cannot replace the directory NGiNX's master (root) chowns, and reach cache.sock."""
    root = Path(tempfile.mkdtemp(prefix="scu", dir="/tmp"))
    root.chmod(0o755)
    site = root / "site"
    site.mkdir()
    shutil.copy(CACHE_APP, site)
    (site / "cacheapp.py").chmod(0o644)
    run(python, "init", ".", "--app", "cacheapp:application", cwd=site)
    up = ("--listen", f"127.0.0.1:{free_port()}", "--workers", "2",
          "--set", f"server.user={service_user.name}", "--set", "cache.enabled=true")  # fmt: skip
    with running_site(python, site, *up) as stack:
        path = "/public?t=service"
        assert ask(stack, path).cache == "MISS"
        assert ask(stack, path).cache == "HIT"
        pages = os.lstat(stack.cache_pages_dir)
        assert (pages.st_uid, pages.st_mode & 0o777) == (service_user.uid, 0o700)
        parent = os.lstat(stack.nginx_cache_dir)
        assert parent.st_uid == 0 and parent.st_mode & 0o022 == 0  # the user cannot swap pages
        (site / "content.txt").write_text("changed")
        (site / "content.txt").chmod(0o644)
        assert ask(stack, "/do-refresh?path=%2Fpublic%3Ft%3Dservice").body == "200"
        assert ask(stack, path).body.endswith("changed")
        assert ask(stack, "/do-purge?path=%2Fpublic%3Ft%3Dservice").body == "True"
        assert ask(stack, path).cache == "MISS"
        assert "purged" in run(python, "cache", "purge", path, cwd=site).stdout


@pytest.mark.parametrize("setting, expected", [
    ("cache.max_size=1g;evil", "a size such as"),
    ("cache.inactive=10m use_temp_path=on", "a time such as"),
    ('cache.session_cookies=["sid\\"; evil"]', "a list of cookie names"),
])  # fmt: skip
def test_values_that_would_reach_nginx_conf_are_refused_naming_the_key(
    setting: str, expected: str
) -> None:
    site = app_site(CACHE_APP, "cacheapp:application")
    result = stackctl("render", *CACHED, "--set", setting, cwd=site, check=False)
    assert result.returncode == EXIT_STACK_ERROR
    key = setting.split("=", 1)[0]
    assert f"command line: {key}: expected {expected}" in result.stderr, result.stderr
    assert not (site / ".stackctl" / "run" / "nginx.conf").exists()
