"""The embedded Redis server's config; nothing when the profile names an existing server."""

from __future__ import annotations

from stackctl.render import File, render_template
from stackctl.stack import Stack


def render(stack: Stack) -> list[File]:
    if not stack.embedded_redis:
        return []
    content = render_template(
        "redis.conf.j2",
        profile=stack.profile.name,
        socket=stack.redis_socket,
        data_dir=stack.service_dir,
    )
    return [File(stack.redis_conf.name, content)]
