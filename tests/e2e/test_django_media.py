"""A Django project's uploaded files, served by NGiNX alone and safely; and Django's own
deployment checks before a prod stack starts workers."""

from __future__ import annotations

import http.client
import re
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from stackctl import processes
from stackctl.errors import EXIT_STACK_ERROR
from stackctl.render.nginx import MEDIA_CSP
from tests.browser import Browser, chromium_binary
from tests.conftest import free_port, running_stack, stackctl
from tests.e2e.test_django import django_project

pytestmark = pytest.mark.e2e

CALLS = "app-calls.log"

# Every request that reaches Django is written down, so that a test can tell which did.
COUNTING_MIDDLEWARE = f'''\
from pathlib import Path

CALLS = Path(__file__).resolve().parent.parent / "{CALLS}"


def count_calls(get_response):
    def middleware(request):
        with CALLS.open("a") as f:
            f.write(request.path + "\\n")
        return get_response(request)

    return middleware
'''


def media_project(root: Path, *, debug: bool = True) -> Path:
    """Django's startproject (DEBUG = True, as it writes it) with uploads and a call count."""
    project = django_project(root)
    (project / "mysite" / "calls.py").write_text(COUNTING_MIDDLEWARE)
    settings = project / "mysite" / "settings.py"
    settings.write_text(
        settings.read_text()
        + 'MEDIA_URL = "/media/"\nMEDIA_ROOT = BASE_DIR / "uploads"\n'
        + 'MIDDLEWARE = ["mysite.calls.count_calls", *MIDDLEWARE]\n'
        + 'ALLOWED_HOSTS = ["127.0.0.1", "localhost"]\n'
        + f"DEBUG = {debug}\n"
    )
    return project


def set_debug(project: Path, debug: bool) -> None:
    settings = project / "mysite" / "settings.py"
    settings.write_text(re.sub(r"\nDEBUG = \w+\n", f"\nDEBUG = {debug}\n", settings.read_text()))


def secret_key(project: Path) -> str:
    match = re.search(r"SECRET_KEY = '([^']+)'", (project / "mysite" / "settings.py").read_text())
    assert match
    return match.group(1)


def raw_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` exactly as written: urllib would not send ``..`` or ``%2e`` untouched."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_uploaded_files_are_served_by_nginx_as_files_with_safe_headers(short_tmp: Path) -> None:
    project = media_project(short_tmp)
    out = stackctl("init", cwd=project).stdout
    # Only the note that root owns the directory (the tests run as root) may appear.
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert [note for note in notes if "root owns this directory" not in note] == [], out
    assert tomllib.loads((project / "stack.toml").read_text())["media"] == {
        "url": "/media/",
        "dir": "uploads",
    }
    uploads = project / "uploads"
    (uploads / "sub").mkdir(parents=True)
    photo = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    (uploads / "photo.png").write_bytes(photo)
    (uploads / "page.html").write_text("<html><script>alert(document.cookie)</script></html>")
    (uploads / "pic.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    )
    (uploads / ".hidden").write_text("not for the web")
    (uploads / "sub" / ".env").write_text("PASSWORD=x")
    (uploads / "link.txt").symlink_to(project / "stack.toml")

    with running_stack(project, "--workers", "2") as stack:
        port = stack.profile.server.listen.port
        status, headers, body = raw_get(port, "/media/photo.png")
        assert (status, body, headers["Content-Type"]) == (200, photo, "image/png")
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Content-Security-Policy"] == MEDIA_CSP
        assert "Content-Disposition" not in headers
        assert "immutable" not in headers.get("Cache-Control", "")

        status, headers, _ = raw_get(port, "/media/pic.svg")
        assert (status, headers["Content-Type"]) == (200, "image/svg+xml")
        assert headers["Content-Security-Policy"] == MEDIA_CSP
        assert headers["X-Content-Type-Options"] == "nosniff"

        status, headers, _ = raw_get(port, "/media/page.html")
        assert (status, headers["Content-Type"]) == (200, "text/html")
        assert headers["Content-Security-Policy"] == MEDIA_CSP
        assert headers["Content-Disposition"] == "attachment"

        for path in ("/media/.hidden", "/media/sub/.env", "/media/link.txt"):
            status, headers, body = raw_get(port, path)
            assert status in (403, 404), path
            assert headers["Content-Security-Policy"] == MEDIA_CSP, path
            assert b"not for the web" not in body and b"PASSWORD" not in body, path
            assert b"wsgi" not in body, path

        status, headers, _ = raw_get(port, "/media/missing.png")
        assert (status, headers["Content-Security-Policy"]) == (404, MEDIA_CSP)

        secret = (project / ".stackctl" / "secret").read_bytes()
        for path in (
            "/media/../stack.toml",
            "/media/%2e%2e/stack.toml",
            "/media/..%2fstack.toml",
            "/media/sub/../../.stackctl/secret",
            "/media/%2e%2e/%2e%2e/etc/passwd",
        ):
            status, _, body = raw_get(port, path)
            assert status != 200, path
            assert b"wsgi" not in body and secret not in body and b"root:" not in body, path

        # The count works: a page of the app is in it; no /media/ request ever was.
        with urllib.request.urlopen(stack.url() + "admin/login/", timeout=10) as response:
            assert response.status == 200
        calls = (project / CALLS).read_text().splitlines()
        assert "/admin/login/" in calls
        assert [call for call in calls if call.startswith("/media/")] == []


SVG_WITH_SCRIPT = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="20" height="20"><script>'
    'document.documentElement.setAttribute("data-ran", self.origin)</script>'
    '<rect width="20" height="20"/></svg>'
)
RAN = "document.documentElement.getAttribute('data-ran')"


def test_an_uploaded_svg_opened_in_a_browser_runs_no_script(short_tmp: Path) -> None:
    binary = chromium_binary()
    assert binary, "Chromium is needed: apt-get install -y chromium"
    project = media_project(short_tmp)
    stackctl("init", cwd=project)
    (project / "uploads").mkdir()
    (project / "uploads" / "pic.svg").write_text(SVG_WITH_SCRIPT)
    # The control: the same file as a static file, served without the sandbox, runs.
    (project / "collected" / "pic.svg").write_text(SVG_WITH_SCRIPT)
    with running_stack(project, "--workers", "1") as stack, Browser(binary) as browser:
        site = stack.url().rstrip("/")
        browser.open(f"{site}/static/pic.svg")
        assert browser.wait_for(RAN) == site

        browser.open(f"{site}/media/pic.svg")
        browser.wait_for(
            "location.pathname === '/media/pic.svg' && document.readyState === 'complete'"
        )
        assert browser.evaluate(RAN) is None
        # An origin of its own: the site's cookies and storage are out of its reach.
        assert browser.evaluate("self.origin") == "null"


def prod_stack(
    root: Path, no_leaks: Callable[[Path], None], *, debug: bool
) -> tuple[Path, int, tuple[str, ...]]:
    """An initialised project, registered to be stopped, with the command that starts it
    under the prod profile on a free loopback port."""
    project = media_project(root, debug=debug)
    stackctl("init", cwd=project)
    no_leaks(project)
    port = free_port()
    up = ("up", "--detach", "--profile", "prod", "--workers", "2", "--listen", f"127.0.0.1:{port}")
    return project, port, up


def test_prod_refuses_debug_unless_the_profile_allows_it(
    short_tmp: Path, no_leaks: Callable[[Path], None]
) -> None:
    project, port, up = prod_stack(short_tmp, no_leaks, debug=True)

    refused = stackctl(*up, cwd=project, check=False)
    assert refused.returncode == EXIT_STACK_ERROR, refused.stdout + refused.stderr
    settings_file = project / "mysite" / "settings.py"
    assert refused.stderr.startswith(
        f"stackctl: {settings_file}: DEBUG = True in mysite.settings, and profile 'prod' serves "
        "the public (app.deploy_checks, from "
    )
    assert "set app.allow_debug = true in the profile" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert processes.find((project / ".stackctl" / "run").resolve()) == []
    assert not (project / ".stackctl" / "run" / "circusd.pid").exists()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)

    allowed = stackctl(*up, "--set", "app.allow_debug=true", cwd=project)
    assert "Django's deployment checks (check --deploy) for mysite.settings:" in allowed.stdout
    assert "security.W018: You should not have DEBUG set to True in deployment." in allowed.stdout
    assert "DEBUG = True in mysite.settings: allowed by app.allow_debug (from command line)" in (
        allowed.stdout
    )
    assert secret_key(project) not in allowed.stdout + allowed.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=10) as response:
        assert response.status == 200


def not_found_page(port: int) -> bytes:
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/no-such-page/", timeout=10)
    body = answer.value.read()
    answer.value.close()
    assert answer.value.code == 404
    return body


def status_pids(project: Path) -> list[str]:
    return re.findall(r"pid (\d+)", stackctl("status", cwd=project).stdout)


def test_reload_of_a_prod_stack_into_debug_is_refused_and_the_old_workers_serve_on(
    short_tmp: Path, no_leaks: Callable[[Path], None]
) -> None:
    project, port, up_args = prod_stack(short_tmp, no_leaks, debug=False)
    up = stackctl(*up_args, cwd=project)
    # Shown to the user, as Django words them (startproject's settings have no HSTS).
    assert "Django's deployment checks (check --deploy) for mysite.settings:" in up.stdout
    assert "security.W004: You have not set a value for the SECURE_HSTS_SECONDS" in up.stdout
    assert "security.W018" not in up.stdout
    assert secret_key(project) not in up.stdout + up.stderr
    assert b"URLconf" not in not_found_page(port)  # DEBUG's page names the URLconf
    pids = status_pids(project)

    set_debug(project, True)
    refused = stackctl("reload", cwd=project, check=False)
    assert refused.returncode == EXIT_STACK_ERROR, refused.stdout + refused.stderr
    assert "DEBUG = True in mysite.settings" in refused.stderr
    assert "set app.allow_debug = true in the profile" in refused.stderr
    assert status_pids(project) == pids
    assert b"URLconf" not in not_found_page(port)

    # Circus's own reload reads the same files, which the refused reload left as they were.
    set_debug(project, False)
    assert "security.W004" in stackctl("reload", cwd=project).stdout
    assert b"URLconf" not in not_found_page(port)
