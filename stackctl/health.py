"""``GET /_stackctl/health``: whether this site can take visitors, for load balancers.

NGiNX passes the request to the wsgi pool with a marker (``uwsgi_param STACKCTL_HEALTH``)
that no visitor can send, so the app never sees it. A wsgi worker answering is the first
proof; it then asks the realtime worker of its host (which checks its subscription and
Redis), or Redis itself on a host without one. 200 when all of it works, 503 saying what
does not. While the host drains, NGiNX answers 503 without asking anyone (stackctl.drain).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PATH = "/_stackctl/health"
DRAINING = '{"ok": false, "reason": "draining"}'
"""What NGiNX answers while the host drains: what the workers would say, in their form."""
FRESH_FOR = 1
"""Seconds NGiNX gives every check the answer of the first check of its second (nginx.conf's
$stackctl_health_key): balancers ask every few seconds, and a flood of checks reaches the
pool once a second."""
ANSWER_WITHIN = 5
"""Seconds NGiNX waits for a worker's answer (504 then): the checks, and some slack."""
MARKER_VARIABLE = "STACKCTL_HEALTH"
"""Set to "1" by NGiNX's health location only: a header would arrive as HTTP_*."""
REALTIME_VARIABLE = "STACKCTL_WS_HEALTH"
"""The realtime worker's socket and URL prefix (ws.prefix), "ADDRESS PREFIX"; unset on a
host without one."""
TIMEOUT = 1.5
"""Seconds each check may take: load balancers give a check a few seconds in all."""

App = Callable[[dict[str, Any], Any], Iterable[bytes]]


def answering(app: App) -> App:
    """``app``, with the health check answered before it."""

    def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get(MARKER_VARIABLE) != "1":
            return app(environ, start_response)
        ok, reason = check()
        body = json.dumps({"ok": ok, "reason": reason}).encode() + b"\n"
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json"),
                                ("Cache-Control", "no-store"),
                                ("Content-Length", str(len(body)))])  # fmt: skip
        return [body]

    return application


def check() -> tuple[bool, str]:
    realtime_worker = os.environ.get(REALTIME_VARIABLE)
    if realtime_worker:
        return realtime_delivers(realtime_worker)
    return redis_answers()


def realtime_delivers(where: str) -> tuple[bool, str]:
    from stackctl import realtime
    from stackctl.settings import listen

    address, prefix = where.rsplit(" ", 1)
    found = realtime.health(Path(address) if address.startswith("/") else listen(address),
                            prefix, timeout=TIMEOUT)  # fmt: skip
    if found.ok:
        return True, "serving"
    return False, f"realtime: {found.reason}"


_redis: Any = None


def redis_answers() -> tuple[bool, str]:
    import redis

    from stackctl import realtime

    global _redis
    if _redis is None:  # one connection per worker, kept: checks come every few seconds
        _redis = realtime.connect(realtime.redis_url(), socket_timeout=TIMEOUT,
                                  socket_connect_timeout=TIMEOUT,
                                  retry=realtime.NO_RETRY)  # fmt: skip
    try:
        _redis.ping()
    except redis.RedisError as e:
        return False, f"Redis does not answer: {realtime.describe_error(e)}"
    return True, "serving"
