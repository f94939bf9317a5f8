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

import ssl
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

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
    db, _ = url_options(parts.query)
    if parts.scheme == "unix":
        tail = f"?{urlencode({'virtual_host': db})}" if db is not None else ""
        return f"redis+socket://{secret}{parts.path}{tail}"
    if parts.scheme in ("redis", "rediss"):
        # kombu reads the database from the path only, and any other option of the query
        # as an argument of its own, which it refuses: they go as transport options.
        path = parts.path if parts.path not in ("", "/") or db is None else f"/{db}"
        if parts.password is None and secret:  # a password in the URL wins, as it does
            host = parts.netloc.rsplit("@", 1)[-1]  # for stackctl's own clients
            parts = parts._replace(netloc=f"{parts.username or ''}{secret}{host}")
        return urlunsplit(parts._replace(path=path, query=""))
    raise StackError(f"{realtime.REDIS_URL_VARIABLE}: cannot make a Celery broker of "
                     f"{parts.scheme or url!r}: expected unix://, redis://, rediss:// or "
                     f"{SENTINEL_SCHEME}")  # fmt: skip


def url_options(query: str) -> tuple[str | None, dict[str, Any]]:
    """The database and the other options (``socket_timeout=5``...) of a Redis URL's query,
    the latter typed as kombu's Redis transport options are."""
    db, options = None, {}
    for key, value in parse_qsl(query):
        if key == "db":
            db = value
        else:
            options[key] = _typed(value)
    return db, options


def _typed(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return {"true": True, "false": False}.get(value.lower(), value)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def celery_settings(url: str | None = None, password: str | None = None) -> dict[str, Any]:
    """``broker_url``; ``broker_transport_options`` for Sentinel and a URL's options;
    ``broker_use_ssl`` for rediss://: for ``app.conf.update()``. A task's result goes back
    the stack's way (realtime.publish), so no result backend is set."""
    url = url or realtime.redis_url()
    password = password if password is not None else realtime.redis_password()
    settings: dict[str, Any] = {"broker_url": celery_broker_url(url, password)}
    if url.startswith(SENTINEL_SCHEME):
        _, master = sentinel_address(url)
        options: dict[str, Any] = {"master_name": master}
        if password:
            options["sentinel_kwargs"] = {"password": password}
    else:
        _, options = url_options(urlsplit(url).query)
    if url.startswith("rediss://"):
        settings["broker_use_ssl"] = tls_options(options)
        options = {k: v for k, v in options.items() if not k.startswith("ssl_")}
    if options:
        settings["broker_transport_options"] = options
    return settings


CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def tls_options(options: dict[str, Any]) -> dict[str, Any]:
    """Celery's broker_use_ssl for a rediss:// URL: the server's certificate is checked, as
    redis-py checks it for stackctl's own clients, unless the URL's ssl_cert_reqs says
    otherwise. (kombu, given none, would connect without checking it.)"""
    tls = {k: v for k, v in options.items() if k.startswith("ssl_")}
    wanted = str(tls.get("ssl_cert_reqs", "required")).lower()
    if wanted not in CERT_REQS:
        raise StackError(f"{realtime.REDIS_URL_VARIABLE}: ssl_cert_reqs={wanted}: expected "
                         f"one of {', '.join(CERT_REQS)}")  # fmt: skip
    return {**tls, "ssl_cert_reqs": CERT_REQS[wanted]}
