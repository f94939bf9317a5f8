"""Every profile key, declared once: its type, default, help text and command-line flag.

The profile loader, the ``--set``/``--workers``/``--listen`` overrides and the README's table of
keys are all derived from :data:`SETTINGS`. A parser takes a value as TOML gives it (or as the
command line gives it, already read as TOML where that parses) and returns the typed value, or
raises :class:`Invalid` saying what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit


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


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_range(low: int, high: int) -> Callable[[Any], int]:
    """A parser for whole numbers from ``low`` (0 or 1) to ``high``: a number too large for
    the program that reads it (circusd crashed on a backlog of 99999999999) is refused here."""
    first = "a positive integer" if low == 1 else "a whole number, 0 or more"
    what = f"{first} up to {high}"

    def parse(value: Any) -> int:
        if not _whole(value) or not low <= value <= high:
            raise _expect(what, value)
        return int(value)

    return parse


SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


@functools.cache  # every profile load parses the defaults too: read the kernel's once
def kernel_backlog_limit() -> int:
    """The kernel caps every listen backlog at net.core.somaxconn; asking more is pointless."""
    try:
        return int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        return 4096  # Linux's default since 5.4


def backlog(value: Any) -> int:
    limit = kernel_backlog_limit()
    if not _whole(value) or not 1 <= value <= limit:
        raise _expect(
            f"a positive integer up to {limit} (this kernel's limit, from {SOMAXCONN}; "
            "raise it with sysctl net.core.somaxconn first)",
            value,
        )
    return int(value)


MAX_WORKERS = 512


def workers(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if not _whole(value) or not 1 <= value <= MAX_WORKERS:
        raise _expect(f'a positive integer up to {MAX_WORKERS}, or "auto"', value)
    return int(value)


# One DNS label: letters, digits and inner hyphens, at most 63 characters.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def is_hostname(text: str) -> bool:
    # A last label of digits alone makes no host name (no top-level domain is numeric):
    # "1.2.3.4.5" is a mistyped address, which NGiNX would refuse only at `nginx -t`.
    last = text.rstrip(".").rsplit(".", 1)[-1]
    return len(text) <= 253 and _HOSTNAME.fullmatch(text) is not None and not last.isdigit()


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def listen(value: Any) -> Listen:
    form = (
        "HOST:PORT, where HOST is a host name, an IP address ([::1] for IPv6) or *, and PORT "
        'is from 1 to 65535, e.g. "127.0.0.1:8000"'
    )
    if not isinstance(value, str):
        raise _expect(form, value)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", value)
    if not match:
        raise _expect(form, value)
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    bracketed = match.group(1) is not None
    valid_host = (
        is_ip_address(host) and ":" in host
        if bracketed
        else host == "*" or is_ip_address(host) or is_hostname(host)
    )
    if not valid_host or not 0 < port < 65536:
        raise _expect(form, value)
    return Listen(host, port)


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
    form = 'a URL path that starts and ends with "/", e.g. "/ws/"'
    if not isinstance(value, str) or not re.fullmatch(r"/([\w.~-]+/)+", value):
        raise _expect(form, value)
    if any(part.strip(".") == "" for part in value.strip("/").split("/")):
        raise _expect(form + ', without "." or ".." segments', value)
    return value


def check_path(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"/[\w./~%-]*(\?[\w./~%&=+-]*)?", value):
        raise _expect('a URL path such as "/" or "/health?full=1"', value)
    return value


def _list_of(value: Any, item: str, form: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, str) and re.fullmatch(item, v) for v in value
    ):
        raise _expect(form, value)
    return tuple(value)


def origins(value: Any) -> tuple[str, ...]:
    form = 'a list of origins such as ["https://example.com"], or [] for the site itself'
    found = _list_of(value, r"https?://[\w.-]+(:\d{1,5})?", form)
    for origin in found:
        host = origin.split("://", 1)[1].rsplit(":", 1)[0]
        if not (is_hostname(host) or is_ip_address(host)):
            raise _expect(form, value)
    return found


def channel_patterns(value: Any) -> tuple[str, ...]:
    form = 'a list of channel names or patterns such as ["chat", "room.*"], or []'
    return _list_of(value, r"[\w.:*-]{1,200}", form)


def redis_url(value: Any) -> str:
    """``embedded``, or a URL taken apart and checked piece by piece: it reaches the workers'
    environment in circus.ini, where a stray character would be read as config."""
    form = (
        '"embedded", redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://..., unix:///PATH or '
        f"{SENTINEL_FORM}, "
        'e.g. "redis://127.0.0.1:6379/0" (percent-encode other characters of the password, '
        '"$" as %24)'
    )
    if value == "embedded":
        return value
    if isinstance(value, str) and value.startswith(SENTINEL_SCHEME):
        sentinel_address(value)
        return value
    if not isinstance(value, str) or not value.isprintable() or " " in value:
        raise _expect(form, _without_password(value) if isinstance(value, str) else value)
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError:
        raise _expect(form, _without_password(value)) from None
    if url.scheme == "unix":
        ok = not url.netloc and _is_clean_path(url.path) and url.path.startswith("/")
    elif url.scheme in ("redis", "rediss"):
        host = url.hostname or ""
        ok = (
            (is_hostname(host) or is_ip_address(host))
            and (port is None or 0 < port < 65536)
            and re.fullmatch(r"(/\d{0,5})?", url.path) is not None
            and all(_URL_SAFE.fullmatch(part or "") for part in (url.username, url.password))
        )
    else:
        ok = False
    # Options such as ?db=1&socket_timeout=5; nothing after a "#".
    ok = ok and not url.fragment and re.fullmatch(r"[\w.=&-]*", url.query) is not None
    if not ok or "$" in value or "%(" in value:
        raise _expect(form, _without_password(value))
    return value


SENTINEL_SCHEME = "sentinel://"
SENTINEL_FORM = "sentinel://HOST:PORT,HOST:PORT,.../MASTER_NAME"
_SENTINEL_URL = re.compile(r"sentinel://(?P<hosts>[^/?#]+)/(?P<master>[A-Za-z0-9_.-]{1,64})")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):(?P<port>\d{1,5})")


def sentinel_address(value: str) -> tuple[list[tuple[str, int]], str]:
    """The Sentinels (host, port) and the master's name of a ``sentinel://`` URL; it carries
    no password (workers read it from a file, so that it never shows in their environment)."""
    if "@" in value:
        raise Invalid(
            f"a {SENTINEL_SCHEME} address takes no password: put it on the first line of "
            f".stackctl/redis-password instead, got {_describe(_without_password(value))}"
        )
    found = _SENTINEL_URL.fullmatch(value)
    if found is None:
        example = "sentinel://10.0.0.5:26379,10.0.0.6:26379/main"
        raise _expect(f'{SENTINEL_FORM}, e.g. "{example}" (a master name of 1 to 64 letters, '
                      "digits, '_', '.' or '-')", value)  # fmt: skip
    hosts = []
    for item in found["hosts"].split(","):
        part = _HOST_PORT.fullmatch(item)
        host = part["host"].strip("[]") if part else ""
        port = int(part["port"]) if part else 0
        if not (is_hostname(host) or is_ip_address(host)) or not 0 < port < 65536:
            raise Invalid(f"expected {SENTINEL_FORM}, each Sentinel a host name or address "
                          f"and a port from 1 to 65535: {item!r} is not, in {value!r}")  # fmt: skip
        hosts.append((host, port))
    return hosts, found["master"]


def _without_password(url: str) -> str:
    # An error message may end up in a terminal log or a CI transcript: no password in it.
    return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", url)


# Percent-encoded user info: what a URL allows there, minus what a config would read.
_URL_SAFE = re.compile(r"[\w.~!*+,=%-]*")

# Path characters that the configs stackctl writes (NGiNX, uWSGI, Circus ini, Redis) read as
# syntax or expand: quotes, ; { } # $ % \\ and backticks, and every control character.
_PATH_FORBIDDEN = set(";{}\"'`$%\\#")


def _is_clean_path(text: str) -> bool:
    return text.isprintable() and not _PATH_FORBIDDEN & set(text)


_PATH_RULE = "without quotes, control characters or any of ; { } # $ % \\ `"


def path(value: Any) -> str:
    if not isinstance(value, str) or not value or not _is_clean_path(value):
        raise _expect(f"a non-empty path {_PATH_RULE}", value)
    return value


def optional_path(value: Any) -> str:
    if not isinstance(value, str) or not _is_clean_path(value):
        raise _expect(f'a path {_PATH_RULE}, or "" for none', value)
    return value


_INSIDE_RULE = (
    'a directory inside the stack directory, relative to it (such as ".stackctl/run"), '
    'without a leading "/" or any ".." part'
)


def stack_subdir(value: Any) -> str:
    """A directory that stackctl creates, writes and makes private: it must stay inside the
    stack, or a stack file or ``--set`` would have stackctl (maybe as root) take over any
    directory on the machine, such as /var/log or a shared /tmp directory."""
    text = path(value)
    parts = PurePosixPath(text).parts
    if not parts or parts[0] == "/" or ".." in parts:
        raise _expect(_INSIDE_RULE, value)
    return text


def check_clean_path(what: str, value: Path) -> None:
    """For paths that come from the file system (the stack directory itself)."""
    if not _is_clean_path(str(value)):
        raise Invalid(
            f"{what} {str(value)!r} cannot be written into the configs; move it to a path "
            f"{_PATH_RULE}"
        )


# A server name: a host name, optionally with a leading "*." or "." or a trailing ".*"
# (NGiNX's wildcards), or "_" for any. NGiNX's regular-expression names are not offered.
_SERVER_NAME = re.compile(rf"(\*\.|\.)?{_LABEL}(\.{_LABEL})*(\.\*)?")


def server_names(value: Any) -> str:
    form = 'host names separated by spaces (*.example.com and example.* allowed), or "_" for any'
    if not isinstance(value, str) or not value or value != value.strip():
        raise _expect(form, value)
    for name in value.split(" "):
        if name == "_":
            continue
        if len(name) > 253 or not _SERVER_NAME.fullmatch(name):
            raise _expect(form, value)
    return value


def user_name(value: Any) -> str:
    """Syntax only: whether the user exists is checked where the stack is planned."""
    if not isinstance(value, str) or not re.fullmatch(r"([A-Za-z_][A-Za-z0-9_.-]{0,31})?", value):
        raise _expect(
            'a user name of this machine (up to 32 letters, digits, "_", "." or "-", not '
            'starting with a digit, "." or "-"), or "" for the owner of the stack directory',
            value,
        )
    return value


def size(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"\d{1,6}[kKmMgG]?", value):
        raise _expect('a size such as "10m", "512k" or "0" (no limit)', value)
    return value


# A file-name pattern reaches NGiNX as a regular expression in a quoted string: it may hold
# only what a name pattern needs, so that nothing in it can be read as NGiNX syntax, as a
# variable ($), or as a regex feature that Python's re and NGiNX's PCRE read differently.
_NAME_PATTERN_CHARS = re.compile(r"[\w.~/\-\[\]()|?*+^{},:\\]*")
_NAME_PATTERN_ESCAPED = set(".-+()[]|?*^dw")
_QUANTIFIER = re.compile(r"\{\d{1,3}(,\d{0,3})?\}")

DJANGO_MANIFEST_NAME = r"[^/]+\.[0-9a-f]{12}(\.[^/]+)?"
"""ManifestStaticFilesStorage's names, such as base.0123456789ab.css (12 hex digits of MD5)."""


def _plain_escapes(value: str) -> bool:
    """Every backslash escapes one of the characters a name pattern may escape."""
    escaped = False
    for char in value:
        if escaped and char not in _NAME_PATTERN_ESCAPED:
            return False
        escaped = not escaped and char == "\\"
    return not escaped


_REPEATS = re.compile(r"[+*]|\{\d{1,3},\d{0,3}\}")
"""What repeats the group before it more than once: +, *, {n,} or {n,m} (m > 1 decided below)."""


def _nested_repeat(value: str) -> str | None:
    """A repeated group that itself repeats or chooses (``(\\w+)+``, ``(a|aa)*``), if any: it
    can be matched in exponentially many ways, and NGiNX tries them all on each request's
    path until PCRE's limit, then answers 500 (90 ms of a worker per request, measured)."""
    opened: list[tuple[int, bool]] = []  # each open group: where, and whether it repeats inside
    escaped = in_class = False
    for index, char in enumerate(value):
        if escaped or (in_class and char != "]"):
            escaped = char == "\\" and not escaped
            continue
        if char == "\\":
            escaped = True
        elif char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        elif char == "(":
            opened.append((index, False))
        elif char == ")" and opened:
            start, inner = opened.pop()
            after = _REPEATS.match(value, index + 1)
            many = after is not None and not re.fullmatch(r"\{\d+,[01]\}", after.group())
            if inner and many:
                return value[start : after.end() if after else index + 1]
            if opened and inner:
                opened[-1] = (opened[-1][0], True)
        elif opened and (char in "+*|" or (char == "{" and _REPEATS.match(value, index))):
            opened[-1] = (opened[-1][0], True)
    return None


def file_name_pattern(value: Any) -> str:
    form = (
        f'a regular expression for file names, such as "{DJANGO_MANIFEST_NAME}" (Django\'s '
        'ManifestStaticFilesStorage), or "" for none; made of letters, digits, '
        r". _ ~ - / [ ] ( ) | ? * + ^ : and {n} or {n,m}, with \ only before d, w or one of "
        "those, and (? only as (?:"
    )
    if (
        not isinstance(value, str)
        or len(value) > 200
        or not _NAME_PATTERN_CHARS.fullmatch(value)
        or not _plain_escapes(value)
        or re.search(r"[{}]", _QUANTIFIER.sub("", value))
        or re.search(r"\(\?(?!:)", value)
    ):
        raise _expect(form, value)
    try:
        re.compile(value)
    except re.error as e:
        raise Invalid(
            f"{_describe(value)} is not a regular expression ({e}); expected {form}"
        ) from None
    nested = _nested_repeat(value)
    if nested:
        raise Invalid(
            f"{_describe(value)}: {nested!r} repeats a group that repeats or chooses inside, "
            "which NGiNX may try to match in more ways than it has time for (each request "
            "then answers 500); expected a pattern without such nesting, e.g. "
            r'"[\w-]+\.[0-9a-f]{8,20}\.(css|js)"'
        )
    return value


REQUIRED: Any = object()
"""Default of a setting that has none: the stack file or a profile must give it."""


@dataclass(frozen=True)
class Setting:
    """One profile key as declared in its section class: the key's only declaration."""

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


def setting(default: Any, parse: Callable[[Any], Any], help: str, flag: str | None = None) -> Any:
    """Declare a field of a section class as a profile key, with all there is to know of it.

    The field's annotation is the type of the parsed value; the default goes through ``parse``
    like any other value. (The declaration is the dataclass field, not a separate table, so
    that mypy knows ``profile.server.listen`` is a :class:`Listen`.)
    """
    return dataclasses.field(metadata={"setting": (default, parse, help, flag)})


# --- the profile keys, section by section --------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    listen: Listen = setting(
        "127.0.0.1:8000", listen, "Address NGiNX listens on, HOST:PORT.", "--listen"
    )
    names: str = setting(
        "_", server_names, "NGiNX server_name: host names separated by spaces, _ for any."
    )
    max_body: str = setting(
        "10m", size, "Largest request body NGiNX accepts (client_max_body_size)."
    )
    timeout: int = setting(
        60,
        int_range(1, 3600),
        "Seconds a request may take: NGiNX then answers 504, and a second later uWSGI "
        "kills the worker still running it (harakiri); Circus starts a fresh one.",
    )
    drain_seconds: int = setting(
        0,
        int_range(0, 600),
        "Seconds `stackctl down` (or a stop by signal, as systemd's) keeps serving after "
        "GET /_stackctl/health turned 503, so that load balancers take this host out first.",
    )
    user: str = setting(
        "",
        user_name,
        "User the app's processes (uWSGI, the websocket worker, Redis, NGiNX's workers) run "
        "as. Empty: yourself, when a normal user starts the stack; root must name one, who "
        'may not write in the stack directory, or write "root" to run them as root.',
    )


@dataclass(frozen=True)
class AppConfig:
    wsgi: str = setting(
        REQUIRED,
        wsgi_callable,
        "The WSGI callable, package.module:callable, importable from the stack directory.",
        "--app",
    )
    django_settings: str = setting(
        "", module_name, "DJANGO_SETTINGS_MODULE for the workers, empty for a non-Django app."
    )
    deploy_checks: bool = setting(
        False,
        boolean,
        "Before `up` and `reload` start the app, run Django's `check --deploy` with the "
        "workers' settings, show its warnings, and refuse DEBUG = True (prod turns it on).",
    )
    allow_debug: bool = setting(
        False,
        boolean,
        "With app.deploy_checks, start even when the Django settings have DEBUG = True "
        "(tracebacks and settings then show to every visitor).",
    )


@dataclass(frozen=True)
class WsgiConfig:
    workers: int | str = setting(
        "auto", workers, "uWSGI processes; auto = 2 x the CPUs this process may use.", "--workers"
    )
    threads: int = setting(1, int_range(1, 256), "Threads per uWSGI process.", "--threads")
    log_requests: bool = setting(
        True,
        boolean,
        "uWSGI logs every request; NGiNX's access log has them too, so prod turns it off.",
    )
    autoreload: bool = setting(
        False,
        boolean,
        "Restart workers by themselves when a Python file of the app changes (dev does).",
    )
    max_requests: int = setting(
        0,
        int_range(0, 100_000_000),
        "Recycle a worker after this many requests (0: never); it finishes its request first.",
    )
    max_rss_mb: int = setting(
        0,
        int_range(0, 1_048_576),
        "Recycle a worker whose resident memory passes this many MiB (0: no limit).",
    )
    backlog: int = setting(
        1024,
        backlog,
        "Listen backlog of the WSGI socket (circusd holds it): connections queued while all "
        "workers are busy, or while they restart; at most the kernel's net.core.somaxconn.",
    )
    graceful_timeout: int = setting(
        30,
        int_range(1, 3600),
        "Seconds a stopping worker may take to finish its requests before it is killed.",
    )
    check_path: str = setting(
        "/",
        check_path,
        "Path a reload asks a trial worker for before it replaces the running ones: an error "
        "answer where the running workers succeed refuses the reload.",
    )


@dataclass(frozen=True)
class WsConfig:
    prefix: str = setting(
        "/ws/",
        url_prefix,
        "URL prefix routed to the websocket worker; /ws/CHANNEL subscribes to CHANNEL.",
    )
    ping_interval: int = setting(
        20,
        int_range(1, 3600),
        "Seconds between the websocket worker's pings; a client silent for two is dropped.",
    )
    max_message: int = setting(
        65536,
        int_range(1, 64 * 2**20),
        "Largest message in bytes a websocket client may send; a larger one closes it (1009).",
    )
    max_connections: int = setting(
        10000,
        int_range(1, 1_000_000),
        "Websocket clients one worker accepts; the next ones get 503.",
    )
    queue_limit: int = setting(
        256,
        int_range(1, 100_000),
        "Messages queued for one slow client before it is disconnected (1013).",
    )
    history: int = setting(
        1000,
        int_range(1, 1_000_000),
        "Messages kept per channel (a capped Redis stream) for clients that reconnect.",
    )
    history_seconds: int = setting(
        0,
        int_range(0, 30 * 86400),
        "Seconds a message is kept for replay; 0 keeps the last ws.history messages.",
    )
    token_max_age: int = setting(
        3600,
        int_range(1, 30 * 86400),
        "Seconds a token from stackctl.realtime.token() is accepted after it was made.",
    )
    allowed_origins: tuple[str, ...] = setting(
        (),
        origins,
        "Origins whose pages may connect; [] allows only the site itself (Origin = Host).",
    )
    client_publish: tuple[str, ...] = setting(
        (),
        channel_patterns,
        "Channels (fnmatch patterns) that clients may publish to; [] for none.",
    )
    sse_prefix: str = setting(
        "/events/", url_prefix, "URL prefix of the Server-Sent Events fallback: /events/CHANNEL."
    )
    poll_prefix: str = setting(
        "/poll/", url_prefix, "URL prefix of the long-poll fallback: /poll/CHANNEL?since=ID."
    )


@dataclass(frozen=True)
class StaticConfig:
    url: str = setting("/static/", url_prefix, "URL prefix NGiNX serves from static.dir.")
    dir: str = setting(
        "static",
        optional_path,
        "Directory of static files, relative to the stack directory; empty for none.",
    )
    immutable: str = setting(
        DJANGO_MANIFEST_NAME,
        file_name_pattern,
        "Regular expression matching the whole name of a fingerprinted static file (a new "
        "content gets a new name): browsers keep those a year without asking again "
        "(Cache-Control: immutable); other static files, an hour. Empty for none.",
    )
    compress: bool = setting(
        True,
        boolean,
        "Compress static files once, at up and reload (or `stackctl compress`), into file.gz "
        "beside each, which NGiNX sends as is (gzip_static); off, NGiNX compresses them on "
        "every request (dev: an edited file shows at once).",
    )


@dataclass(frozen=True)
class MediaConfig:
    url: str = setting(
        "/media/", url_prefix, "URL prefix NGiNX serves uploaded files at, from media.dir."
    )
    dir: str = setting(
        "",
        optional_path,
        "Directory of uploaded files (Django's MEDIA_ROOT), relative to the stack directory; "
        "empty for none. Served as files only, never run, with a sandboxing "
        "Content-Security-Policy.",
    )


@dataclass(frozen=True)
class RedisConfig:
    url: str = setting(
        "embedded",
        redis_url,
        "embedded (a Redis server run by the stack) or the URL of an existing one; "
        "sentinel://HOST:PORT,HOST:PORT/MASTER_NAME follows the primary these Sentinels name "
        "(its password, if any, on the first line of .stackctl/redis-password).",
    )


@dataclass(frozen=True)
class PathsConfig:
    run_dir: str = setting(
        ".stackctl/run",
        stack_subdir,
        "Rendered configs, sockets and pid files, relative to the stack directory.",
    )
    log_dir: str = setting(
        ".stackctl/log", stack_subdir, "Per-watcher logs, relative to the stack directory."
    )


@dataclass(frozen=True)
class LogsConfig:
    max_mb: int = setting(
        100,
        int_range(0, 1_048_576),
        "Size in MiB at which a log (each watcher's, circusd's, NGiNX's access log) is rotated: "
        "renamed to .1 (the older ones to .2, .3...) and started anew; 0: never.",
    )
    keep: int = setting(
        5, int_range(1, 1000), "Rotated files kept per log; the oldest beyond that is deleted."
    )


TLS_OFF = ""
SELF_SIGNED = "self-signed"


def certificate(value: Any) -> str:
    if value == SELF_SIGNED:
        return value
    if not isinstance(value, str) or not _is_clean_path(value):
        raise _expect(
            f'the path of a PEM certificate file {_PATH_RULE}, "self-signed", or "" for no HTTPS',
            value,
        )
    return value


def optional_stack_subdir(value: Any) -> str:
    return "" if value == "" else stack_subdir(value)


# Referrer-Policy values a browser understands (the W3C Referrer Policy list), or "" for none.
REFERRER_POLICIES = (
    "no-referrer", "no-referrer-when-downgrade", "origin", "origin-when-cross-origin",
    "same-origin", "strict-origin", "strict-origin-when-cross-origin", "unsafe-url",
)  # fmt: skip


def networks(value: Any) -> tuple[str, ...]:
    form = 'a list of IP addresses or networks, such as ["127.0.0.1", "10.0.0.0/8", "::1"]'
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _expect(form, value)
    try:
        return tuple(str(ipaddress.ip_network(v, strict=False)) for v in value)
    except ValueError:
        raise _expect(form, value) from None


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise _expect("one of " + ", ".join(f'"{c}"' for c in choices), value)
        return str(value)

    return parse


@dataclass(frozen=True)
class TlsConfig:
    certificate: str = setting(
        TLS_OFF,
        certificate,
        "HTTPS: a PEM certificate file (the full chain), relative to the stack directory or "
        'absolute; "self-signed" for one stackctl makes (staging and tests only); "" for none.',
    )
    key: str = setting(
        "", optional_path, "The certificate's private key (PEM), when tls.certificate is a file."
    )
    listen: Listen = setting(
        "127.0.0.1:8443",
        listen,
        "Address NGiNX serves HTTPS (HTTP/2 and HTTP/1.1) on, HOST:PORT, when TLS is on; "
        "server.listen then redirects to it.",
    )
    acme_dir: str = setting(
        "",
        optional_stack_subdir,
        "Webroot for certbot (certbot certonly --webroot -w DIR), inside the stack directory: "
        'NGiNX serves its /.well-known/acme-challenge/ over plain HTTP; "" for none.',
    )


@dataclass(frozen=True)
class HeadersConfig:
    hsts: int = setting(
        31536000,
        int_range(0, 2 * 31536000),
        "Strict-Transport-Security max-age in seconds, sent only over HTTPS; 0 for none.",
    )
    nosniff: bool = setting(
        True, boolean, "Send X-Content-Type-Options: nosniff unless the app sends its own."
    )
    referrer_policy: str = setting(
        "strict-origin-when-cross-origin",
        one_of(*REFERRER_POLICIES, ""),
        'Referrer-Policy unless the app sends its own; "" for none.',
    )
    frame_options: str = setting(
        "DENY",
        one_of("DENY", "SAMEORIGIN", ""),
        'X-Frame-Options unless the app sends its own: DENY, SAMEORIGIN or "" for none.',
    )


@dataclass(frozen=True)
class LimitsConfig:
    realtime_per_ip: int = setting(
        100,
        int_range(1, 1_000_000),
        "Open websocket, event-stream and long-poll requests one client IP may hold; the "
        "next get 429.",
    )
    requests_per_second: int = setting(
        0,
        int_range(0, 1_000_000),
        "Requests per second one client IP may send to the app (static files excepted); "
        "over it, plus limits.burst, they get 429. 0: no limit.",
    )
    burst: int = setting(
        20, int_range(0, 1_000_000), "Requests over limits.requests_per_second let through."
    )
    exempt: tuple[str, ...] = setting(
        ("127.0.0.1", "::1"),
        networks,
        "Client addresses (or networks) these limits leave alone: this host's own clients, "
        "such as a proxy in front or a load test, all share one address.",
    )


def cache_size(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[1-9]\d{0,5}[kKmMgG]?", value):
        raise _expect('a size such as "1g", "500m" or "100000k"', value)
    return value


def nginx_time(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[1-9]\d{0,5}[smhd]", value):
        raise _expect('a time such as "30s", "10m", "2h" or "7d"', value)
    return value


def cookie_names(value: Any) -> tuple[str, ...]:
    form = 'a list of cookie names such as ["sessionid", "csrftoken"], or [] for none'
    return _list_of(value, r"[\w.-]{1,64}", form)


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = setting(
        False,
        boolean,
        "NGiNX keeps the app's pages that say it may (Cache-Control: public with max-age or "
        "s-maxage, or X-Accel-Expires) and answers GET and HEAD with them without asking the "
        "app; stackctl.cache.refresh(path) and purge(path) update one.",
    )
    max_size: str = setting(
        "1g", cache_size, "Disk space the kept pages may take; the least used go first."
    )
    inactive: str = setting(
        "10m",
        nginx_time,
        "A page nobody asked for in this long is dropped, however long the app said it "
        "stays fresh; until then an outdated copy is served while a new one is fetched, or "
        "while the app fails or reloads.",
    )
    session_cookies: tuple[str, ...] = setting(
        ("sessionid", "csrftoken", "messages"),
        cookie_names,
        "Cookies of a visitor whose pages are their own (Django's session, CSRF and messages "
        "cookies): a request carrying one, or an Authorization header, always goes to the app "
        "and its answer is never kept.",
    )


ROLES = ("front", "wsgi", "ws", "redis")
"""What a host may run: NGiNX, the uWSGI pool, the websocket worker, Redis (and Sentinel)."""


def roles(value: Any) -> tuple[str, ...]:
    form = 'a list of the parts this host runs, from "' + '", "'.join(ROLES) + '"'
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(v, str) and v in ROLES for v in value)
        or len(set(value)) != len(value)
    ):
        raise _expect(form + ", each at most once", value)
    return tuple(role for role in ROLES if role in value)  # one order, whatever the file's


def _private_address(text: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address of a private network (RFC 1918, 198.18.0.0/15, fc00::/7...) or loopback."""
    if not isinstance(text, str):
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A link-local address (169.254.0.0/16, fe80::/10) is on every link at once: it names no
    # one private network, and an IPv6 one cannot be bound without naming its interface.
    usable = address.is_private and not (address.is_unspecified or address.is_link_local)
    return address if usable else None


_PRIVATE_RULE = (
    "an IP address of a private network (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, "
    "198.18.0.0/15, fc00::/7) or loopback: the app and Redis are never served on a public "
    "interface"
)


def _same_host(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """One address however written: fd00::1 is FD00:0::1, 198.18.0.5 is ::ffff:198.18.0.5."""
    address = _private_address(text)
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def private_address(value: Any) -> str:
    if value == "":
        return value
    if _private_address(value) is None:
        raise _expect(f'{_PRIVATE_RULE}, or "" for a single host', value)
    return str(value)


def private_addresses(value: Any) -> tuple[str, ...]:
    form = f"a list of distinct addresses, each {_PRIVATE_RULE}"
    if not isinstance(value, list | tuple) or any(_private_address(v) is None for v in value):
        raise _expect(form, value)
    if len({_same_host(v) for v in value}) != len(value):
        raise _expect(form, value)
    return tuple(str(v) for v in value)


def master_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise _expect('a name of 1 to 64 letters, digits, "_", "." or "-"', value)
    return value


PORT = int_range(1, 65535)


@dataclass(frozen=True)
class ClusterConfig:
    roles: tuple[str, ...] = setting(
        ROLES,
        roles,
        "What this host runs: front (NGiNX), wsgi (the uWSGI pool), ws (the websocket "
        "worker), redis (Redis, with Sentinel when cluster.redis_hosts lists several).",
    )
    address: str = setting(
        "",
        private_address,
        "This host's address on the private network: its wsgi and ws pools, Redis and "
        'Sentinel listen there (TCP) for the other hosts; "" for a single host (unix sockets).',
    )
    front_hosts: tuple[str, ...] = setting(
        (),
        private_addresses,
        "Addresses of the front hosts: only they may connect to this host's wsgi and ws "
        "ports (other sources are dropped by the listening sockets).",
    )
    app_hosts: tuple[str, ...] = setting(
        (),
        private_addresses,
        "Addresses of the app hosts a front host balances across (their cluster.wsgi_port "
        'and cluster.ws_port); [] for this host\'s own pools.',
    )
    redis_hosts: tuple[str, ...] = setting(
        (),
        private_addresses,
        "Addresses of the redis hosts, the first one the primary to begin with: one runs a "
        "shared Redis; three or more run Redis with replicas and Sentinel, which promotes "
        "a replica when the primary dies. [] for redis.url.",
    )
    wsgi_port: int = setting(8001, PORT, "Port of an app host's wsgi pool (uwsgi protocol).")
    ws_port: int = setting(8002, PORT, "Port of an app host's websocket worker (HTTP).")
    redis_port: int = setting(6379, PORT, "Port of Redis on the redis hosts.")
    sentinel_port: int = setting(26379, PORT, "Port of Sentinel on the redis hosts.")
    master_name: str = setting(
        "stackctl", master_name, "The name Sentinel knows the Redis primary by."
    )


def metrics_listen(value: Any) -> Listen | None:
    """HOST:PORT on loopback or a private network, or "" (no exporter). The metrics name the
    app's watchers, its request rates and its Redis: never on a public or wildcard address."""
    form = (
        'HOST:PORT where HOST is a loopback or private IP address ([::1] for IPv6), e.g. '
        '"127.0.0.1:9108", or "" to serve no metrics'
    )
    if value == "":
        return None
    try:
        found = listen(value)
    except Invalid:
        raise _expect(form, value) from None
    if _private_address(found.host) is None:
        raise _expect(form + " (metrics tell about the site: not on a public address)", value)
    return found


@dataclass(frozen=True)
class MetricsConfig:
    listen: Listen | None = setting(
        "127.0.0.1:9108",
        metrics_listen,
        "Address the Prometheus exporter serves /metrics on (watchers, requests, uWSGI "
        'workers, Redis, realtime counters); loopback or a private address; "" for none.',
    )


SECTION_TYPES: dict[str, type] = {
    "server": ServerConfig,
    "app": AppConfig,
    "wsgi": WsgiConfig,
    "ws": WsConfig,
    "static": StaticConfig,
    "media": MediaConfig,
    "redis": RedisConfig,
    "paths": PathsConfig,
    "logs": LogsConfig,
    "tls": TlsConfig,
    "headers": HeadersConfig,
    "limits": LimitsConfig,
    "cluster": ClusterConfig,
    "cache": CacheConfig,
    "metrics": MetricsConfig,
}
"""Each section of a profile and the class its keys are declared in, in the README's order."""

SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f"{section}.{f.name}", *f.metadata["setting"])
    for section, cls in SECTION_TYPES.items()
    for f in dataclasses.fields(cls)
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
    from stackctl.background import markdown_rows  # it builds on this module

    return "\n".join([*rows, *markdown_rows()])
