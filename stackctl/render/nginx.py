"""The NGiNX config, with the include files it names copied beside it.

Copying ``uwsgi_params`` and ``mime.types`` into the run directory keeps a rendered generation
self-contained: upgrading stackctl cannot change a running NGiNX's includes under it.
"""

from __future__ import annotations

import re

from stackctl import compress, resources
from stackctl.render import File, render_template
from stackctl.stack import Stack

INCLUDES = ("uwsgi_params", "mime.types")
TEMP_PATHS = ("body", "proxy", "uwsgi", "fastcgi", "scgi")

# A connection is a descriptor, so each worker may have as many as its open-files limit
# allows, less some for logs and listeners. (A proxied websocket holds two: client and
# upstream.)
SPARE_FDS = 1024

IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
"""For fingerprinted names: a year (RFC 9111's advice for "never expires"), and browsers do
not even revalidate on reload."""


def immutable_location(static_url: str, name_pattern: str) -> str:
    """The location regex for the fingerprinted files under ``static_url``, in any directory
    there; "" when the profile names none."""
    if not name_pattern:
        return ""
    return f"^{re.escape(static_url)}(?:.*/)?(?:{name_pattern})$"


def render(stack: Stack) -> list[File]:
    profile = stack.profile
    content = render_template(
        "nginx/nginx.conf.j2",
        profile=profile.name,
        rlimit_nofile=stack.open_files,
        worker_connections=stack.open_files - SPARE_FDS,
        pid_file=stack.run_dir / "nginx.pid",
        access_log=stack.log_dir / "nginx-access.log",
        user=stack.nginx_user,
        max_body=profile.server.max_body,
        temp_paths={name: stack.run_dir / "nginx-temp" / name for name in TEMP_PATHS},
        wsgi_upstream=f"unix:{stack.wsgi_socket}",
        ws_upstream=f"unix:{stack.ws_socket}",
        listen=profile.server.listen,
        server_names=profile.server.names,
        static_alias=f"{stack.static_dir}/" if stack.static_dir else "",
        static_url=profile.static.url,
        immutable_location=immutable_location(profile.static.url, profile.static.immutable),
        immutable_cache=IMMUTABLE_CACHE,
        gzip_static=profile.static.compress,
        gzip_types=" ".join(compress.GZIP_TYPES),
        gzip_min_length=compress.GZIP_MIN_LENGTH,
        realtime_prefixes=[profile.ws.prefix, profile.ws.sse_prefix, profile.ws.poll_prefix],
        client_dir=f"{resources.client_dir().resolve()}/",  # disable_symlinks checks it
        timeout=profile.server.timeout,
    )
    includes = [
        File(name, (resources.templates_dir() / "nginx" / name).read_text()) for name in INCLUDES
    ]
    return [File(stack.nginx_conf.name, content), *includes]
