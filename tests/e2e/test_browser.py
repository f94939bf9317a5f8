"""The demo page in a real browser: headless Chromium, the bundled realtime.js, the real stack."""

from __future__ import annotations

import ssl
import urllib.parse
import urllib.request

import pytest

from tests.browser import Browser, chromium_binary
from tests.conftest import REPO, free_port, running_stack, short_dir, stackctl

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO / "tests" / "artifacts"
BOARD_ITEMS = "Array.from(document.querySelectorAll('#board li')).map(li => li.textContent)"


def post(url: str, message: str, context: ssl.SSLContext | None = None) -> None:
    body = urllib.parse.urlencode({"message": message}).encode()
    headers = {"Accept": "application/json"}
    request = urllib.request.Request(url + "post", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        assert response.status == 200


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_message_posted_elsewhere_appears_in_the_page_even_across_a_worker_restart(
    scheme: str,
) -> None:
    binary = chromium_binary()
    # The test job installs Chromium (scripts/bootstrap.sh); a machine without it fails here
    # rather than skipping silently.
    assert binary, "Chromium is needed: apt-get install -y chromium"
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    tls = ["--set", "tls.certificate=self-signed", "--set", f"tls.listen=127.0.0.1:{free_port()}"]
    args = ["--workers", "1", *(tls if scheme == "https" else [])]
    with running_stack(root / "site", *args) as stack, Browser(binary) as browser:
        url = stack.url()
        assert url.startswith(f"{scheme}://")
        # Over https the page and its websocket (wss, realtime.js follows the page's scheme)
        # use the stack's self-signed certificate, which the browser is told to accept.
        browser.call("Security.setIgnoreCertificateErrors", ignore=True)
        cert = stack.stack_dir / ".stackctl" / "tls" / "cert.pem"
        context = ssl.create_default_context(cafile=cert) if scheme == "https" else None
        browser.open(url)
        browser.wait_for("document.getElementById('state').textContent === 'live'")

        post(url, "hello from another client", context)
        browser.wait_for(f"{BOARD_ITEMS}.includes('hello from another client')")

        # The worker restarts (close 1012); a message posted meanwhile is not lost: the page
        # reconnects by itself and resumes from the last id it saw.
        stackctl("reload", "ws", cwd=stack.stack_dir)
        post(url, "posted during the restart", context)
        browser.wait_for(f"{BOARD_ITEMS}.includes('posted during the restart')")
        browser.wait_for("document.getElementById('state').textContent === 'live'")
        assert browser.evaluate(BOARD_ITEMS) == [
            "posted during the restart",
            "hello from another client",
        ]
        png = browser.screenshot(ARTIFACTS / f"browser-demo-{scheme}.png")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
