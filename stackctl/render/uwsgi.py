"""The uWSGI ini every process of the ``wsgi`` watcher reads."""

from __future__ import annotations

import sys

from stackctl.render import File, render_template
from stackctl.stack import Stack


def render(stack: Stack) -> list[File]:
    if "wsgi" not in stack.watchers:
        return []
    profile = stack.profile
    content = render_template(
        "uwsgi.ini.j2",
        profile=profile.name,
        threads=profile.wsgi.threads,
        python_home=sys.prefix,
        stack_dir=stack.stack_dir,
        app=profile.app.wsgi,
        disable_logging=str(not profile.wsgi.log_requests).lower(),
        # One second after NGiNX has answered 504, so that the client sees the timeout.
        harakiri=profile.server.timeout + 1,
        max_requests=profile.wsgi.max_requests,
        max_rss_mb=profile.wsgi.max_rss_mb,
        backlog=profile.wsgi.backlog,
    )
    return [File(stack.uwsgi_ini.name, content)]
