"""Publishing events to websocket clients, from the app or from any process on the host.

The WSGI workers get ``STACKCTL_REDIS_URL`` from Circus; another process (a cron job, a
management command) gets it from ``eval "$(stackctl env)"``. Safe to call from any thread:
redis-py's connection pool hands each caller its own connection.
"""

from __future__ import annotations

import os
import re
import threading

import redis

from stackctl.errors import StackError

REDIS_URL_VARIABLE = "STACKCTL_REDIS_URL"
CHANNEL_PREFIX = "stackctl:"
CHANNEL_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,200}")

_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()


def check_channel(channel: str) -> str:
    if not CHANNEL_PATTERN.fullmatch(channel):
        raise StackError(
            f"channel {channel!r}: expected 1 to 200 letters, digits, '_', '.', ':' or '-'"
        )
    return channel


def redis_key(channel: str) -> str:
    return CHANNEL_PREFIX + check_channel(channel)


def redis_url() -> str:
    url = os.environ.get(REDIS_URL_VARIABLE)
    if not url:
        raise StackError(
            f"{REDIS_URL_VARIABLE} is not set: run this under the stack, or first "
            '`eval "$(stackctl env)"` in the stack directory'
        )
    return url


def client(url: str | None = None) -> redis.Redis:
    url = url or redis_url()
    with _lock:
        if url not in _clients:
            _clients[url] = redis.Redis.from_url(url)
        return _clients[url]


def publish(channel: str, message: str, url: str | None = None) -> int:
    """Send ``message`` to every client of ``channel``; returns how many workers received it."""
    return int(client(url).publish(redis_key(channel), message))
