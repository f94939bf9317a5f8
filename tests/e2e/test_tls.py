"""HTTPS at the front: HTTP/2, the redirect, certbot's webroot, the security headers, the
headers NGiNX sets itself, wss, the per-client limit, and certificate renewal by reload."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from stackctl import realtime
from stackctl.stack import Stack
from stackctl.tls import make_self_signed
from tests.conftest import (
    REPO,
    app_site,
    data_of,
    free_port,
    running_stack,
    stackctl,
    wait_for,
)

pytestmark = pytest.mark.e2e

ECHO_APP = REPO / "tests" / "apps" / "echoenv.py"
REALTIME_PER_IP = 3
ACME_TOKEN = "k3Y-t0k3n_abc"


def echo_site() -> Path:
    return app_site(ECHO_APP, "echoenv:application")


def tls_args(certificate: str = "self-signed", *more: str) -> list[str]:
    settings = [f"tls.certificate={certificate}", f"tls.listen=127.0.0.1:{free_port()}", *more]
    return ["--workers", "1", *(arg for s in settings for arg in ("--set", s))]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    site = echo_site()
    challenges = site / "acme" / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True)
    (challenges / ACME_TOKEN).write_text("proof")
    more = ["tls.acme_dir=acme", "headers.hsts=31536000",
            f"limits.realtime_per_ip={REALTIME_PER_IP}"]  # fmt: skip
    with running_stack(site, *tls_args("self-signed", *more)) as running:
        yield running


def trusting(stack: Stack) -> ssl.SSLContext:
    """A client that trusts the stack's self-signed certificate, and checks names as usual."""
    return ssl.create_default_context(cafile=stack.stack_dir / ".stackctl" / "tls" / "cert.pem")


def ws_client_tls(stack: Stack) -> ssl.SSLContext:
    """For the websockets library's client: TLS 1.2. Its sync client reads a connection in one
    thread while it writes in another, and over TLS 1.3 (whose session tickets arrive after the
    handshake) that hung about 1 handshake in 60 here, client side: the same requests from one
    thread never did, nor over TLS 1.2. TLS 1.3 is what curl and Chromium use in these tests."""
    context = trusting(stack)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def https_get(stack: Stack, path: str, headers: dict[str, str] | None = None) -> Any:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", stack.profile.tls.listen.port, timeout=10, context=trusting(stack)
    )
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def http_get(stack: Stack, path: str, source: str = "127.0.0.1") -> Any:
    conn = http.client.HTTPConnection(
        "127.0.0.1", stack.profile.server.listen.port, timeout=10, source_address=(source, 0)
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_the_site_is_served_over_http2_with_the_self_signed_certificate(stack: Stack) -> None:
    assert stack.url() == f"https://127.0.0.1:{stack.profile.tls.listen.port}/"
    cert = stack.stack_dir / ".stackctl" / "tls" / "cert.pem"
    result = subprocess.run(
        ["curl", "--http2", "--silent", "--show-error", "--cacert", str(cert),
         "--output", "/dev/null", "--write-out", "%{http_version} %{http_code}", stack.url()],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.stdout == "2 200", result.stderr
    key = stack.stack_dir / ".stackctl" / "tls" / "key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    # `status` checks the site where it is served: over HTTPS.
    status = stackctl("status", cwd=stack.stack_dir)
    assert status.stdout.startswith(stack.url()) and "site      ok" in status.stdout


def test_plain_http_redirects_to_https_except_certbots_challenges(stack: Stack) -> None:
    status, headers, _ = http_get(stack, "/some/page?x=1")
    assert status == 301
    assert headers["Location"] == f"{stack.url()}some/page?x=1"
    status, _, body = http_get(stack, f"/.well-known/acme-challenge/{ACME_TOKEN}")
    assert (status, body) == (200, b"proof")


def test_security_headers_on_app_and_static_answers_without_doubling_the_apps(
    stack: Stack,
) -> None:
    for path in ("/", "/_stackctl/realtime.js", "/no-such-static/../"):
        _, headers, _ = https_get(stack, path)
        assert headers.get_all("X-Content-Type-Options") == ["nosniff"], path
        assert headers.get_all("Referrer-Policy") == ["strict-origin-when-cross-origin"], path
        assert headers.get_all("X-Frame-Options") == ["DENY"], path
        assert headers.get_all("Strict-Transport-Security") == ["max-age=31536000"], path
    _, headers, _ = https_get(stack, "/own-headers")
    assert headers.get_all("X-Frame-Options") == ["SAMEORIGIN"]


def test_the_app_sees_forwarded_headers_from_the_connection_and_no_proxy_header(
    stack: Stack,
) -> None:
    spoofed = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http",
               "X-Forwarded-Host": "evil.example", "Proxy": "http://203.0.113.9:3128"}  # fmt: skip
    status, _, body = https_get(stack, "/", spoofed)
    environ = json.loads(body)
    assert status == 200
    assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert environ["HTTP_X_FORWARDED_PROTO"] == "https"
    assert environ["HTTP_X_FORWARDED_HOST"] == "127.0.0.1"
    assert "HTTP_PROXY" not in environ
    assert environ["HTTPS"] == "on"
    assert environ["wsgi.url_scheme"] == "https"  # Django's request.is_secure(), CSRF checks


def wss_url(stack: Stack, channel: str, token: str) -> str:
    return stack.url().replace("https", "wss", 1) + f"ws/{channel}?token={token}"


def a_token(stack: Stack) -> str:
    return realtime.token("alice", key=stack.secret_file.read_bytes().strip())


def test_a_wss_client_with_a_token_receives_a_published_message(stack: Stack) -> None:
    with connect(wss_url(stack, "news", a_token(stack)), ssl=ws_client_tls(stack)) as ws:
        realtime.publish("news", {"n": 1}, url=stack.redis_url)
        assert data_of(ws.recv(timeout=10)) == {"n": 1}


def curl_h2(stack: Stack, *args: str) -> list[str]:
    cert = stack.stack_dir / ".stackctl" / "tls" / "cert.pem"
    return ["curl", "--http2", "--silent", "--show-error", "--cacert", str(cert), *args]


def test_event_streams_and_long_polls_are_served_over_http2(stack: Stack) -> None:
    realtime.publish("feed", {"n": 2}, url=stack.redis_url)
    query = f"?since=0-0&token={a_token(stack)}"
    poll = subprocess.run(
        curl_h2(stack, "--write-out", "\n%{http_version}", f"{stack.url()}poll/feed{query}"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    answer, version = poll.stdout.rsplit("\n", 1)
    assert version == "2", poll.stderr
    assert [m["data"] for m in json.loads(answer)["messages"]] == [{"n": 2}]
    # An event stream never ends by itself: read until the replayed message arrives.
    with subprocess.Popen(
        curl_h2(stack, "--include", "--no-buffer", "--max-time", "30",
                f"{stack.url()}events/feed{query}"),
        stdout=subprocess.PIPE, text=True,
    ) as stream:  # fmt: skip
        try:
            assert stream.stdout is not None
            assert stream.stdout.readline().startswith("HTTP/2 200")
            lines = iter(stream.stdout.readline, "")
            data = next(line for line in lines if line.startswith("data:"))
        finally:
            stream.kill()
    assert json.loads(data.removeprefix("data:"))["data"] == {"n": 2}


# The limits leave this host's own address alone (limits.exempt): a test client that must be
# counted comes from another loopback address, which Linux routes to 127.0.0.1 all the same.
ANOTHER_CLIENT = "127.0.0.2"


def from_address(source: str, stack: Stack) -> socket.socket:
    address = ("127.0.0.1", stack.front.port)
    return socket.create_connection(address, timeout=10, source_address=(source, 0))


def test_one_client_ip_may_hold_only_so_many_realtime_connections(stack: Stack) -> None:
    url = wss_url(stack, "news", a_token(stack))

    def client(source: str = ANOTHER_CLIENT) -> Any:
        return connect(url, ssl=ws_client_tls(stack), sock=from_address(source, stack))

    with ExitStack() as held:
        for _ in range(REALTIME_PER_IP):
            held.enter_context(client())
        with pytest.raises(InvalidStatus) as refused:
            client()
        assert refused.value.response.status_code == 429
        # This host's own clients are not counted.
        for _ in range(REALTIME_PER_IP + 1):
            held.enter_context(client("127.0.0.1"))
    # Once they are closed, the client may connect again.
    with client() as again:
        again.ping().wait(10)


# --- a certificate from files, renewed in place -----------------------------------------------


def write_pair(site: Path, cert_pem: bytes, key_pem: bytes) -> None:
    (site / "certs").mkdir(exist_ok=True)
    (site / "certs" / "site.key").write_bytes(key_pem)
    (site / "certs" / "site.pem").write_bytes(cert_pem)


def served_certificate(stack: Stack) -> str:
    return ssl.get_server_certificate(("127.0.0.1", stack.profile.tls.listen.port), timeout=10)


def normal(pem: bytes) -> str:
    return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(pem.decode()))


def weak_pair() -> tuple[bytes, bytes]:
    """A certificate that parses and matches its key, but that OpenSSL's default security
    level refuses to load (a 1024-bit RSA key): only `nginx -t` finds out."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    first, _ = make_self_signed(["localhost"], ["127.0.0.1"])
    template = x509.load_pem_x509_certificate(first)
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    builder = (
        x509.CertificateBuilder()
        .subject_name(template.subject)
        .issuer_name(template.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(template.not_valid_before_utc)
        .not_valid_after(template.not_valid_after_utc)
    )
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_reload_serves_a_renewed_certificate_and_refuses_a_broken_one() -> None:
    site = echo_site()
    first = make_self_signed(["localhost"], ["127.0.0.1"])
    write_pair(site, *first)
    args = tls_args("certs/site.pem", "tls.key=certs/site.key")
    with running_stack(site, *args) as stack:
        assert served_certificate(stack) == normal(first[0])

        renewed = make_self_signed(["localhost"], ["127.0.0.1"])
        write_pair(site, *renewed)
        done = stackctl("reload", cwd=site)
        assert "NGiNX reloaded its config" in done.stdout
        assert served_certificate(stack) == normal(renewed[0])

        other_key = make_self_signed(["localhost"], [])[1]
        write_pair(site, renewed[0], other_key)
        refused = stackctl("reload", cwd=site, check=False)
        assert refused.returncode != 0
        assert "tls.key: 'certs/site.key'" in refused.stderr
        assert "is not the private key of" in refused.stderr
        assert served_certificate(stack) == normal(renewed[0])

        write_pair(site, *weak_pair())
        refused = stackctl("reload", cwd=site, check=False)
        assert refused.returncode != 0
        assert "nginx -t" in refused.stderr
        assert "tls.certificate" in refused.stderr  # the hint says which setting to look at
        assert served_certificate(stack) == normal(renewed[0])

        # Whatever the files hold by now, the stack can be stopped.
        write_pair(site, b"", b"")
        assert "stack stopped" in stackctl("down", cwd=site).stdout


# --- the optional request rate limit --------------------------------------------------------------


def test_requests_are_not_rate_limited_by_default(stack: Stack) -> None:
    assert {https_get(stack, "/")[0] for _ in range(30)} == {200}


def test_a_request_rate_limit_answers_429_past_its_burst_and_spares_static_files() -> None:
    limits = ["limits.requests_per_second=1", "limits.burst=2"]
    with running_stack(
        echo_site(), "--workers", "1", *(a for s in limits for a in ("--set", s))
    ) as stack:
        wait_for(lambda: http_get(stack, "/", ANOTHER_CLIENT)[0] == 200, what="a request")
        app = [http_get(stack, "/", ANOTHER_CLIENT)[0] for _ in range(10)]
        static = [http_get(stack, "/_stackctl/realtime.js", ANOTHER_CLIENT)[0] for _ in range(10)]
        this_host = [http_get(stack, "/")[0] for _ in range(10)]
    assert set(app) <= {200, 429} and app[-1] == 429, app
    assert set(static) == {200}
    assert set(this_host) == {200}


def test_reload_turns_https_on_for_a_plain_stack_that_served_certbots_challenge() -> None:
    site = echo_site()
    challenges = site / "acme" / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True)
    (challenges / ACME_TOKEN).write_text("proof")
    with running_stack(site, "--workers", "1", "--set", "tls.acme_dir=acme") as plain:
        # Before any certificate: the challenge is served, the rest goes to the app.
        assert http_get(plain, f"/.well-known/acme-challenge/{ACME_TOKEN}")[::2] == (200, b"proof")
        assert http_get(plain, "/")[0] == 200
        tls_port = free_port()
        settings = ["tls.certificate=self-signed", f"tls.listen=127.0.0.1:{tls_port}"]
        done = stackctl("reload", *(a for s in settings for a in ("--set", s)), cwd=site)
        assert "NGiNX reloaded its config" in done.stdout
        status, headers, _ = http_get(plain, "/")
        assert (status, headers["Location"]) == (301, f"https://127.0.0.1:{tls_port}/")
        assert http_get(plain, f"/.well-known/acme-challenge/{ACME_TOKEN}")[::2] == (200, b"proof")
        context = ssl.create_default_context(cafile=site / ".stackctl" / "tls" / "cert.pem")
        conn = http.client.HTTPSConnection("127.0.0.1", tls_port, timeout=10, context=context)
        try:
            conn.request("GET", "/")
            assert conn.getresponse().status == 200
        finally:
            conn.close()


def test_the_redirect_to_https_names_only_the_sites_own_hosts() -> None:
    names = "server.names=localhost www.localhost *.shop.localhost"
    with running_stack(echo_site(), *tls_args("self-signed", names)) as stack:
        port = stack.profile.tls.listen.port

        def location(host: str) -> str:
            conn = http.client.HTTPConnection("127.0.0.1", stack.profile.server.listen.port,
                                              timeout=10)  # fmt: skip
            try:
                conn.request("GET", "/a?b=1", headers={"Host": host})
                response = conn.getresponse()
                assert response.status == 301
                return str(response.headers["Location"])
            finally:
                conn.close()

        assert location("www.localhost") == f"https://www.localhost:{port}/a?b=1"
        assert location("x.shop.localhost") == f"https://x.shop.localhost:{port}/a?b=1"
        # A made-up Host (a cache in front would keep the answer for everyone) gets the site.
        assert location("evil.example") == f"https://localhost:{port}/a?b=1"
        assert location("a@evil.example") == f"https://localhost:{port}/a?b=1"
