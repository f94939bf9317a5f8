"""Who may follow which channels: the request's Origin, its token and the channels it names.

Broadcast channels are open to every page of the site; ``user:<name>`` and ``group:<name>``
need a token (:func:`stackctl.realtime.token`) that names that user or group. A browser always
sends ``Origin``; a page from another site is refused, whatever it asks for. Clients that are
not browsers send no Origin and are judged by their token alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from stackctl.realtime import CHANNEL_PATTERN, GROUP_PREFIX, USER_PREFIX, is_id, read_token_until

MAX_CHANNELS = 32


class Refused(Exception):
    """A request that may not subscribe: ``status`` and the reason, for the HTTP answer."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Rules:
    """The profile's realtime rules, as the worker was started with them."""

    secret: bytes
    token_max_age: int
    allowed_origins: tuple[str, ...] = ()
    client_publish: tuple[str, ...] = ()

    def may_publish(self, channel: str) -> bool:
        return any(fnmatchcase(channel, pattern) for pattern in self.client_publish)


@dataclass(frozen=True)
class Subscription:
    channels: tuple[str, ...]
    since: str | None
    """Replay what was published after this id first (a client that reconnects)."""
    user: str | None
    groups: frozenset[str] = frozenset()
    expires: float | None = None
    """When its token expires (time.time()); a websocket is closed then, to come back with a
    fresh one."""


def check_origin(environ: dict[str, Any], rules: Rules) -> None:
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return
    if rules.allowed_origins:
        if origin in rules.allowed_origins:
            return
    elif urlsplit(origin).netloc == environ.get("HTTP_HOST"):
        return
    raise Refused("403 Forbidden", f"pages from {origin} may not connect here")


def parse_channels(text: str) -> tuple[str, ...]:
    channels = tuple(dict.fromkeys(unquote(text).split(",")))
    if not 0 < len(channels) <= MAX_CHANNELS or not all(
        CHANNEL_PATTERN.fullmatch(c) for c in channels
    ):
        raise Refused(
            "400 Bad Request",
            f"expected 1 to {MAX_CHANNELS} channels separated by commas, each of letters, "
            "digits, '_', '.', ':' or '-'",
        )
    return channels


def identify(token: str | None, rules: Rules) -> tuple[str | None, frozenset[str], float | None]:
    """Who a token names, and when it expires; no token: nobody, never."""
    if not token:
        return None, frozenset(), None
    try:
        return read_token_until(token, rules.secret, rules.token_max_age)
    except ValueError as e:
        raise Refused("403 Forbidden", str(e)) from None


def check_allowed(channels: tuple[str, ...], user: str | None, groups: frozenset[str]) -> None:
    for channel in channels:
        if channel.startswith(USER_PREFIX) and channel[len(USER_PREFIX) :] != user:
            raise Refused("403 Forbidden", f"{channel!r} needs a token for that user")
        if channel.startswith(GROUP_PREFIX) and channel[len(GROUP_PREFIX) :] not in groups:
            raise Refused("403 Forbidden", f"{channel!r} needs a token for that group")


def subscription(environ: dict[str, Any], prefix: str, rules: Rules,
                 last_event_id: str | None = None) -> Subscription:  # fmt: skip
    """What a request may follow, or :class:`Refused` saying why not."""
    check_origin(environ, rules)
    path = environ.get("PATH_INFO", "")
    if not path.startswith(prefix):
        raise Refused("404 Not Found", f"expected {prefix}<channel>")
    channels = parse_channels(path[len(prefix) :])
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    since = last_event_id or query.get("since")
    if since is not None and not is_id(since):
        raise Refused("400 Bad Request", f"since: expected a message id such as 1700000000000-0, "
                      f"got {since!r}")  # fmt: skip
    user, groups, expires = identify(query.get("token"), rules)
    check_allowed(channels, user, groups)
    return Subscription(channels, since, user, groups, expires)
