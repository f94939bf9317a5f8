"""Publishing events to websocket, SSE and long-poll clients, from the app or from any process.

The WSGI workers get ``STACKCTL_REDIS_URL`` (and the rest) from Circus; another process (a cron
job, ``manage.py shell``, a management command) finds the running stack from its working
directory upwards, or from Django's ``settings.BASE_DIR``. The variables, set by hand or by
``eval "$(stackctl env)"``, take precedence. Safe to call from any
thread: redis-py's connection pool hands each caller its own connection.

Every message goes into a capped Redis stream per channel *and* out to the live subscribers,
in one Lua script, so that a message is in the history exactly when it was delivered live. Its
id comes from one counter for all channels ("<ms>-<seq>", increasing across the whole stack),
so a single "last id seen" tells the workers what a reconnecting client missed on every
channel it follows, and whether some of it is older than the history keeps (a *gap*: the
client is told, so that it can fetch the state afresh).

Channels: ``news`` is a broadcast channel anyone may follow; ``user:<name>`` and
``group:<name>`` are followed only with a token (:func:`token`) naming that user or group.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.sentinel
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from redis.backoff import NoBackoff
from redis.retry import Retry

from stackctl import profile
from stackctl.errors import StackError
from stackctl.profile import STACK_FILE
from stackctl.settings import BY_KEY, SENTINEL_SCHEME, Listen, sentinel_address
from stackctl.stack import NO_PROGRAMS, open_connection, plan

REDIS_URL_VARIABLE = "STACKCTL_REDIS_URL"
SECRET_FILE_VARIABLE = "STACKCTL_SECRET_FILE"
HISTORY_VARIABLE = "STACKCTL_HISTORY"  # "<messages> <seconds>", from the profile
DEFAULT_HISTORY = (BY_KEY["ws.history"].default, BY_KEY["ws.history_seconds"].default)
CHANNEL_PREFIX = "stackctl:"
STREAM_PREFIX = "stackctl-history:"
LAST_ID_KEY = "stackctl-last-id"
CHANNEL_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
ID_PATTERN = re.compile(r"\d{1,20}-\d{1,20}")
USER_PREFIX, GROUP_PREFIX = "user:", "group:"
TOKEN_SALT = "stackctl.realtime.token"
STATE_PATH = Path(".stackctl") / "run" / "state.json"  # written by `stackctl up`
HEALTH_PATH = "_health"  # after ws.prefix: GET /ws/_health

PASSWORD_FILE_VARIABLE = "STACKCTL_REDIS_PASSWORD_FILE"
PRIMARY_KEY = "stackctl-primary"  # the replication id of the Redis that issued the last id
BREAK_KEY = "stackctl-break"  # ids before it may have been issued by a primary since lost
ONCE_PREFIX = "stackctl-once:"  # "<id> <receivers>" of a publish() call, for its retries
ONCE_TTL_MS = 30_000  # beyond FAILOVER_WAIT and a timeout: a retry finds its first attempt
FAILOVER_WAIT = 15.0  # publish() waits this long for a Redis (a promoted replica) to answer
RAISE_AHEAD_MS = 60_000  # a worker's last id further ahead of Redis's clock is not believed

# What the scripts below share. KEYS[1]: the last-id counter, KEYS[2]: PRIMARY_KEY,
# KEYS[3]: BREAK_KEY.
#
# Replication to the replicas is asynchronous: a replica that Sentinel promotes may lack the
# last messages (and ids) its primary issued. It cannot know which, only that it happened: its
# replication id differs from the one the last id was issued under, and it has a previous one
# (master_replid2), which a restarted primary (that lost nothing: append-only file) has not.
# It then records a *break*, an id after all it holds and after its own clock: a client that
# resumes from an id before the break may have missed something, and is told so (a gap).
# Ids come from TIME and are never below the counter, so they keep increasing across a
# failover as long as the clocks of the Redis hosts agree within the failover time (NTP);
# each realtime worker also raises the counter to the last id it delivered (RAISE_SCRIPT).
COMMON_SCRIPT = """
local function now_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function record_break(ms, seq)
  local now = now_ms()
  if now > ms then ms, seq = now, 0 else seq = seq + 1 end
  local id = string.format('%d-%d', ms, seq)
  redis.call('SET', KEYS[1], id)
  redis.call('SET', KEYS[3], id)
end
local function check_primary()
  local info = redis.call('INFO', 'replication')
  local replid = string.match(info, 'master_replid:(%x+)')
  local owner = redis.call('GET', KEYS[2])
  if owner == replid then return end
  redis.call('SET', KEYS[2], replid)
  local previous = string.match(info, 'master_replid2:(%x+)')
  if owner and previous and string.find(previous, '[^0]') then
    record_break(parse(redis.call('GET', KEYS[1]) or '0-0'))
  end
end
"""

# KEYS: counter, primary, break, stream, once. ARGV: pubsub channel, channel name, data (JSON),
# max length, max age in ms (0: none), marker TTL, once TTL. Returns {id, number of
# subscribers}. Trimming is exact (no "~"): one entry out per entry in costs little, and the
# profile's cap is the cap.
# Each trim keeps ONE entry beyond the history, never replayed: the *marker*. A client whose
# last id is at or after it missed nothing that was trimmed; one whose last id is before it
# has a gap. With an age limit the stream outlives its last message by a day (MARKER_TTL), so
# that the marker still answers a client that reconnects after a quiet spell.
# The once key makes a retry of the same publish() call (its reply was lost) return the first
# attempt's id instead of publishing the message again.
PUBLISH_SCRIPT = COMMON_SCRIPT + """
local done = redis.call('GET', KEYS[5])
if done then
  local first, receivers = string.match(done, '^(%S+) (%d+)$')
  return {first, tonumber(receivers)}
end
check_primary()
local ms = now_ms()
local seq = 0
local last = redis.call('GET', KEYS[1])
if last then
  local last_ms, last_seq = parse(last)
  if last_ms >= ms then ms, seq = last_ms, last_seq + 1 end
end
local id = string.format('%d-%d', ms, seq)
redis.call('SET', KEYS[1], id)
redis.call('XADD', KEYS[4], 'MAXLEN', tonumber(ARGV[4]) + 1, id, 'd', ARGV[3])
local age = tonumber(ARGV[5])
if age > 0 then
  local marker = redis.call('XREVRANGE', KEYS[4], string.format('(%d-0', ms - age), '-', 'COUNT', 1)
  if marker[1] then redis.call('XTRIM', KEYS[4], 'MINID', marker[1][1]) end
  redis.call('PEXPIRE', KEYS[4], age + tonumber(ARGV[6]))
end
local envelope = '{"id":"' .. id .. '","channel":"' .. ARGV[2] .. '","data":' .. ARGV[3] .. '}'
local receivers = redis.call('PUBLISH', ARGV[1], envelope)
redis.call('SET', KEYS[5], id .. ' ' .. receivers, 'PX', ARGV[7])
return {id, receivers}
"""

# KEYS: counter, primary, break. ARGV: the last id a worker delivered, RAISE_AHEAD_MS.
# Returns the counter. An id above the counter was issued by a Redis whose data this one does
# not have (a lost replica's window, a restart without its files): a break follows it.
RAISE_SCRIPT = COMMON_SCRIPT + """
check_primary()
local last = redis.call('GET', KEYS[1]) or '0-0'
local ms, seq = parse(ARGV[1])
local last_ms, last_seq = parse(last)
local ahead = ms > last_ms or (ms == last_ms and seq > last_seq)
if ahead and ms <= now_ms() + tonumber(ARGV[2]) then record_break(ms, seq) end
return redis.call('GET', KEYS[1]) or '0-0'
"""

# KEYS: counter, primary, break. Returns {TIME in ms, the counter, the break}: what a replay
# compares the client's last id with, after this primary has checked who it is.
CHECK_SCRIPT = COMMON_SCRIPT + """
check_primary()
return {now_ms(), redis.call('GET', KEYS[1]) or '0-0', redis.call('GET', KEYS[3]) or ''}
"""

PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()
MARKER_TTL_MS = 86_400_000
COUNTER_KEYS = (LAST_ID_KEY, PRIMARY_KEY, BREAK_KEY)
# Worth another try within FAILOVER_WAIT: Redis restarting or loading, or a failover under way.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)
RETRY_FIRST_PAUSE, RETRY_MAX_PAUSE = 0.05, 1.0
NO_RETRY = Retry(NoBackoff(), 0)
POOL_WAIT = 10.0  # seconds a caller waits for a free connection of a bounded pool

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


def stream_key(channel: str) -> str:
    return STREAM_PREFIX + check_channel(channel)


def envelope(message_id: str, channel: str, data_json: str) -> str:
    """What every client receives; the same text as the publish script builds."""
    return f'{{"id":"{message_id}","channel":"{channel}","data":{data_json}}}'


def id_key(message_id: str) -> tuple[int, int]:
    """Message ids in the order they were issued."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq)


def is_id(text: str) -> bool:
    """True for text that Redis takes as a stream id: two unsigned 64-bit numbers."""
    return bool(ID_PATTERN.fullmatch(text)) and max(id_key(text)) < 2**64


class UnknownId(ValueError):
    """A client resumes from an id after the last one issued: it cannot have seen it here."""

    def __init__(self, since: str, last: str) -> None:
        super().__init__(f"since: {since} is after the last message id, {last}")


def _environment(variable: str) -> str:
    value = os.environ.get(variable) or stack_environment().get(variable)
    if not value:
        raise StackError(
            f"{variable} is not set and no running stack was found from {Path.cwd()} upwards"
            f"{_django_base_dir_hint()}: run this in the stack's directory (or below it), "
            'or first `eval "$(stackctl env)"` there'
        )
    return value


def find_stack(start: Path) -> Path | None:
    """The stack that ``start`` is in, as git finds a repository: the first of ``start`` and
    its parents holding stack.toml and the state of a stack that ``stackctl up`` started."""
    for directory in (start, *start.parents):
        if (directory / STACK_FILE).is_file() and (directory / STATE_PATH).is_file():
            return directory
    return None


def stack_environment() -> dict[str, str]:
    """The variables the stack gives its workers, for a process it did not start (a shell,
    a cron job, a management command): found from the working directory, else from Django's
    ``settings.BASE_DIR``; empty if neither is in a running stack."""
    for start in (Path.cwd(), _django_base_dir()):
        stack_dir = find_stack(start.resolve()) if start is not None else None
        if stack_dir is not None:
            state = stack_dir / STATE_PATH
            return _running_environment(stack_dir, state.stat().st_mtime_ns)
    return {}


@functools.cache
def _running_environment(stack_dir: Path, state_mtime: int) -> dict[str, str]:
    """Cached for as long as the stack runs with the same state (``up`` rewrites it)."""
    state = json.loads((stack_dir / STATE_PATH).read_text())
    loaded = profile.load(stack_dir, state["profile"], [tuple(p) for p in state["overrides"]])
    return plan(loaded, NO_PROGRAMS, writes=False).worker_env()


def _django_base_dir() -> Path | None:
    django = sys.modules.get("django.conf")  # only if the process already uses Django
    if django is None or not django.settings.configured:
        return None
    base_dir = getattr(django.settings, "BASE_DIR", None)
    return Path(base_dir) if base_dir else None


def _django_base_dir_hint() -> str:
    base_dir = _django_base_dir()
    return f" nor from Django's BASE_DIR {base_dir}" if base_dir else ""


def redis_url() -> str:
    return _environment(REDIS_URL_VARIABLE)


def redis_password(password_file: str | None = None) -> str | None:
    """The first line of ``password_file``, else of the file ``STACKCTL_REDIS_PASSWORD_FILE``
    names; None if no file is named, or its first line is empty. A process the stack did not
    start (no ``STACKCTL_REDIS_URL``) takes the variable from the running stack it is in."""
    environment = os.environ if REDIS_URL_VARIABLE in os.environ else stack_environment()
    path = password_file or environment.get(PASSWORD_FILE_VARIABLE)
    if not path:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StackError(f"{path}: cannot read the Redis password from it ({e})") from None
    return lines[0] if lines and lines[0] else None


class _SentinelBlockingPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """Connections to whichever Redis Sentinel names the primary; a caller beyond the pool's
    size waits for a free connection instead of failing."""


@functools.cache
def _sentinel(url: str, password: str | None) -> redis.sentinel.Sentinel:
    """One set of Sentinel connections per address (and password), shared by every pool."""
    sentinels, _ = sentinel_address(url)
    # Short timeouts, no retry: a Sentinel that does not answer is skipped for the next one.
    asking = {"password": password, "socket_timeout": 1.0, "socket_connect_timeout": 1.0,
              "retry": NO_RETRY}  # fmt: skip
    return redis.sentinel.Sentinel(sentinels, sentinel_kwargs=asking)


def describe_error(error: Exception) -> str:
    """A Redis error in a line a log can hold: redis-py's "no master found" quotes every
    Sentinel's connection in full; what matters is what each Sentinel answered."""
    if isinstance(error, redis.sentinel.MasterNotFoundError):
        answers = re.findall(r" - (\w+:\w+)", str(error))
        said = f": the Sentinels answered {', '.join(answers)}" if answers else ""
        return f"no Sentinel names a primary{said}"
    return str(error)


def connect(url: str, pool_size: int | None = None, password_file: str | None = None,
            **options: Any) -> redis.Redis:  # fmt: skip
    """A client for the Redis at ``url``: "unix:///PATH", "redis://HOST:PORT/DB" (or
    rediss://), or "sentinel://HOST:PORT,HOST:PORT,.../MASTER_NAME", the primary that these
    Sentinels name, found again on each new connection (so, after a failover, the promoted
    replica). The password (for Redis and Sentinel alike) is the first line of the password
    file (:func:`redis_password`); one inside a redis:// URL takes precedence. With
    ``pool_size``, at most that many connections, and callers wait for a free one.
    ``options`` go to redis-py's connections (timeouts, retry); ``password=None`` there says
    there is none, without looking for a file."""
    password = options["password"] if "password" in options else redis_password(password_file)
    options["password"] = password
    if pool_size is not None:
        options.update(max_connections=pool_size, timeout=POOL_WAIT)
    if url.startswith(SENTINEL_SCHEME):
        _, master = sentinel_address(url)
        pool_class = _SentinelBlockingPool if pool_size is not None else None
        extra = {"connection_pool_class": pool_class} if pool_class else {}
        return _sentinel(url, password).master_for(master, **extra, **options)
    if pool_size is not None:
        return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(url, **options))
    return redis.Redis.from_url(url, **options)


def client(url: str | None = None, password_file: str | None = None) -> redis.Redis:
    """A shared client for publishing, from any thread. No retries inside redis-py: publish()
    retries itself, within FAILOVER_WAIT."""
    url = url or redis_url()
    with _lock:
        if url not in _clients:
            _clients[url] = connect(url, password_file=password_file, socket_timeout=5,
                                    socket_connect_timeout=2, retry=NO_RETRY)  # fmt: skip
        return _clients[url]


def history_limits() -> tuple[int, int]:
    """(messages, seconds) kept per channel for clients that reconnect."""
    text = os.environ.get(HISTORY_VARIABLE) or stack_environment().get(HISTORY_VARIABLE)
    if not text:
        return DEFAULT_HISTORY
    length, seconds = text.split()
    return int(length), int(seconds)


def publish(channel: str, message: Any, url: str | None = None) -> int:
    """Send ``message`` (anything JSON can encode) to every client of ``channel``, and keep it
    in the channel's history; returns how many workers received it live."""
    return publish_json(client(url), channel, json.dumps(message), history_limits())


def publish_json(connection: redis.Redis, channel: str, data_json: str,
                 limits: tuple[int, int], wait: float = FAILOVER_WAIT) -> int:  # fmt: skip
    """Publish an already encoded message, keeping at most ``limits`` (messages, seconds).

    While Redis does not answer (a restart, a failover under way) it tries again for up to
    ``wait`` seconds, then raises. Every try carries the same key, so a message whose reply
    was lost is not published twice if the Redis that took it is the one answering now.
    """
    keys, args = publish_arguments(channel, data_json, limits, secrets.token_hex(12))
    deadline = time.monotonic() + wait
    pause = RETRY_FIRST_PAUSE
    while True:
        try:
            _, receivers = run_script(connection, PUBLISH_SCRIPT, keys, args)
            return int(receivers)
        except TRANSIENT:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_PAUSE)


def publish_arguments(channel: str, data_json: str, limits: tuple[int, int],
                      once: str) -> tuple[tuple[str, ...], tuple[str | int, ...]]:  # fmt: skip
    """The keys and arguments of :data:`PUBLISH_SCRIPT` for one publish() call ``once``."""
    length, seconds = limits
    keys = (*COUNTER_KEYS, stream_key(channel), ONCE_PREFIX + once)
    return keys, (redis_key(channel), channel, data_json, length, seconds * 1000, MARKER_TTL_MS,
                  ONCE_TTL_MS)  # fmt: skip


@functools.cache
def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def run_script(connection: redis.Redis, script: str, keys: tuple[str, ...],
               args: tuple[str | int, ...]) -> Any:  # fmt: skip
    try:
        return connection.evalsha(_sha(script), len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:  # a new (or restarted) Redis: send it the script
        return connection.eval(script, len(keys), *keys, *args)


def raise_last_id(connection: redis.Redis, delivered: str) -> str:
    """Raise the id counter to ``delivered``, the last id a worker sent its clients (a promoted
    replica may be behind it), recording a break if it was behind; returns the counter."""
    last = run_script(connection, RAISE_SCRIPT, COUNTER_KEYS, (delivered, RAISE_AHEAD_MS))
    return last.decode() if isinstance(last, bytes) else str(last)


def publish_user(user: str, message: Any, url: str | None = None) -> int:
    """Send to every open connection of ``user`` (those that hold a token naming them)."""
    return publish(USER_PREFIX + user, message, url)


def publish_group(group: str, message: Any, url: str | None = None) -> int:
    """Send to every connection whose token names ``group``."""
    return publish(GROUP_PREFIX + group, message, url)


def gap_notice(channel: str) -> str:
    """Sent instead of messages a client missed that the history no longer holds."""
    return f'{{"channel":"{channel}","gap":true}}'


@dataclass(frozen=True)
class Missed:
    """What a client that saw everything up to some id missed."""

    envelopes: list[str]
    """The messages the history still holds, oldest first."""
    gaps: list[str]
    """The channels where some of what it missed is no longer held."""


def history(connection: redis.Redis, channels: Iterable[str], since: str,
            limits: tuple[int, int]) -> Missed:  # fmt: skip
    """What was published on ``channels`` after the id ``since``, kept as ``limits`` say;
    :class:`UnknownId` if ``since`` is after the last id issued."""
    channels = list(channels)
    # One transaction: the histories of all channels as they were at one instant. A reader
    # that skips live messages up to the newest id it replayed relies on that: with one read
    # per channel, a message on a channel read early could be older than one read later, and
    # be neither replayed nor delivered.
    try:
        counters, *replies = _read_history(connection, channels, since, limits[0])
    except redis.exceptions.NoScriptError:  # a new (or restarted) Redis: send it the script
        connection.script_load(CHECK_SCRIPT)
        counters, *replies = _read_history(connection, channels, since, limits[0])
    now, last, broken = (int(counters[0]), counters[1].decode(), counters[2].decode() or None)
    return missed_since(channels, since, Counters(now, last, broken), limits, replies)


@dataclass(frozen=True)
class Counters:
    """What Redis says of its ids when a client resumes."""

    now_ms: int
    """Its clock, the one the ids come from."""
    last: str
    """The last id issued."""
    broken: str | None
    """Its break: what was issued before it may be lost with a primary that failed."""


def missed_since(channels: list[str], since: str, counters: Counters, limits: tuple[int, int],
                 replies: list[Any]) -> Missed:  # fmt: skip
    """What a client whose last id is ``since`` missed, from what Redis answered: for each
    channel whether its stream exists, and its entries after ``since`` (newest first, one more
    than kept); :class:`UnknownId` if ``since`` is after the last id issued."""
    if counters.broken and id_key(since) < id_key(counters.broken):
        # Issued before a failover: what followed it may be lost with the old primary.
        missed = history_from(channels, since, counters.now_ms, limits, replies)
        return Missed(missed.envelopes, channels)
    if id_key(since) > id_key(counters.last):
        # Replaying from it would skip whatever comes until the ids reach it.
        raise UnknownId(since, counters.last)
    return history_from(channels, since, counters.now_ms, limits, replies)


def _read_history(connection: redis.Redis, channels: list[str], since: str,
                  length: int) -> list[Any]:  # fmt: skip
    pipe = connection.pipeline(transaction=True)
    # The clock the ids come from, the counter and the break, once this primary has checked
    # whether it took over from another.
    pipe.evalsha(_sha(CHECK_SCRIPT), len(COUNTER_KEYS), *COUNTER_KEYS)
    for channel in channels:
        key = stream_key(channel)
        pipe.exists(key)
        # Newest first: one more than the history holds means the client missed more than it.
        pipe.xrevrange(key, min=f"({since}", count=length + 1)
    return list(pipe.execute())


def history_from(channels: list[str], since: str, now_ms: int, limits: tuple[int, int],
                 replies: list[Any]) -> Missed:  # fmt: skip
    length, seconds = limits
    oldest_kept = (now_ms - seconds * 1000, 0)
    found: list[tuple[tuple[int, int], str]] = []
    gaps = []
    for channel, exists, entries in zip(channels, replies[::2], replies[1::2], strict=True):
        gap = len(entries) > length
        if not exists and seconds:
            # Gone after a day without a message: if the client's last id is older, there
            # may have been messages since, and the marker that would tell is gone too.
            gap = id_key(since)[0] < now_ms - seconds * 1000 - MARKER_TTL_MS
        for raw_id, fields in entries[:length]:
            message_id = raw_id.decode()
            if seconds and id_key(message_id) < oldest_kept:
                gap = True
                continue
            found.append((id_key(message_id), envelope(message_id, channel, fields[b"d"].decode())))
        if gap:
            gaps.append(channel)
    return Missed([text for _, text in sorted(found)], gaps)


@dataclass(frozen=True)
class Health:
    """What the realtime worker says of itself."""

    ok: bool
    """True if it can deliver: its Redis listener runs and Redis answers."""
    reason: str
    """A few words: "delivering", or what is wrong."""


def health(ws_address: Path | Listen, prefix: str = "/ws/", timeout: float = 3.0) -> Health:
    """Ask the realtime worker behind ``ws_address`` (the socket Circus holds for it,
    ``Stack.ws_address``) whether it can deliver; no NGiNX involved. Never raises: a worker
    that does not answer is not healthy either."""
    request = (f"GET {prefix}{HEALTH_PATH} HTTP/1.0\r\nHost: localhost\r\n\r\n").encode()
    try:
        with open_connection(ws_address, timeout) as sock:
            sock.sendall(request)
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
    except OSError as e:
        return Health(False, f"the realtime worker does not answer: {e}")
    head, _, body = response.partition(b"\r\n\r\n")
    try:
        return Health(head.split()[1] == b"200", str(json.loads(body)["reason"]))
    except (IndexError, ValueError, KeyError, TypeError):
        return Health(False, f"unexpected answer from the realtime worker: {response[:80]!r}")


# --- tokens: who a connection belongs to ---------------------------------------------------


def _serializer(secret: str | bytes) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret, salt=TOKEN_SALT)


def secret() -> bytes:
    return Path(_environment(SECRET_FILE_VARIABLE)).read_bytes().strip()


def ensure_secret(path: Path, mode: int = 0o600, gid: int | None = None) -> None:
    """Create the stack's signing secret once, readable by its owner and, when root runs the
    app as another user, by that user's group ``gid`` (``mode`` 0640); an existing one gets
    that mode and group. Every file is opened in its directory, without following a link:
    root must never write, or change the mode of, a file someone else planted there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        raise StackError(
            f"{path.parent} is a symbolic link or not a directory; remove it, stackctl "
            "recreates it"
        ) from None
    try:
        try:
            descriptor = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
        except FileNotFoundError:
            create_secret(directory, path.name, mode, gid)
            return
        except OSError:
            raise StackError(f"{path} is a symbolic link; remove it") from None
        try:
            share(descriptor, mode, gid)
        finally:
            os.close(descriptor)
    finally:
        os.close(directory)


def create_secret(directory: int, name: str, mode: int, gid: int | None) -> None:
    staged = f"{name}.new"
    with suppress(FileNotFoundError):
        os.unlink(staged, dir_fd=directory)  # a link planted here is removed, never followed
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    descriptor = os.open(staged, flags, 0o600, dir_fd=directory)
    with os.fdopen(descriptor, "w") as f:
        share(f.fileno(), mode, gid)
        f.write(secrets.token_urlsafe(32))
    os.replace(staged, name, src_dir_fd=directory, dst_dir_fd=directory)


def share(descriptor: int, mode: int, gid: int | None) -> None:
    """Give a file of the user's own its mode and group (a file of someone else's is left)."""
    if os.fstat(descriptor).st_uid != os.geteuid():
        return
    if gid is not None:
        os.fchown(descriptor, -1, gid)
    os.fchmod(descriptor, mode)


def token(user: str | None, groups: Iterable[str] = (), key: bytes | None = None) -> str:
    """A signed token naming ``user`` and ``groups``, for ``?token=`` on the realtime URLs.

    It is checked by the worker against the stack's secret and expires after the profile's
    ``ws.token_max_age`` seconds (counted from now).
    """
    return str(_serializer(key or secret()).dumps({"user": user, "groups": sorted(groups)}))


def read_token(text: str, key: bytes, max_age: int) -> tuple[str | None, frozenset[str]]:
    """(user, groups) named by a valid token; raises ValueError saying why one is refused."""
    user, groups, _ = read_token_until(text, key, max_age)
    return user, groups


def read_token_until(text: str, key: bytes,
                     max_age: int) -> tuple[str | None, frozenset[str], float]:  # fmt: skip
    """(user, groups, the time.time() at which it expires) of a valid token; raises ValueError
    saying why one is refused."""
    try:
        claims, signed_at = _serializer(key).loads(text, max_age=max_age, return_timestamp=True)
    except SignatureExpired:
        raise ValueError("the token has expired") from None
    except BadSignature:
        raise ValueError("the token's signature is not valid") from None
    expires = signed_at.timestamp() + max_age
    return claims.get("user"), frozenset(claims.get("groups", ())), expires


def django_token(request: Any) -> str:
    """A token for the user of a Django request (anonymous: no user, no group)."""
    user = request.user
    if not user.is_authenticated:
        return token(None)
    return token(user.get_username(), user.groups.values_list("name", flat=True))


def token_app(user_of: Callable[[dict[str, Any]], tuple[str | None, Iterable[str]]]) -> Any:
    """A WSGI app answering ``{"token": ...}`` for the (user, groups) that ``user_of(environ)``
    finds, e.g. from the app's own session cookie. Mount it where the page can fetch it."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        user, groups = user_of(environ)
        body = json.dumps({"token": token(user, groups)}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Cache-Control", "no-store"),
                                  ("Content-Length", str(len(body)))])  # fmt: skip
        yield body

    return app
