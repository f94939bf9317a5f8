"""HTTPS: the certificate NGiNX serves, checked before NGiNX is asked to load it.

``tls.certificate`` names a PEM file (a certificate from a CA, renewed by certbot in place), or
``"self-signed"``: stackctl then makes one in ``.stackctl/tls/`` for the stack's server names and
this host (for staging and tests: no browser trusts it). Either way the rendered NGiNX config
carries a digest of the certificate and key files, so that ``stackctl reload`` sees a renewed
certificate as a changed config: it is checked, ``nginx -t`` tries it, and NGiNX is HUPped onto
it. A certificate that fails either check is refused and the running one keeps serving.

The checks use the ``cryptography`` package rather than the openssl command: it reads the
certificate's names, dates and OCSP address as values, not as text to parse, and it tells
whether a key belongs to a certificate without a subprocess per question.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import stat
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stackctl.errors import StackError
from stackctl.settings import SELF_SIGNED, TLS_OFF

if TYPE_CHECKING:
    from cryptography import x509

TLS_DIR = ".stackctl/tls"
SELF_SIGNED_DAYS = 365
RENEW_BEFORE_DAYS = 30
"""A self-signed certificate this close to its end is made anew at the next up or reload."""
LOCAL_NAMES = ("localhost",)
LOCAL_ADDRESSES = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Tls:
    """The certificate a stack serves, resolved: what the NGiNX config names."""

    certificate: Path
    key: Path
    digest: str
    """Of the certificate and key files as read now: a renewal changes the rendered config."""
    ocsp: bool
    """The certificate names an OCSP responder and the file holds its issuer (its chain):
    NGiNX can staple the responder's answers. Without the issuer it would only warn."""
    stapling: Stapling | None = None
    """What NGiNX needs, besides the certificate, to staple; None: no stapling."""


@dataclass(frozen=True)
class Stapling:
    resolvers: str
    """Name servers for NGiNX's resolver, which reads no resolv.conf: "IP [IPv6]..."."""
    ca_bundle: Path
    """The CAs that the responder's answers are checked against."""


SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
RESOLV_CONF = Path("/etc/resolv.conf")


def name_servers(resolv_conf: str) -> list[str]:
    """The name servers of resolv.conf, as NGiNX's resolver directive takes them."""
    from stackctl.settings import is_ip_address

    found = []
    for line in resolv_conf.splitlines():
        fields = line.split()
        # NGiNX takes no IPv6 zone (fe80::1%eth0): such a server is left out.
        usable = len(fields) >= 2 and is_ip_address(fields[1]) and "%" not in fields[1]
        if usable and fields[0] == "nameserver":
            found.append(f"[{fields[1]}]" if ":" in fields[1] else fields[1])
    return found


def stapling(ocsp: bool, resolv_conf: str, ca_bundle: Path) -> Stapling | None:
    """Stapling needs the responder's name resolved and its answers checked against the CAs;
    without either, NGiNX would warn at every start and staple nothing."""
    resolvers = name_servers(resolv_conf)
    if not (ocsp and resolvers and ca_bundle.is_file()):
        return None
    return Stapling(" ".join(resolvers), ca_bundle)


def host_stapling(ocsp: bool) -> Stapling | None:
    """:func:`stapling` with this host's resolv.conf and CA bundle."""
    if not ocsp:
        return None
    try:
        resolv_conf = RESOLV_CONF.read_text()
    except OSError:
        return None
    return stapling(ocsp, resolv_conf, SYSTEM_CA_BUNDLE)


def profile_problem(certificate: str, key: str) -> str | None:
    """What is wrong with the pair of settings, before any file is read."""
    if certificate == SELF_SIGNED and key:
        return 'tls.key: must be "" when tls.certificate is "self-signed" (stackctl makes both)'
    if certificate not in (TLS_OFF, SELF_SIGNED) and not key:
        return "tls.key: required when tls.certificate is a file: the PEM file of its private key"
    if certificate == TLS_OFF and key:
        return 'tls.key: set, but tls.certificate is "" (no HTTPS); set tls.certificate too'
    return None


def san_names(server_names: str) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses a self-signed certificate covers: the server names that are
    host names ("_" is none; NGiNX's ".example.com" is example.com and its subdomains;
    "example.*" names no certificate can hold), and this host's loopback names."""
    dns: list[str] = []
    for name in server_names.split():
        if name == "_" or name.endswith(".*"):
            continue
        if name.startswith("."):
            dns += [name[1:], f"*{name}"]
        else:
            dns.append(name.rstrip("."))
    return list(dict.fromkeys([*dns, *LOCAL_NAMES])), list(LOCAL_ADDRESSES)


# --- checking a certificate and its key ----------------------------------------------------------


PEM_MAX_BYTES = 1 << 20
"""A certificate chain or a key is a few kilobytes: a larger file is not one, and reading it
whole (/dev/zero, a log named by mistake) would exhaust memory before any check could say so."""


def _read(what: str, path: Path) -> bytes:
    """The file's bytes. Links are followed (certbot's live/ names are links), but only a
    regular file is read: a FIFO would hang `up` or a reload, and a device never ends."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(descriptor, "rb") as f:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO, socket or device"
                raise StackError(f"{what}: {path}: is {kind}, not a PEM file")
            if info.st_size > PEM_MAX_BYTES:
                raise StackError(
                    f"{what}: {path}: is {info.st_size} bytes, too large for a PEM certificate "
                    f"chain or key (at most {PEM_MAX_BYTES} bytes; they are a few kilobytes)"
                )
            return f.read(PEM_MAX_BYTES + 1)
    except FileNotFoundError:
        raise StackError(f"{what}: {path}: no such file") from None
    except IsADirectoryError:
        raise StackError(f"{what}: {path}: is a directory, not a PEM file") from None
    except OSError as e:
        raise StackError(f"{what}: {path}: cannot be read ({e.strerror})") from None


def check_pair(where_cert: str, cert_path: Path, where_key: str, key_path: Path) -> Tls:
    """Read and check a certificate file and its key: both parse as PEM, the key is the
    certificate's, and the certificate is in its validity period."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_bytes, key_bytes = _read(where_cert, cert_path), _read(where_key, key_path)
    try:
        chain = x509.load_pem_x509_certificates(cert_bytes)
    except ValueError:
        raise StackError(
            f"{where_cert}: {cert_path}: holds no PEM certificate (expected -----BEGIN "
            "CERTIFICATE-----, the server's certificate first, then its chain)"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except (ValueError, TypeError):
        raise StackError(
            f"{where_key}: {key_path}: holds no unencrypted PEM private key (NGiNX cannot ask "
            "for a passphrase at start)"
        ) from None
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != leaf.public_key().public_bytes(der, public):
        raise StackError(
            f"{where_key}: {key_path} is not the private key of {where_cert}: {cert_path} "
            "(a renewal replaces both files: check that the key is the new one)"
        )
    now = datetime.datetime.now(datetime.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise StackError(
            f"{where_cert}: {cert_path}: valid from {leaf.not_valid_before_utc:%Y-%m-%d} to "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now; renew it"
        )
    digest = hashlib.sha256(cert_bytes + b"\0" + key_bytes).hexdigest()
    ocsp = has_ocsp(leaf) and len(chain) > 1
    return Tls(cert_path, key_path, digest, ocsp, host_stapling(ocsp))


def leaf_der(pem: bytes) -> bytes:
    """The first certificate of a PEM chain (the server's own), in DER."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_certificates(pem)[0].public_bytes(serialization.Encoding.DER)


def has_ocsp(cert: x509.Certificate) -> bool:
    from cryptography import x509
    from cryptography.x509.oid import AuthorityInformationAccessOID

    try:
        access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    except x509.ExtensionNotFound:
        return False
    return any(d.access_method == AuthorityInformationAccessOID.OCSP for d in access.value)


# --- the self-signed certificate -----------------------------------------------------------------


def make_self_signed(
    dns: Iterable[str], addresses: Iterable[str], days: float = SELF_SIGNED_DAYS
) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key and a certificate for it naming ``dns`` and ``addresses``:
    (certificate PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    dns, addresses = list(dns), list(addresses)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns or addresses)[0])])
    now = datetime.datetime.now(datetime.UTC)
    alternative = [x509.DNSName(n) for n in dns] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in addresses
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little behind
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def self_signed_paths(stack_dir: Path) -> tuple[Path, Path]:
    directory = stack_dir / TLS_DIR
    return directory / "cert.pem", directory / "key.pem"


def still_good(cert_path: Path, key_path: Path, dns: list[str], addresses: list[str]) -> bool:
    """The self-signed pair exists, belongs together, names what is wanted, and is not
    near its end: keep it (a browser that was told to trust it keeps trusting it)."""
    from cryptography import x509

    try:
        check_pair("", cert_path, "", key_path)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (StackError, OSError, ValueError, x509.ExtensionNotFound):
        return False
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    have_ips = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    return (
        left > datetime.timedelta(days=RENEW_BEFORE_DAYS)
        and names.get_values_for_type(x509.DNSName) == dns
        and have_ips == addresses
    )


def ensure_self_signed(stack_dir: Path, server_names: str) -> tuple[Path, Path]:
    """The stack's self-signed certificate and key, made (or made anew) when needed."""
    cert_path, key_path = self_signed_paths(stack_dir)
    dns, addresses = san_names(server_names)
    if still_good(cert_path, key_path, dns, addresses):
        return cert_path, key_path
    private_directory(cert_path.parent)
    cert_pem, key_pem = make_self_signed(dns, addresses)
    # The key first: a stackctl killed between the two leaves a pair that does not match,
    # which still_good() refuses, so the next run makes both again.
    write_new(key_path, key_pem, 0o600)
    write_new(cert_path, cert_pem, 0o644)
    return cert_path, key_path


def private_directory(directory: Path) -> None:
    """Create ``directory`` (0700) and its parent, refusing a link or another user's
    directory: stackctl (maybe as root) writes a private key there."""
    for path in (directory.parent, directory):
        with suppress(FileExistsError):
            os.mkdir(path, 0o700)
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise StackError(
                f"{path}: is a symbolic link, not a directory, or not yours (uid "
                f"{os.geteuid()}); remove it, stackctl creates it again"
            )


def write_new(path: Path, content: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all: a new file beside it (never through a link planted
    there: O_EXCL|O_NOFOLLOW), synced, then renamed over it."""
    staged = path.with_name(f".{path.name}.new")
    staged.unlink(missing_ok=True)
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(descriptor, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)
