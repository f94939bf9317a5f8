"""The stack's Redis as a Celery broker: the settings a Celery app needs to find it.

A worker that the stack runs ([watchers.NAME]) and a view of the pool have the same
``STACKCTL_REDIS_URL`` (and ``STACKCTL_REDIS_PASSWORD_FILE`` when Redis asks for a password);
a shell or a cron job in the stack's directory finds them from the running stack, as
:func:`stackctl.realtime.publish` does. ::

    from celery import Celery
    from stackctl.broker import celery_settings

    app = Celery("tasks")
    app.add_defaults(celery_settings)  # read when Celery first needs it, not at import

Given as defaults, so that the app's own configuration (Django's CELERY_BROKER_URL...) wins,
and read lazily, so that importing the app (a shell, a test) needs no running stack. The
password goes into the broker URL, where Celery and kombu mask it whenever they show
the URL (``redis://:**@host``); stackctl never prints it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from stackctl import realtime
from stackctl.errors import StackError
from stackctl.settings import SENTINEL_SCHEME, sentinel_address


def celery_broker_url(url: str | None = None, password: str | None = None) -> str:
    """kombu's form of the stack's Redis URL (``url``, else ``STACKCTL_REDIS_URL``), with
    ``password`` (else the first line of the stack's password file, if it has one).

    ``unix:///PATH?db=N`` becomes ``redis+socket:///PATH?virtual_host=N``; ``redis://`` and
    ``rediss://`` stay; ``sentinel://H1:P1,H2:P2/MASTER`` becomes kombu's list of Sentinels,
    ``sentinel://H1:P1;sentinel://H2:P2`` (the master's name is a transport option:
    :func:`celery_settings`).
    """
    url = url or realtime.redis_url()
    password = password if password is not None else realtime.redis_password()
    secret = f":{quote(password, safe='')}@" if password else ""
    if url.startswith(SENTINEL_SCHEME):
        sentinels, _ = sentinel_address(url)
        return ";".join(f"sentinel://{secret}{_host(host)}:{port}" for host, port in sentinels)
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = [("virtual_host" if k == "db" else k, v) for k, v in parse_qsl(parts.query)]
        tail = f"?{urlencode(query)}" if query else ""
        return f"redis+socket://{secret}{parts.path}{tail}"
    if parts.scheme in ("redis", "rediss"):
        if parts.password is not None or not secret:
            return url  # a password in the URL wins, as it does for stackctl's own clients
        return url.replace("://", f"://{secret}", 1)
    raise StackError(f"{realtime.REDIS_URL_VARIABLE}: cannot make a Celery broker of "
                     f"{parts.scheme or url!r}: expected unix://, redis://, rediss:// or "
                     f"{SENTINEL_SCHEME}")  # fmt: skip


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def celery_settings(url: str | None = None, password: str | None = None) -> dict[str, Any]:
    """``broker_url`` and, for Sentinel, ``broker_transport_options``: for
    ``app.conf.update()``. A task's result goes back the stack's way (realtime.publish), so
    no result backend is set."""
    url = url or realtime.redis_url()
    password = password if password is not None else realtime.redis_password()
    settings: dict[str, Any] = {"broker_url": celery_broker_url(url, password)}
    if url.startswith(SENTINEL_SCHEME):
        _, master = sentinel_address(url)
        options: dict[str, Any] = {"master_name": master}
        if password:
            options["sentinel_kwargs"] = {"password": password}
        settings["broker_transport_options"] = options
    return settings
