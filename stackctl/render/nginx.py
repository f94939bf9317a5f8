"""The NGiNX config, with the include files it names copied beside it.

Copying ``uwsgi_params`` and ``mime.types`` into the run directory keeps a rendered generation
self-contained: upgrading stackctl cannot change a running NGiNX's includes under it.
"""

from __future__ import annotations

from stackctl import resources
from stackctl.render import File, render_template
from stackctl.stack import Stack

INCLUDES = ("uwsgi_params", "mime.types")
TEMP_PATHS = ("body", "proxy", "uwsgi", "fastcgi", "scgi")

# A connection is a descriptor, so each worker may have as many as its open-files limit
# allows, less some for logs and listeners. (A proxied websocket holds two: client and
# upstream.)
SPARE_FDS = 1024


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
        temp_paths={name: stack.nginx_temp_dir / name for name in TEMP_PATHS},
        wsgi_upstream=f"unix:{stack.wsgi_socket}",
        ws_upstream=f"unix:{stack.ws_socket}",
        listen=profile.server.listen,
        server_names=profile.server.names,
        static_alias=f"{stack.static_dir}/" if stack.static_dir else "",
        static_url=profile.static.url,
        realtime_prefixes=[profile.ws.prefix, profile.ws.sse_prefix, profile.ws.poll_prefix],
        client_dir=f"{resources.client_dir().resolve()}/",  # disable_symlinks checks it
        timeout=profile.server.timeout,
    )
    includes = [
        File(name, (resources.templates_dir() / "nginx" / name).read_text()) for name in INCLUDES
    ]
    return [File(stack.nginx_conf.name, content), *includes]
