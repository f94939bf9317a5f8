"""The page cache attacked from outside, on the real stack: visitors who would get another
visitor's page, or make every visitor get a page built for a host of their choosing, and apps
whose answers say less than "public"."""

from __future__ import annotations

import socket
import zlib
from collections.abc import Iterator

import pytest

from stackctl.stack import Stack
from tests.conftest import REPO, app_site, running_stack
from tests.e2e.test_cache import CACHED, ask, calls

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
