"""The NGiNX config, with the include files it names copied beside it.

Copying ``uwsgi_params`` and ``mime.types`` into the run directory keeps a rendered generation
self-contained: upgrading stackctl cannot change a running NGiNX's includes under it.
"""

from __future__ import annotations

from stackctl import resources
from stackctl.render import File, render_template
from stackctl.stack import SPARE_FDS, Stack

INCLUDES = ("uwsgi_params", "mime.types")
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


def render(stack: Stack) -> list[File]:
    profile = stack.profile
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
        wsgi_upstream=f"unix:{stack.wsgi_socket}",
        ws_upstream=f"unix:{stack.ws_socket}",
        listen=profile.server.listen,
        server_names=profile.server.names,
        static_alias=f"{stack.static_dir}/" if stack.static_dir else "",
        static_url=profile.static.url,
        media_alias=f"{stack.media_dir}/" if stack.media_dir else "",
        media_url=profile.media.url,
        media_headers=MEDIA_HEADERS,
        realtime_prefixes=[profile.ws.prefix, profile.ws.sse_prefix, profile.ws.poll_prefix],
        client_dir=f"{resources.client_dir().resolve()}/",  # disable_symlinks checks it
        timeout=profile.server.timeout,
    )
    includes = [
        File(name, (resources.templates_dir() / "nginx" / name).read_text()) for name in INCLUDES
    ]
    return [File(stack.nginx_conf.name, content), *includes]
