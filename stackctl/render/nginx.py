"""The NGiNX config, with the include files it names copied beside it.

Copying ``uwsgi_params`` and ``mime.types`` into the run directory keeps a rendered generation
self-contained: upgrading stackctl cannot change a running NGiNX's includes under it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from stackctl import cache, cluster, compress, drain, health, resources
from stackctl.render import File, render_template
from stackctl.stack import SPARE_FDS, Stack
from stackctl.tls import Stapling

INCLUDES = ("uwsgi_params", "mime.types")
HEADERS_FILE = "security_headers.conf"
HEALTH_FILE = "health.conf"
RENDERED = ("nginx.conf", HEADERS_FILE, HEALTH_FILE, cache.CACHE_FILE)
"""The NGiNX files rendered from the profile, beside the copied includes."""

# Mozilla's intermediate configuration (ssl-config.mozilla.org, version 5.7). The DHE suites
# need ssl_dhparam, which is not set: NGiNX then simply does not offer them.
MOZILLA_INTERMEDIATE_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
])  # fmt: skip
TEMP_PATHS = ("body", "proxy", "uwsgi", "fastcgi", "scgi")

MEDIA_CSP = (
    "sandbox; default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'"
)
"""For every uploaded file: one opened directly (an HTML page, an SVG image) is a sandboxed
document with an origin of its own, that runs no script, submits no form and loads nothing
but the site's images, audio and video. An <img> or <video> of the site's pages is not
affected: a policy applies only to a document."""

MEDIA_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),  # an upload is never read as another type
    ("Content-Security-Policy", MEDIA_CSP),
)

IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
"""For fingerprinted names: a year (RFC 9111's advice for "never expires"), and browsers do
not even revalidate on reload."""


def immutable_location(static_url: str, name_pattern: str) -> str:
    """The location regex for the fingerprinted files under ``static_url``, in any directory
    there; "" when the profile names none."""
    if not name_pattern:
        return ""
    return f"^{re.escape(static_url)}(?:.*/)?(?:{name_pattern})$"


@dataclass(frozen=True)
class TlsValues:
    listen: str
    port_suffix: str
    certificate: Path
    key: Path
    digest: str
    ciphers: str
    stapling: Stapling | None
    site_names: list[str]
    """The names the plain-HTTP redirect keeps as the client gave them; [] for any."""
    first_name: str
    """Where the redirect sends a request for another name; "" to keep any."""


def redirect_names(server_names: str) -> tuple[list[str], str]:
    """The redirect to https names the host the client asked for, but only one of the site's:
    a made-up Host header (behind a shared cache, a poisoned redirect) gets the site's first
    plain name instead. With "_" (any name), or wildcards only, any host is kept."""
    names = [name for name in server_names.split(" ") if name != "_"]
    plain = [name for name in names if "*" not in name and not name.startswith(".")]
    if not plain or "_" in server_names.split(" "):
        return [], ""
    return names, plain[0]


def tls_values(stack: Stack) -> TlsValues:
    assert stack.tls is not None
    listen = stack.profile.tls.listen
    site_names, first_name = redirect_names(stack.profile.server.names)
    return TlsValues(
        listen=str(listen),
        port_suffix="" if listen.port == 443 else f":{listen.port}",
        certificate=stack.tls.certificate,
        key=stack.tls.key,
        digest=stack.tls.digest,
        ciphers=MOZILLA_INTERMEDIATE_CIPHERS,
        stapling=stack.tls.stapling,
        site_names=site_names,
        first_name=first_name,
    )


def header_values(stack: Stack) -> dict[str, str]:
    """The values of the security headers, "" for one not sent."""
    headers = stack.profile.headers
    return {
        "nosniff": "nosniff" if headers.nosniff else "",
        "referrer_policy": headers.referrer_policy,
        "frame_options": headers.frame_options,
        # Over HTTPS only: a browser ignores it over HTTP, and it would pin a host to HTTPS.
        "hsts": f"max-age={headers.hsts}" if headers.hsts and stack.tls else "",
    }


def media_headers(headers: dict[str, str]) -> list[tuple[str, str]]:
    """An upload's own headers, beside the security headers its location includes too: nosniff
    always, and only once (the security headers send it unless the profile turned it off)."""
    return [
        (name, value)
        for name, value in MEDIA_HEADERS
        if not (name == "X-Content-Type-Options" and headers["nosniff"])
    ]


@dataclass(frozen=True)
class CacheValues:
    path: Path
    zone: str
    levels: str
    max_size: str
    inactive: str
    key: str
    session_regex: str
    """Matches a Cookie header that carries one of cache.session_cookies; "" for none."""
    listen: str
    """The unix socket stackctl.cache.refresh asks; " ssl" follows it with HTTPS."""
    listen_options: str


def session_regex(names: tuple[str, ...]) -> str:
    if not names:
        return ""
    # Blanks may stand around the name: Django and Werkzeug strip them, so "sessionid =x"
    # is a session to the app and must be one here.
    return r"~(?:^|;)\s*(?:" + "|".join(re.escape(name) for name in names) + r")\s*="


def cache_values(stack: Stack) -> CacheValues | None:
    if not stack.caches_pages:
        return None
    settings = stack.profile.cache
    return CacheValues(
        path=stack.cache_pages_dir,
        zone=f"{cache.KEYS_ZONE}:{cache.KEYS_ZONE_SIZE}",
        levels=":".join(str(width) for width in cache.LEVELS),
        max_size=settings.max_size,
        inactive=settings.inactive,
        key=cache.KEY_FORMAT,
        session_regex=session_regex(settings.session_cookies),
        listen=f"unix:{stack.cache_socket}",
        listen_options=" ssl" if stack.tls else "",
    )


def cache_target(stack: Stack) -> cache.Target:
    """What stackctl.cache needs of this stack, written beside nginx.conf (also when the
    cache is off, so that a file of before never says it is on)."""
    _, first_name = redirect_names(stack.profile.server.names)
    default_port = 443 if stack.tls else 80
    return cache.Target(
        enabled=stack.caches_pages,
        socket=str(stack.cache_socket),
        tls=stack.tls is not None,
        scheme=stack.scheme,
        host=first_name.lower() or stack.local_host,
        port_suffix="" if stack.front.port == default_port else f":{stack.front.port}",
        pages_dir=str(stack.cache_pages_dir),
        timeout=stack.profile.server.timeout,
    )


FAIL_TIMEOUT = 5
"""Seconds an app host that failed a connection is left out before NGiNX tries it again."""
CONNECT_TIMEOUT = 2
"""Seconds NGiNX waits for an app host to accept: on a private network a live host accepts in
a millisecond, and a host cut off never does."""


def render(stack: Stack) -> list[File]:
    if "nginx" not in stack.watchers:
        return []
    profile = stack.profile
    headers = header_values(stack)
    balanced = cluster.balances_app_hosts(profile)
    content = render_template(
        "nginx/nginx.conf.j2",
        profile=profile.name,
        rlimit_nofile=stack.open_files,
        worker_connections=stack.open_files - SPARE_FDS,
        pid_file=stack.run_dir / "nginx.pid",
        access_log=stack.nginx_access_log,
        user=stack.nginx_user,
        max_body=profile.server.max_body,
        temp_paths={name: stack.nginx_temp_dir / name for name in TEMP_PATHS},
        wsgi_upstreams=stack.upstreams("cluster.wsgi_port"),
        ws_upstreams=stack.upstreams("cluster.ws_port"),
        balanced=balanced,
        upstream_checks=f" max_fails=1 fail_timeout={FAIL_TIMEOUT}s" if balanced else "",
        fail_timeout=FAIL_TIMEOUT,
        connect_timeout=CONNECT_TIMEOUT,
        listen=profile.server.listen,
        server_names=profile.server.names,
        static_alias=f"{stack.static_dir}/" if stack.static_dir else "",
        static_url=profile.static.url,
        media_alias=f"{stack.media_dir}/" if stack.media_dir else "",
        media_url=profile.media.url,
        media_headers=media_headers(headers),
        immutable_location=immutable_location(profile.static.url, profile.static.immutable),
        immutable_cache=IMMUTABLE_CACHE,
        gzip_static=profile.static.compress,
        gzip_types=" ".join(compress.GZIP_TYPES),
        gzip_min_length=compress.GZIP_MIN_LENGTH,
        realtime_prefixes=[profile.ws.prefix, profile.ws.sse_prefix, profile.ws.poll_prefix],
        client_dir=f"{resources.client_dir().resolve()}/",  # disable_symlinks checks it
        timeout=profile.server.timeout,
        tls=tls_values(stack) if stack.tls else None,
        acme_dir=f"{stack.acme_dir}/" if stack.acme_dir else "",
        headers=headers,
        realtime_per_ip=profile.limits.realtime_per_ip,
        requests_per_second=profile.limits.requests_per_second,
        burst=profile.limits.burst,
        exempt=profile.limits.exempt,
        cache=cache_values(stack),
        health_cache=stack.health_cache_dir,
    )
    security_headers = render_template("nginx/security_headers.conf.j2", hsts=headers["hsts"])
    health_location = render_template(
        "nginx/health.conf.j2",
        health_path=health.PATH,
        health_marker=health.MARKER_VARIABLE,
        health_timeout=health.ANSWER_WITHIN,
        fresh_for=health.FRESH_FOR,
        draining_mark=drain.mark_path(stack.run_dir),
        draining_answer=health.DRAINING,
        requests_per_second=profile.limits.requests_per_second,
        burst=profile.limits.burst,
        balanced=balanced,
        connect_timeout=CONNECT_TIMEOUT,
    )
    includes = [
        File(name, (resources.templates_dir() / "nginx" / name).read_text()) for name in INCLUDES
    ]
    return [
        File(stack.nginx_conf.name, content),
        File(HEADERS_FILE, security_headers),
        File(HEALTH_FILE, health_location),
        File(cache.CACHE_FILE, cache_target(stack).to_json()),
        *includes,
    ]
