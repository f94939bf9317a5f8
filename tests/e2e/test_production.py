"""The production setup as the README describes it, all at once: root starts the prod profile
for a service user, with HTTPS (a self-signed certificate), uploaded files and static files,
and a client sees what a visitor of a real server would see.

Each part has its own tests elsewhere (test_service_user, test_tls, test_django_media,
test_static_files); this one checks that they hold together, as the issue's server recipe
needs them to.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from websockets.sync.client import connect

from stackctl import processes, realtime
from stackctl.stack import Stack
from stackctl.supervisor import call
from stackctl.users import ServiceUser
from tests.conftest import data_of, free_port
from tests.service_users import new_site, run, running_site

pytestmark = pytest.mark.e2e

PHOTO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def server(python: Path, service_user: ServiceUser) -> Iterator[Stack]:
    """The demo in root's directory, as the README's server recipe sets it up: the prod profile,
    server.user, a self-signed certificate, uploads in media/ (the service user's)."""
    site = new_site(python, None)
    media = site / "media"
    media.mkdir()
    (media / "photo.png").write_bytes(PHOTO)
    (media / "page.html").write_text("<html><script>alert(document.cookie)</script></html>")
    shutil.chown(media, service_user.name, service_user.group)
    (site / "static" / ".env").write_text("SECRET=never served\n")
    with running_site(python, site, "--profile", "prod",
                      "--listen", f"127.0.0.1:{free_port()}", "--workers", "2",
                      "--set", f"server.user={service_user.name}",
                      "--set", "tls.certificate=self-signed",
                      "--set", f"tls.listen=127.0.0.1:{free_port()}",
                      "--set", "media.dir=media") as stack:  # fmt: skip
        yield stack


def certificate(stack: Stack) -> Path:
    return stack.private_dir / "tls" / "cert.pem"


def curl(stack: Stack, url: str, *options: str) -> subprocess.CompletedProcess[str]:
    """curl, trusting the stack's certificate: --write-out's fields, one per line."""
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--cacert", str(certificate(stack)),
         "--output", "/dev/null", *options, url],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip


def https(stack: Stack, path: str) -> tuple[int, object, bytes]:
    context = ssl.create_default_context(cafile=certificate(stack))
    try:
        with urllib.request.urlopen(stack.url() + path.lstrip("/"), context=context,
                                    timeout=10) as answer:  # fmt: skip
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, b""


def test_only_circusd_and_the_nginx_master_run_as_root(
    server: Stack, service_user: ServiceUser
) -> None:
    circusd = processes.circusd(server.run_dir)
    assert circusd is not None
    (master,) = call(server, "list", name="nginx")["pids"]
    pools = [int(pid) for name in ("wsgi", "ws", "redis")
             for pid in call(server, "list", name=name)["pids"]]  # fmt: skip
    of_the_user = [*(child.pid for child in psutil.Process(int(master)).children()), *pools]
    shown = subprocess.run(
        ["ps", "-o", "pid=,user=", "-p", ",".join(map(str, [circusd.pid, master, *of_the_user]))],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    users = dict(line.split() for line in shown.splitlines())
    assert users.pop(str(circusd.pid)) == "root" and users.pop(str(master)) == "root"
    assert len(users) == len(of_the_user) >= 5  # NGiNX's workers, 2 wsgi, ws, redis
    assert set(users.values()) == {service_user.name}


def test_the_page_comes_over_http2_and_plain_http_redirects_to_it(server: Stack) -> None:
    assert server.url().startswith("https://")
    assert curl(server, server.url(), "--http2", "--write-out", "%{http_version} %{http_code}"
                ).stdout == "2 200"  # fmt: skip
    plain = f"http://127.0.0.1:{server.profile.server.listen.port}/some/page?x=1"
    followed = curl(server, plain, "--http2", "--location",
                    "--write-out", "%{num_redirects} %{url_effective} %{http_version}")  # fmt: skip
    assert followed.stdout == f"1 {server.url()}some/page?x=1 2"


def test_answers_carry_the_security_headers(server: Stack) -> None:
    for path in ("/", "/static/board.css"):
        status, headers, _ = https(server, path)
        assert status == 200, path
        assert headers.get_all("Strict-Transport-Security") == ["max-age=31536000"], path
        assert headers.get_all("X-Content-Type-Options") == ["nosniff"], path
        assert headers.get_all("X-Frame-Options") == ["DENY"], path
        assert headers.get_all("Referrer-Policy") == ["strict-origin-when-cross-origin"], path


def test_a_wss_client_with_a_token_gets_a_message_and_no_log_holds_the_token(
    server: Stack, python: Path
) -> None:
    token = realtime.token("alice", key=server.secret_file.read_bytes().strip())
    url = server.url().replace("https", "wss", 1) + f"ws/board?token={token}"
    context = ssl.create_default_context(cafile=certificate(server))
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # see test_tls.ws_client_tls
    with connect(url, ssl=context, open_timeout=10) as ws:
        run(python, "publish", "board", "to the wss client", cwd=server.stack_dir)
        assert data_of(ws.recv(timeout=10)) == "to the wss client"
    logs = [path for path in server.log_dir.rglob("*") if path.is_file()]
    assert any(path.name == "nginx-access.log" for path in logs)
    assert [path for path in logs if token.encode() in path.read_bytes()] == []


def test_dotfiles_under_static_are_not_found(server: Stack) -> None:
    assert https(server, "/static/.env")[0] == 404
    assert https(server, "/static/board.js")[0] == 200


def test_an_uploaded_file_is_served_with_its_safe_headers(server: Stack) -> None:
    status, headers, body = https(server, "/media/photo.png")
    assert (status, body) == (200, PHOTO)
    assert headers["Content-Type"] == "image/png"
    assert headers.get_all("X-Content-Type-Options") == ["nosniff"]
    assert headers["Content-Security-Policy"].startswith("sandbox;")
    assert headers.get_all("Strict-Transport-Security") == ["max-age=31536000"]
    status, headers, _ = https(server, "/media/page.html")
    assert status == 200 and headers["Content-Disposition"] == "attachment"
