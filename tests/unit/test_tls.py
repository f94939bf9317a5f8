"""HTTPS settings, certificate checks and the NGiNX config they render (no processes)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import stat
import subprocess
import threading
from contextlib import suppress
from pathlib import Path

import pytest
from cryptography import x509

from stackctl import generation, profile
from stackctl.errors import StackError
from stackctl.render import nginx
from stackctl.stack import Stack, checked_tls, plan
from stackctl.tls import (
    Stapling,
    check_pair,
    ensure_self_signed,
    make_self_signed,
    san_names,
    self_signed_paths,
    stapling,
)
from tests.unit.test_render import NGINX, PROGRAMS

APP = '[app]\nwsgi = "hello:application"\n'


def load(site: Path, *overrides: str, stack_toml: str = "") -> profile.Profile:
    (site / "stack.toml").write_text(APP + stack_toml)
    pairs = [profile.parse_override(o) for o in overrides]
    return profile.load(site, "dev", pairs, hostnames=["h"])


def planned(site: Path, *overrides: str, stack_toml: str = "") -> Stack:
    (site / "static").mkdir(exist_ok=True)
    return plan(load(site, *overrides, stack_toml=stack_toml), PROGRAMS)


def conf(stack: Stack) -> dict[str, str]:
    return {f.name: f.content for f in generation.render_all(stack)}


def write_pair(site: Path, pem: tuple[bytes, bytes]) -> None:
    (site / "site.pem").write_bytes(pem[0])
    (site / "site.key").write_bytes(pem[1])


FILE_CERT = ("tls.certificate=site.pem", "tls.key=site.key", "tls.listen=127.0.0.1:8443")


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tls.certificate=site.pem"], "tls.key: required when tls.certificate is a file"),
        (["tls.certificate=self-signed", "tls.key=k.pem"], 'tls.key: must be ""'),
        (["tls.key=k.pem"], 'tls.certificate is "" (no HTTPS)'),
        (["tls.certificate=a;b.pem"], "tls.certificate: expected the path of a PEM"),
        (["tls.acme_dir=/var/www"], "tls.acme_dir: expected a directory inside the stack"),
        (["tls.acme_dir=../x"], "tls.acme_dir: expected a directory inside the stack"),
        (["headers.frame_options=ALLOW-FROM x"], "headers.frame_options: expected one of"),
        (["headers.referrer_policy=nope"], "headers.referrer_policy: expected one of"),
        (["limits.realtime_per_ip=0"], "limits.realtime_per_ip: expected a positive integer"),
        (['limits.exempt=["10.0.0.0/8", "host"]'], "limits.exempt: expected a list of IP"),
        (
            ["tls.certificate=self-signed", "tls.listen=127.0.0.1:8000"],
            "tls.listen: '127.0.0.1:8000' uses the port of server.listen",
        ),
    ],
)
def test_tls_settings_are_refused_with_the_key_and_what_is_allowed(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(StackError, match=re.escape(message)):
        load(tmp_path, *overrides)


def test_prod_serves_https_on_443_and_dev_sends_no_hsts(tmp_path: Path) -> None:
    (tmp_path / "stack.toml").write_text(APP)
    prod = profile.load(tmp_path, "prod", [], hostnames=["h"])
    dev = profile.load(tmp_path, "dev", [], hostnames=["h"])
    assert str(prod.tls.listen) == "0.0.0.0:443"
    assert (prod.headers.hsts, dev.headers.hsts) == (31536000, 0)
    assert prod.tls.certificate == dev.tls.certificate == ""  # HTTPS needs a certificate first


def test_a_key_where_nginx_serves_files_is_refused(tmp_path: Path) -> None:
    settings = ("tls.certificate=static/site.pem", "tls.key=static/site.key")
    with pytest.raises(StackError, match=r"tls\.key: 'static/site\.key' .* inside static\.dir"):
        planned(tmp_path, *settings)


def test_acme_dir_may_not_overlap_the_private_directories(tmp_path: Path) -> None:
    with pytest.raises(
        StackError, match=r"tls\.acme_dir: '\.stackctl/run' .* is inside the stack's \.stackctl"
    ):
        planned(tmp_path, "tls.certificate=self-signed", "tls.acme_dir=.stackctl/run")


# --- certificates -------------------------------------------------------------------------------


def test_self_signed_names_the_server_names_and_this_host() -> None:
    dns, ips = san_names("example.com _ *.example.org .example.net example.*")
    assert dns == ["example.com", "*.example.org", "example.net", "*.example.net", "localhost"]
    assert ips == ["127.0.0.1", "::1"]


def test_self_signed_is_made_private_then_kept_until_the_names_change(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, "example.com")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.parent.stat().st_mode) == 0o700
    first = cert.read_bytes()
    assert ensure_self_signed(tmp_path, "example.com") == (cert, key)
    assert cert.read_bytes() == first  # reused
    ensure_self_signed(tmp_path, "example.org")
    names = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert names.value.get_values_for_type(x509.DNSName) == ["example.org", "localhost"]


def test_self_signed_near_its_end_is_made_anew(tmp_path: Path) -> None:
    cert, key = self_signed_paths(tmp_path)
    cert.parent.mkdir(parents=True)
    dns, ips = san_names("_")
    old = make_self_signed(dns, ips, days=10)
    cert.write_bytes(old[0])
    key.write_bytes(old[1])
    ensure_self_signed(tmp_path, "_")
    assert cert.read_bytes() != old[0]
    end = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    assert end - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=300)


def test_a_link_planted_for_the_new_key_is_not_followed(tmp_path: Path) -> None:
    _, key = self_signed_paths(tmp_path)
    key.parent.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (key.parent / ".key.pem.new").symlink_to(victim)
    ensure_self_signed(tmp_path, "_")
    assert victim.read_text() == "untouched"
    assert b"PRIVATE KEY" in key.read_bytes()


def test_a_linked_tls_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".stackctl").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / ".stackctl" / "tls")
    with pytest.raises(StackError, match="symbolic link"):
        ensure_self_signed(tmp_path, "_")


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path: Path) -> None:
    write_pair(tmp_path, (make_self_signed(["a.test"], [])[0], make_self_signed(["a.test"], [])[1]))
    with pytest.raises(StackError, match=r"tls\.key: 'site\.key'.* is not the private key of"):
        conf(planned(tmp_path, *FILE_CERT))


def test_missing_unreadable_and_expired_certificates_are_named(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"tls\.certificate: 'site\.pem': .*site\.pem: no such"):
        conf(planned(tmp_path, *FILE_CERT))
    write_pair(tmp_path, (b"not pem", make_self_signed(["a.test"], [])[1]))
    with pytest.raises(StackError, match="holds no PEM certificate"):
        conf(planned(tmp_path, *FILE_CERT))
    write_pair(tmp_path, make_self_signed(["a.test"], [], days=-0.001))
    with pytest.raises(StackError, match=r"valid from .* not now; renew it"):
        conf(planned(tmp_path, *FILE_CERT))


def test_a_fifo_or_a_huge_file_as_certificate_is_refused_without_waiting(tmp_path: Path) -> None:
    """A FIFO hung `up` and `reload` in open(), waiting for a writer; /dev/zero or a huge
    file was read whole into memory (/dev/zero: until the kernel killed stackctl)."""
    key = make_self_signed(["a.test"], [])[1]
    write_pair(tmp_path, (b"", key))
    (tmp_path / "site.pem").unlink()
    os.mkfifo(tmp_path / "site.pem")
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            conf(planned(tmp_path, *FILE_CERT))
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            outcome.append(e)

    reader = threading.Thread(target=attempt)
    reader.start()
    reader.join(timeout=20)
    waited = reader.is_alive()
    if waited:  # the old way: blocked in open(); a writer that closes at once frees it
        with suppress(OSError):
            os.close(os.open(tmp_path / "site.pem", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=20)
    assert not waited, "reading a FIFO as the certificate waited for a writer"
    assert isinstance(outcome[0], StackError)
    assert re.search(r"tls\.certificate: 'site\.pem': .*site\.pem: is a FIFO, socket or "
                     r"device, not a PEM file", str(outcome[0])), outcome[0]  # fmt: skip
    (tmp_path / "site.pem").unlink()
    with (tmp_path / "site.pem").open("wb") as f:
        f.truncate(64 << 20)  # sparse: no disk used
    with pytest.raises(StackError, match=r"site\.pem: is 67108864 bytes, too large for a PEM"):
        conf(planned(tmp_path, *FILE_CERT))


def test_stopping_or_reading_a_stack_does_not_read_its_certificate(tmp_path: Path) -> None:
    stack = planned(tmp_path, *FILE_CERT)  # what `down` and `status` do: no such files here
    assert stack.url() == "https://127.0.0.1:8443/"
    assert not (tmp_path / ".stackctl" / "tls").exists()


def chain_with_ocsp() -> tuple[bytes, bytes, bytes]:
    """A CA, and a certificate it signed that names an OCSP responder: (leaf, CA, key)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def issued(subject: str, public: object, **extensions: x509.ExtensionType) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name("Test CA"))
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
        )  # fmt: skip
        for extension in extensions.values():
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    responder = x509.AccessDescription(
        AuthorityInformationAccessOID.OCSP,
        x509.UniformResourceIdentifier("http://ocsp.example.test"),
    )
    leaf = issued("a.test", key.public_key(), aia=x509.AuthorityInformationAccess([responder]))
    ca = issued("Test CA", ca_key.public_key())
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return leaf.public_bytes(pem), ca.public_bytes(pem), key_pem


def test_stapling_needs_a_responder_and_the_issuer_in_the_file(tmp_path: Path) -> None:
    leaf, ca, key = chain_with_ocsp()
    write_pair(tmp_path, (leaf, key))
    assert not check_pair("c", tmp_path / "site.pem", "k", tmp_path / "site.key").ocsp
    write_pair(tmp_path, (leaf + ca, key))
    assert check_pair("c", tmp_path / "site.pem", "k", tmp_path / "site.key").ocsp


def test_the_digest_follows_the_files(tmp_path: Path) -> None:
    write_pair(tmp_path, make_self_signed(["a.test"], []))
    first = check_pair("c", tmp_path / "site.pem", "k", tmp_path / "site.key")
    write_pair(tmp_path, make_self_signed(["a.test"], []))
    second = check_pair("c", tmp_path / "site.pem", "k", tmp_path / "site.key")
    assert first.digest != second.digest and not first.ocsp


# --- the NGiNX config ---------------------------------------------------------------------------


def test_without_tls_one_plain_server_and_no_hsts(tmp_path: Path) -> None:
    files = conf(planned(tmp_path, "headers.hsts=31536000"))
    assert files["nginx.conf"].count("server {") == 1
    assert "ssl" not in files["nginx.conf"]
    assert "Strict-Transport-Security" not in files["security_headers.conf"]


def test_with_tls_http2_mozilla_settings_and_a_redirecting_plain_server(tmp_path: Path) -> None:
    stack = planned(tmp_path, "tls.certificate=self-signed", "tls.acme_dir=acme")
    text = conf(stack)["nginx.conf"]
    assert "listen 127.0.0.1:8443 ssl http2;" in text
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text
    assert f"ssl_ciphers {nginx.MOZILLA_INTERMEDIATE_CIPHERS};" in text
    assert "ssl_session_tickets off;" in text and "ssl_prefer_server_ciphers off;" in text
    assert "ssl_stapling" not in text  # a self-signed certificate names no OCSP responder
    assert "return 301 https://$host:8443$request_uri;" in text
    assert f'root "{tmp_path}/acme/";' in text
    checked = checked_tls(stack).tls
    assert checked is not None and checked.digest in text
    assert stack.url() == "https://127.0.0.1:8443/"


def test_certbots_challenges_are_served_before_https_is_on(tmp_path: Path) -> None:
    text = conf(planned(tmp_path, "tls.acme_dir=acme"))["nginx.conf"]
    assert "location ^~ /.well-known/acme-challenge/ {" in text
    assert f'root "{tmp_path}/acme/";' in text and "ssl" not in text


def test_port_443_is_left_out_of_the_redirect(tmp_path: Path) -> None:
    stack = planned(tmp_path, "tls.certificate=self-signed", "tls.listen=127.0.0.1:443")
    assert "return 301 https://$host$request_uri;" in conf(stack)["nginx.conf"]


def test_stapling_only_with_a_responder_a_resolver_and_the_cas(tmp_path: Path) -> None:
    resolv = "# comment\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver 2001:db8::1\n"
    cas = tmp_path / "cas.pem"
    assert stapling(True, resolv, cas) is None  # no CA bundle
    cas.write_text("")
    assert stapling(True, resolv, cas) == Stapling("192.0.2.53 [2001:db8::1]", cas)
    assert stapling(True, "", cas) is None
    assert stapling(False, resolv, cas) is None


def test_stapling_rendered_when_the_certificate_allows_it(tmp_path: Path) -> None:
    stack = planned(tmp_path, "tls.certificate=self-signed")
    assert stack.tls is not None
    assert "ssl_stapling" not in conf(stack)["nginx.conf"]
    on = Stapling("192.0.2.53", tmp_path / "cas.pem")
    with_ocsp = dataclasses.replace(stack, tls=dataclasses.replace(stack.tls, stapling=on))
    text = nginx.render(with_ocsp)[0].content
    assert "ssl_stapling on;" in text and "ssl_stapling_verify on;" in text
    assert f'ssl_trusted_certificate "{tmp_path}/cas.pem";' in text
    assert "resolver 192.0.2.53;" in text


def test_security_headers_forwarded_headers_and_limits(tmp_path: Path) -> None:
    stack = planned(
        tmp_path,
        "tls.certificate=self-signed",
        "headers.hsts=600",
        "headers.frame_options=SAMEORIGIN",
        "limits.realtime_per_ip=7",
    )
    files = conf(stack)
    text = files["nginx.conf"]
    assert '""      "max-age=600";' in text and '""      "SAMEORIGIN";' in text
    assert "Strict-Transport-Security $stackctl_hsts always;" in files["security_headers.conf"]
    assert text.count("limit_conn realtime_per_ip 7;") == 3  # websockets, SSE, long polls
    assert text.count("proxy_set_header X-Forwarded-For $remote_addr;") == 3
    assert text.count('proxy_set_header Proxy "";') == 3
    assert "limit_req" not in text.replace("limit_req_", "")  # off by default
    assert "uwsgi_param HTTP_PROXY" in files["uwsgi_params"]
    assert "        127.0.0.1/32 0;\n        ::1/128 0;\n" in text  # this host's own: not counted
    exempt = conf(planned(tmp_path, 'limits.exempt=["10.1.2.3/8"]'))["nginx.conf"]
    assert "        10.0.0.0/8 0;\n    }" in exempt
    limited = conf(planned(tmp_path, "limits.requests_per_second=5", "limits.burst=9"))
    assert "rate=5r/s;" in limited["nginx.conf"]
    assert "limit_req zone=requests_per_ip burst=9 nodelay;" in limited["nginx.conf"]


def test_nginx_accepts_the_tls_config_with_no_warning(tmp_path: Path) -> None:
    stack = planned(tmp_path, "tls.certificate=self-signed", "tls.acme_dir=acme")
    (tmp_path / "acme").mkdir()
    run = stack.run_dir
    (run / "nginx-temp").mkdir(parents=True)
    (run / "nginx-cache").mkdir()
    stack.log_dir.mkdir(parents=True)
    for name, content in conf(stack).items():
        (run / name).write_text(content)
    result = subprocess.run(
        [NGINX, "-t", "-p", str(run), "-c", str(run / "nginx.conf"), "-e", "/dev/stderr"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr


def test_the_redirect_keeps_only_the_sites_names() -> None:
    assert nginx.redirect_names("_") == ([], "")
    assert nginx.redirect_names("*.example.com") == ([], "")  # no plain name to send others to
    assert nginx.redirect_names("example.com _") == ([], "")  # "_": any host is the site's
    assert nginx.redirect_names(".example.com www.example.org") == (
        [".example.com", "www.example.org"],
        "www.example.org",
    )
