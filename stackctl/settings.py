"""Every profile key, declared once: its type, default, help text and command-line flag.

The profile loader, the ``--set``/``--workers``/``--listen`` overrides and the README's table of
keys are all derived from :data:`SETTINGS`. A parser takes a value as TOML gives it (or as the
command line gives it, already read as TOML where that parses) and returns the typed value, or
raises :class:`Invalid` saying what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Invalid(ValueError):
    """A value that a parser rejects; the message says what is expected."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _expect(what: str, value: Any) -> Invalid:
    return Invalid(f"expected {what}, got {_describe(value)}")


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _expect("true or false", value)
    return value


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _expect("a positive integer", value)
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _expect("a whole number, 0 or more", value)
    return value


def workers(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    try:
        return positive_int(value)
    except Invalid:
        raise _expect('a positive integer or "auto"', value) from None


def listen(value: Any) -> Listen:
    form = 'HOST:PORT with a port from 1 to 65535, e.g. "127.0.0.1:8000"'
    if not isinstance(value, str):
        raise _expect(form, value)
    match = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", value)
    if not match or not match.group(1) or not 0 < int(match.group(2)) < 65536:
        raise _expect(form, value)
    return Listen(match.group(1), int(match.group(2)))


def wsgi_callable(value: Any) -> str:
    form = 'an app as "package.module:callable", e.g. "mysite.wsgi:application"'
    if not isinstance(value, str) or not re.fullmatch(r"[\w.]+:[\w.]+", value):
        raise _expect(form, value)
    return value


def module_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"([\w]+(\.[\w]+)*)?", value):
        raise _expect('a dotted module name such as "mysite.settings", or ""', value)
    return value


def url_prefix(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"/([\w.~-]+/)+", value):
        raise _expect('a URL path that starts and ends with "/", e.g. "/ws/"', value)
    return value


def check_path(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"/[\w./~%-]*(\?[\w./~%&=+-]*)?", value):
        raise _expect('a URL path such as "/" or "/health?full=1"', value)
    return value


def _list_of(value: Any, item: str, form: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, str) and re.fullmatch(item, v) for v in value
    ):
        raise _expect(form, value)
    return tuple(value)


def origins(value: Any) -> tuple[str, ...]:
    form = 'a list of origins such as ["https://example.com"], or [] for the site itself'
    return _list_of(value, r"https?://[\w.-]+(:\d{1,5})?", form)


def channel_patterns(value: Any) -> tuple[str, ...]:
    form = 'a list of channel names or patterns such as ["chat", "room.*"], or []'
    return _list_of(value, r"[\w.:*-]{1,200}", form)


def redis_url(value: Any) -> str:
    if value == "embedded":
        return value
    if not isinstance(value, str) or not re.match(r"(redis|rediss|unix)://", value):
        raise _expect('"embedded" or a URL such as "redis://127.0.0.1:6379/0"', value)
    return value


def path(value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise _expect("a non-empty path", value)
    return value


def optional_path(value: Any) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise _expect('a path, or "" for none', value)
    return value


def server_names(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[\w.*~-]+( [\w.*~-]+)*", value):
        raise _expect('host names separated by spaces, or "_" for any', value)
    return value


def size(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"\d+[kKmMgG]?", value):
        raise _expect('a size such as "10m", "512k" or "0" (no limit)', value)
    return value


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    flag: str | None = None

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def field(self) -> str:
        return self.key.split(".", 1)[1]


REQUIRED = object()
"""Default of a setting that has none: the stack file or a profile must give it."""

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "server.listen",
        "127.0.0.1:8000",
        listen,
        "Address NGiNX listens on, HOST:PORT.",
        "--listen",
    ),
    Setting(
        "server.names",
        "_",
        server_names,
        "NGiNX server_name: host names separated by spaces, _ for any.",
    ),
    Setting(
        "server.max_body", "10m", size, "Largest request body NGiNX accepts (client_max_body_size)."
    ),
    Setting(
        "server.timeout",
        60,
        positive_int,
        "Seconds a request may take: NGiNX then answers 504, and a second later uWSGI "
        "kills the worker still running it (harakiri); Circus starts a fresh one.",
    ),
    Setting(
        "app.wsgi",
        REQUIRED,
        wsgi_callable,
        "The WSGI callable, package.module:callable, importable from the stack directory.",
        "--app",
    ),
    Setting(
        "app.django_settings",
        "",
        module_name,
        "DJANGO_SETTINGS_MODULE for the workers, empty for a non-Django app.",
    ),
    Setting(
        "wsgi.workers",
        "auto",
        workers,
        "uWSGI processes; auto = 2 x the CPUs this process may use.",
        "--workers",
    ),
    Setting("wsgi.threads", 1, positive_int, "Threads per uWSGI process.", "--threads"),
    Setting(
        "wsgi.log_requests",
        True,
        boolean,
        "uWSGI logs every request; NGiNX's access log has them too, so prod turns it off.",
    ),
    Setting(
        "wsgi.autoreload",
        False,
        boolean,
        "Restart workers by themselves when a Python file of the app changes (dev does).",
    ),
    Setting(
        "wsgi.max_requests",
        0,
        non_negative_int,
        "Recycle a worker after this many requests (0: never); it finishes its request first.",
    ),
    Setting(
        "wsgi.max_rss_mb",
        0,
        non_negative_int,
        "Recycle a worker whose resident memory passes this many MiB (0: no limit).",
    ),
    Setting(
        "wsgi.backlog",
        1024,
        positive_int,
        "Listen backlog of the Circus-held WSGI socket: connections queued while all "
        "workers are busy, or while they restart.",
    ),
    Setting(
        "wsgi.graceful_timeout",
        30,
        positive_int,
        "Seconds a stopping worker may take to finish its requests before it is killed.",
    ),
    Setting(
        "wsgi.check_path",
        "/",
        check_path,
        "Path a reload asks a trial worker for before it replaces the running ones: an error "
        "answer where the running workers succeed refuses the reload.",
    ),
    Setting(
        "ws.prefix",
        "/ws/",
        url_prefix,
        "URL prefix routed to the websocket worker; /ws/CHANNEL subscribes to CHANNEL.",
    ),
    Setting(
        "ws.ping_interval",
        20,
        positive_int,
        "Seconds between the websocket worker's pings; a client silent for two is dropped.",
    ),
    Setting(
        "ws.max_message",
        65536,
        positive_int,
        "Largest message in bytes a websocket client may send; a larger one closes it (1009).",
    ),
    Setting(
        "ws.max_connections",
        10000,
        positive_int,
        "Websocket clients one worker accepts; the next ones get 503.",
    ),
    Setting(
        "ws.queue_limit",
        256,
        positive_int,
        "Messages queued for one slow client before it is disconnected (1013).",
    ),
    Setting(
        "ws.history",
        1000,
        positive_int,
        "Messages kept per channel (a capped Redis stream) for clients that reconnect.",
    ),
    Setting(
        "ws.history_seconds",
        0,
        non_negative_int,
        "Seconds a message is kept for replay; 0 keeps the last ws.history messages.",
    ),
    Setting(
        "ws.token_max_age",
        3600,
        positive_int,
        "Seconds a token from stackctl.realtime.token() is accepted after it was made.",
    ),
    Setting(
        "ws.allowed_origins",
        (),
        origins,
        "Origins whose pages may connect; [] allows only the site itself (Origin = Host).",
    ),
    Setting(
        "ws.client_publish",
        (),
        channel_patterns,
        "Channels (fnmatch patterns) that clients may publish to; [] for none.",
    ),
    Setting(
        "ws.sse_prefix",
        "/events/",
        url_prefix,
        "URL prefix of the Server-Sent Events fallback: /events/CHANNEL.",
    ),
    Setting(
        "ws.poll_prefix",
        "/poll/",
        url_prefix,
        "URL prefix of the long-poll fallback: /poll/CHANNEL?since=ID.",
    ),
    Setting("static.url", "/static/", url_prefix, "URL prefix NGiNX serves from static.dir."),
    Setting(
        "static.dir",
        "static",
        optional_path,
        "Directory of static files, relative to the stack directory; empty for none.",
    ),
    Setting(
        "redis.url",
        "embedded",
        redis_url,
        "embedded (a Redis server run by the stack) or the URL of an existing one.",
    ),
    Setting(
        "paths.run_dir",
        ".stackctl/run",
        path,
        "Rendered configs, sockets and pid files, relative to the stack directory.",
    ),
    Setting(
        "paths.log_dir", ".stackctl/log", path, "Per-watcher logs, relative to the stack directory."
    ),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))


def describe_default(setting: Setting) -> str:
    if setting.default is REQUIRED:
        return "(required)"
    if isinstance(setting.default, bool):
        return str(setting.default).lower()
    if isinstance(setting.default, tuple):
        return str(list(setting.default))
    return f'"{setting.default}"' if isinstance(setting.default, str) else str(setting.default)


def markdown_table() -> str:
    """The README's table of profile keys, derived from SETTINGS (a test keeps them equal)."""
    rows = ["| key | default | flag | meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        flag = f"`{s.flag}`" if s.flag else ""
        rows.append(f"| `{s.key}` | `{describe_default(s)}` | {flag} | {s.help} |")
    return "\n".join(rows)
