"""The page cache attacked from outside, on the real stack: visitors who would get another
visitor's page, or make every visitor get a page built for a host of their choosing, and apps
whose answers say less than "public"."""

from __future__ import annotations

import os
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from stackctl import cache
from stackctl.errors import EXIT_STACK_ERROR
from stackctl.stack import Stack
from tests.conftest import REPO, app_site, running_stack, stackctl, wait_for
from tests.e2e.test_cache import CACHED, ask, calls, set_content

pytestmark = pytest.mark.e2e

CACHE_APP = REPO / "tests" / "apps" / "cacheapp.py"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    site = app_site(CACHE_APP, "cacheapp:application")
    with running_stack(site, "--workers", "2", *CACHED) as running:
        yield running


def raw(stack: Stack, request: bytes) -> tuple[str, str]:
    """Send ``request`` as it is (what http.client would not send); the head and body."""
    with socket.create_connection(("127.0.0.1", stack.profile.server.listen.port), 30) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    return head, body


@pytest.mark.parametrize("cookies", [
    ["sessionid =abc"], ["sessionid\t=abc"], ["theme=dark; csrftoken =x"],
    ["theme=dark", "sessionid=abc"],  # two Cookie headers: NGiNX reads them as one
])  # fmt: skip
def test_a_session_cookie_however_spelled_skips_the_cache(stack: Stack, cookies: list[str]) -> None:
    """Django and Werkzeug strip the blanks around a cookie's name: "sessionid =abc" is a
    session to the app, so its page must be neither served from nor put in the cache."""
    path = f"/public?t=spelled-{zlib.crc32(repr(cookies).encode())}"
    lines = "".join(f"Cookie: {cookie}\r\n" for cookie in cookies)
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n{lines}Connection: close\r\n\r\n"
    head, _ = raw(stack, request.encode())
    assert "X-Cache-Status: BYPASS" in head, head
    # The logged-in answer was not kept for the next visitor, who asks the app itself.
    assert ask(stack, path, headers={"Host": "x"}).cache == "MISS"


@pytest.mark.parametrize("path", ["/maxage", "/expires", "/accel-cookie", "/odd-case"])
def test_an_answer_not_marked_public_is_never_kept(stack: Stack, path: str) -> None:
    """max-age alone is for the visitor's browser (a page for one visitor may say it), and an
    Expires date alone says nothing of sharing: only public, s-maxage or X-Accel-Expires does.
    Set-Cookie beside X-Accel-Expires, or private in capitals, keeps the page out as well."""
    uri = f"{path}?t=unmarked"
    answers = [ask(stack, uri) for _ in range(3)]
    assert [answer.cache for answer in answers] == ["MISS"] * 3
    assert len({answer.body for answer in answers}) == 3 and calls(stack, uri) == 3


def poison(stack: Stack, target: str, host: str) -> str:
    """Ask for ``target`` (a path, or an absolute URL) with the Host header ``host``."""
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    return raw(stack, request.encode())[1]


@pytest.mark.parametrize("target, host", [
    ("/links?t=port", "localhost:666"),  # $host drops the port
    ("/links?t=dot", "localhost.:{port}"),  # ... and a final dot
    ("/links?t=case", "LOCALHOST:{port}"),  # ... and capitals
    ("http://localhost:{port}/links?t=absolute", "evil.example"),  # the request line's host
])  # fmt: skip
def test_a_page_built_for_another_host_header_is_never_served_to_the_site(
    stack: Stack, target: str, host: str
) -> None:
    """The app builds its links from the Host header: a page made for a header a visitor made
    up must not become the page every visitor of the site gets."""
    port = stack.profile.server.listen.port
    made_up = host.format(port=port)
    assert f"//{made_up}/next" in poison(stack, target.format(port=port), made_up)
    path = target.format(port=port).removeprefix(f"http://localhost:{port}")
    site = ask(stack, path, headers={"Host": f"localhost:{port}"})
    assert f"//localhost:{port}/next" in site.body, site.body
    assert site.cache == "MISS"


def test_a_request_line_naming_another_host_than_the_header_is_never_kept(stack: Stack) -> None:
    """NGiNX gives the app the request line's host as X-Forwarded-Host, which Django trusts
    with USE_X_FORWARDED_HOST: with the site's Host header beside it, that page would be kept
    under the site's key."""
    port = stack.profile.server.listen.port
    site = f"localhost:{port}"
    made = poison(stack, "http://evil.example/forwarded?t=line", site)
    assert "//evil.example/next" in made
    got = ask(stack, "/forwarded?t=line", headers={"Host": site})
    assert got.cache == "MISS" and "//localhost/next" in got.body, got.body


def test_a_visitors_forwarded_port_or_prefix_never_reaches_the_app(stack: Stack) -> None:
    """Werkzeug's ProxyFix (x_port, x_prefix) builds the page's links from X-Forwarded-Port
    and X-Forwarded-Prefix, trusting NGiNX to have set them: a visitor's own would be in the
    page kept for everyone, as the key does not hold them."""
    headers = {"X-Forwarded-Port": "666", "X-Forwarded-Prefix": "/evil"}
    made = ask(stack, "/proxyfix?t=forwarded", headers=headers)
    assert made.body.startswith("port= prefix= call 1"), made.body
    assert ask(stack, "/proxyfix?t=forwarded").body == made.body


def test_refresh_and_purge_reach_the_copy_a_load_balancer_asked_for(stack: Stack) -> None:
    """Behind a balancer the Host header has no port, where a browser's has the site's: the
    two are kept apart (the app's links differ), and refresh and purge act on both."""
    path = "/public?t=balanced"
    port = stack.profile.server.listen.port
    forms = {"browser": f"127.0.0.1:{port}", "balancer": "127.0.0.1"}
    set_content(stack, "old")
    for header in forms.values():
        assert ask(stack, path, headers={"Host": header}).body.endswith("old")
    set_content(stack, "new")
    stackctl("cache", "refresh", path, cwd=stack.stack_dir)
    for form, header in forms.items():
        now = ask(stack, path, headers={"Host": header})
        assert now.cache == "HIT" and now.body.endswith("new"), form
    assert "purged" in stackctl("cache", "purge", path, cwd=stack.stack_dir).stdout
    for form, header in forms.items():
        assert ask(stack, path, headers={"Host": header}).cache == "MISS", form


def test_a_visitors_range_or_condition_never_becomes_the_kept_page(stack: Stack) -> None:
    """NGiNX keeps the whole page: the app never sees a visitor's Range or If-None-Match (it
    would answer 206 or 304), NGiNX answers those itself from the kept copy."""
    for name, headers in (("range", {"Range": "bytes=0-3"}), ("etag", {"If-None-Match": '"v1"'})):
        path = f"/conditional?t={name}"
        first = ask(stack, path, headers=headers)
        assert first.cache == "MISS" and first.status in (200, 304), name
        kept = ask(stack, path)
        assert (kept.status, kept.cache) == (200, "HIT") and kept.body.startswith("call 1 "), name
        assert ask(stack, path, headers={"If-None-Match": '"v1"'}).status == 304


def test_a_refresh_the_app_answers_uncacheable_drops_the_kept_page(stack: Stack) -> None:
    """An article taken down answers 404: after `stackctl cache refresh`, nobody may still
    get the kept copy for the rest of its max-age. A failing app (500) keeps it: the stale
    copy is what visitors get while the app fails."""
    path = "/article?t=unpublished"
    set_content(stack, "published")
    ask(stack, path)
    assert ask(stack, path).cache == "HIT"
    fail = stack.stack_dir / "fail"
    fail.touch()
    try:
        assert "answered 500" in stackctl("cache", "refresh", path, cwd=stack.stack_dir).stdout
    finally:
        fail.unlink()
    assert ask(stack, path).body.endswith("published")  # still the kept copy
    set_content(stack, "gone")
    try:
        assert "answered 404" in stackctl("cache", "refresh", path, cwd=stack.stack_dir).stdout
        assert ask(stack, path).status == 404
    finally:
        set_content(stack, "one")


def test_a_link_in_place_of_the_cache_directory_is_never_followed_by_purge(
    stack: Stack, tmp_path: Path
) -> None:
    """Every directory from the run directory down is opened without following a link: a
    link put in place of nginx-cache must not make purge delete a file it leads to."""
    path = "/public?t=planted-above"
    ask(stack, path)
    target = cache.load_target(stack.run_dir)
    dirs, name = cache.cache_file(target, path)
    outside = tmp_path / "outside"
    victim = outside / "pages" / dirs[0] / dirs[1] / name
    victim.parent.mkdir(parents=True)
    victim.write_text("not the cache's")
    above = stack.nginx_cache_dir
    moved = above.with_name(above.name + ".moved")
    above.rename(moved)
    above.symlink_to(outside)
    try:
        result = stackctl("cache", "purge", path, cwd=stack.stack_dir, check=False)
        assert result.returncode == EXIT_STACK_ERROR and "Traceback" not in result.stderr
        assert "nothing was deleted" in result.stderr, result.stderr
        assert victim.read_text() == "not the cache's"
    finally:
        above.unlink()
        moved.rename(above)
    assert "purged" in stackctl("cache", "purge", path, cwd=stack.stack_dir).stdout


def test_a_visitor_filling_the_cache_is_held_to_max_size() -> None:
    """Anyone can fill the cache (every query string is a page of its own): NGiNX's cache
    manager keeps it within cache.max_size, dropping the least used pages."""
    site = app_site(CACHE_APP, "cacheapp:application")
    with running_stack(site, "--workers", "2", *CACHED, "--set", "cache.max_size=64k") as running:
        for n in range(60):  # a page takes a 4 KiB block or more: 60 are past 64 KiB
            assert ask(running, f"/public?t=fill-{n}").cache == "MISS"

        def used() -> int:  # as NGiNX counts: the blocks the page files take
            pages = running.cache_pages_dir
            return sum(os.lstat(p).st_blocks * 512 for p in pages.rglob("*") if p.is_file())

        wait_for(lambda: used() <= 64 * 1024, timeout=60, what="the cache back within max_size")
        assert ask(running, "/public?t=fill-59").cache == "HIT"  # the newest are kept


def test_reload_turns_the_cache_on_and_off() -> None:
    """NGiNX re-reads its config (HUP): the refresh socket appears and goes with the cache,
    and with the cache off the commands say so in one line."""
    site = app_site(CACHE_APP, "cacheapp:application")
    path = "/public?t=switch"
    with running_stack(site, "--workers", "2", "--set", "wsgi.autoreload=false") as running:
        for enabled in ("true", "false", "true"):
            said = stackctl("reload", "--set", f"cache.enabled={enabled}", cwd=site).stdout
            assert "NGiNX reloaded" in said, said
            on = enabled == "true"
            wait_for(lambda on=on: (ask(running, path).cache is not None) is on,
                     what=f"the cache {'on' if on else 'off'}")  # fmt: skip
            assert running.cache_socket.exists() is on
            result = stackctl("cache", "purge", path, cwd=site, check=False)
            assert result.returncode == (0 if on else EXIT_STACK_ERROR), result
            assert result.stderr.count("\n") == (0 if on else 1), result.stderr
        assert ask(running, path).cache in ("MISS", "HIT")
