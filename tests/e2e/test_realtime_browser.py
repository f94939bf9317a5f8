"""realtime.js in a real browser (headless Chromium) against a real stack: what only a page
can show, such as coming back with a fresh token when the server ends an expired one."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from stackctl import realtime
from stackctl.stack import Stack
from tests.browser import Browser, chromium_binary
from tests.conftest import running_stack, short_dir, stackctl

pytestmark = pytest.mark.e2e

TOKEN_MAX_AGE = 3

FOLLOW_ALICE = """
window.got = []; window.statuses = []; window.asked = 0;
window.feed = new StackctlFeed(["user:alice"], {
  token: async () => { window.asked += 1; return window.freshToken; },
  onmessage: (data) => window.got.push(data),
  onstatus: (status) => window.statuses.push(status),
});
"""


def test_a_page_comes_back_with_a_fresh_token_when_its_token_expires() -> None:
    binary = chromium_binary()
    assert binary, "Chromium is needed: apt-get install -y chromium"
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    setting = f"ws.token_max_age={TOKEN_MAX_AGE}"
    with (
        running_stack(root / "site", "--workers", "1", "--set", setting) as stack,
        Browser(binary) as browser,
    ):
        key = stack.secret_file.read_bytes().strip()

        def hand_out_a_fresh_token() -> None:  # what the page's token endpoint would do
            browser.evaluate(f"window.freshToken = {json.dumps(realtime.token('alice', key=key))}")

        browser.open(stack.url())
        browser.wait_for("typeof StackctlFeed === 'function'")
        hand_out_a_fresh_token()
        browser.evaluate(FOLLOW_ALICE)
        browser.wait_for("window.statuses.includes('open')")
        deadline = time.monotonic() + TOKEN_MAX_AGE + 10
        while time.monotonic() < deadline and not browser.evaluate(
            "window.statuses.indexOf('open', window.statuses.indexOf('token expired; "
            "reconnecting')) > 0"
        ):
            hand_out_a_fresh_token()
            time.sleep(0.3)
        statuses = browser.evaluate("window.statuses")
        assert "token expired; reconnecting" in statuses, statuses
        assert statuses[-1] == "open", statuses  # back at once, not after failed tries
        assert browser.evaluate("window.asked") >= 2
        realtime.publish_user("alice", "still yours", url=stack.redis_url)
        browser.wait_for("window.got.includes('still yours')")


@contextmanager
def demo_in_browser() -> Iterator[tuple[Stack, Browser]]:
    """A demo stack of its own, and Chromium to open its page."""
    binary = chromium_binary()
    assert binary, "Chromium is needed: apt-get install -y chromium"
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    with running_stack(root / "site", "--workers", "1") as stack, Browser(binary) as browser:
        yield stack, browser


def test_the_demo_board_greets_a_new_visitor_with_what_was_said_before() -> None:
    with demo_in_browser() as (stack, browser):
        for text in ("first", "second"):
            post = urllib.request.Request(stack.url() + "post", data=f"message={text}".encode(),
                                          headers={"Accept": "application/json"})  # fmt: skip
            with urllib.request.urlopen(post, timeout=10) as answer:
                assert answer.status == 200
        browser.open(stack.url())  # opened after both were posted
        shown = "Array.from(document.querySelectorAll('#board li')).map(li => li.textContent)"
        browser.wait_for(f"{shown}.length === 2")
        assert browser.evaluate(shown) == ["second", "first"]  # newest first
        realtime.publish("board", {"text": "third"}, url=stack.redis_url)
        browser.wait_for(f"{shown}[0] === 'third'")
        assert browser.evaluate(shown) == ["third", "second", "first"]  # live, after the history


def test_the_demo_board_shows_a_slow_jobs_progress_live() -> None:
    with demo_in_browser() as (stack, browser):
        browser.open(stack.url())
        browser.wait_for("document.getElementById('state').textContent === 'live'")
        browser.evaluate("document.querySelector('#job button').click()")
        bar = "document.querySelector('#board li.job progress')"
        browser.wait_for(f"{bar} !== null && {bar}.value > 0 && {bar}.value < 100")  # live
        browser.wait_for(f"{bar}.value === 100")
        text = browser.evaluate("document.querySelector('#board li.job').textContent")
        assert text.startswith(" slow job ") and text.endswith(": 100 %")
