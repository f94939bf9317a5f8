"""The Prometheus exporter: ``GET /metrics`` on metrics.listen, one text page of the whole host.

Circus runs it as the ``metrics`` watcher, as circusd's user: it asks circusd's control
socket for each watcher's processes, CPU and memory (the service user must not reach that
socket), and counts the processes Circus starts from circusd's event socket. The other
sources are read when scraped, each with a short timeout:

- NGiNX: its access log, followed across rotations (:mod:`stackctl.follow`) from the end it
  had when the exporter started: requests by status class, request and upstream time;
- uWSGI: the files each worker keeps of its requests and busy time (:mod:`stackctl.workerstats`);
- Redis: INFO (memory, connections);
- the websocket worker: its own counters, on its unix socket (:mod:`stackctl.ws.counters`).

A source that does not answer is reported down by its ``stackctl_<source>_up`` gauge and its
other metrics are left out: the scrape still answers 200 at once. Nothing secret is read
into the page: no URL, no password, no query string.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import socketserver
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import closing, suppress
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from stackctl import workerstats
from stackctl.realtime import PASSWORD_FILE_VARIABLE, REDIS_URL_VARIABLE
from stackctl.settings import Invalid, metrics_listen

log = logging.getLogger("stackctl.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SOURCE_TIMEOUT = 1.0  # seconds one source may take to answer a scrape
CIRCUS_TIMEOUT = 2.0
SCRAPE_DEADLINE = 5.0  # longest a source may hold a scrape (circusd: two calls of 2 s)
FRESH_FOR = 0.5  # scrapes this close together share one reading: a flood costs nothing more
LOG_POLL = 0.5
SWEEP_SECONDS = 5.0  # how soon the file of a worker that ended is removed
REQUEST_TIMEOUT = 5.0  # a client that sends its request slower than this is dropped
MAX_WAITING = 32  # connections still sending their request; past this, the oldest goes
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
WS_PAGE_LIMIT = 256 * 1024  # the worker's page is some 3 kB
WS_COMMENT = re.compile(r"# (?P<kind>HELP|TYPE) (?P<name>stackctl_ws_[a-z_]+) [ -~]*")
WS_SAMPLE = re.compile(
    r'(?P<series>stackctl_ws_[a-z_]+(?:\{[a-z_]+="[\w.-]*"(?:,[a-z_]+="[\w.-]*")*\})?)'
    r" -?\d+(?:\.\d+)?(?:e[+-]?\d+)?"
)

# The access log's line (nginx.conf.j2, log_format path_only): the request in quotes (NGiNX
# escapes a quote inside as \x22), status, bytes, referer, user agent, request time, upstream
# time ("-" without an upstream; "0.1, 0.2" when it tried two).
ACCESS_LINE = re.compile(
    rb'\] "[^"]*" (?P<status>\d{3}) \d+ "[^"]*" "[^"]*" (?P<request>[\d.]+)'
    rb"(?: (?P<upstream>[-\d.,: ]+))?"
)


@dataclass
class Family:
    """One metric family: its samples as (labels, value)."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> Family:
        """A sample; ``suffix`` names a summary's parts (``_sum``, ``_count``)."""
        self.samples.append((suffix, labels, value))
        return self


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(families: Iterable[Family]) -> str:
    """Prometheus text format 0.0.4."""
    lines = []
    for family in families:
        lines += [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} {family.kind}"]
        for suffix, labels, value in family.samples:
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            name = family.name + suffix
            lines.append(f"{name}{{{text}}} {number(value)}" if text else
                         f"{name} {number(value)}")  # fmt: skip
    return "\n".join(lines) + "\n"


def up(source: str, ok: bool, what: str) -> Family:
    return Family(f"stackctl_{source}_up", "gauge", f"1 if {what} answered this scrape.").add(
        1 if ok else 0
    )


# --- NGiNX, from its access log ----------------------------------------------------------------


class AccessLog:
    """Totals of the access log's lines since the exporter started."""

    def __init__(self, path: Path) -> None:
        from stackctl.follow import Follower

        self.follower = Follower(path)
        self.follower.tail(0)  # from its end: what came before is not ours to count
        self.lock = threading.Lock()
        self.requests: dict[str, int] = dict.fromkeys(STATUS_CLASSES, 0)
        self.request_seconds = 0.0
        self.upstream_seconds = 0.0
        self.upstream_responses = 0

    def poll(self) -> None:
        lines = self.follower.poll()
        with self.lock:
            for line in lines:
                self.take(line)

    def take(self, line: bytes) -> None:
        match = ACCESS_LINE.search(line)
        if match is None:
            return
        status = match["status"].decode()[0] + "xx"
        self.requests[status] = self.requests.get(status, 0) + 1
        self.request_seconds += float(match["request"])
        upstream = (match["upstream"] or b"-").strip()
        times = [float(t) for t in re.split(rb"[,:] ?", upstream) if re.fullmatch(rb"[\d.]+", t)]
        if times:
            self.upstream_responses += 1
            self.upstream_seconds += sum(times)

    def follow_forever(self) -> None:
        while True:
            try:
                self.poll()
            except OSError as e:
                log.warning("reading the access log failed: %s", e.strerror)
            time.sleep(LOG_POLL)

    def families(self) -> list[Family]:
        with self.lock:
            requests = Family("stackctl_nginx_requests_total", "counter",
                              "Requests NGiNX logged, by status class (static files are not "
                              "logged, so not counted).")  # fmt: skip
            for status, count in sorted(self.requests.items()):
                requests.add(count, status=status)
            # A summary without quantiles: its _sum and _count, for rate() to divide.
            upstream = Family("stackctl_nginx_upstream_response_seconds", "summary",
                              "Time the app (uWSGI) or the websocket worker took to answer "
                              "NGiNX.")  # fmt: skip
            upstream.add(self.upstream_seconds, "_sum").add(self.upstream_responses, "_count")
            return [
                requests,
                Family("stackctl_nginx_request_seconds_total", "counter",
                       "Time NGiNX spent on the requests it logged.").add(self.request_seconds),
                upstream,
            ]  # fmt: skip


# --- Circus ------------------------------------------------------------------------------------


class Restarts:
    """Processes Circus starts, per watcher, from circusd's event socket."""

    def __init__(self, pubsub_endpoint: str) -> None:
        self.endpoint = pubsub_endpoint
        self.started: dict[str, int] = defaultdict(int)

    def listen_forever(self) -> None:
        import zmq

        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        subscriber = context.socket(zmq.SUB)
        subscriber.setsockopt(zmq.SUBSCRIBE, b"watcher.")
        subscriber.connect(self.endpoint)
        while True:
            topic, *_ = subscriber.recv_multipart()
            parts = topic.decode(errors="replace").split(".")
            if len(parts) == 3 and parts[2] == "spawn":
                self.started[parts[1]] += 1


def process_infos(endpoint: str, watchers: list[str]) -> dict[str, Any] | None:
    """Circus's stats of each watcher's processes; None if circusd is busy. Circus fails them
    all when one process has a child that exited unwaited for (a zombie): then they are asked
    watcher by watcher, and where that fails too, the pids alone."""
    from stackctl.supervisor import _call_once

    stats = _call_once(endpoint, "stats", CIRCUS_TIMEOUT, {})
    if stats.get("status") == "ok":
        infos: dict[str, Any] = stats.get("infos", {})
        return infos
    infos = {}
    for name in watchers:
        one = _call_once(endpoint, "stats", CIRCUS_TIMEOUT, {"name": name})
        if one.get("status") == "ok":
            infos[name] = one.get("info", {})
            continue
        listed = _call_once(endpoint, "list", CIRCUS_TIMEOUT, {"name": name})
        if listed.get("status") != "ok":
            return None
        infos[name] = {str(pid): {} for pid in listed.get("pids", [])}
    return infos


def circus_families(endpoint: str, watchers: list[str], restarts: Restarts) -> list[Family]:
    from stackctl.errors import StackError
    from stackctl.supervisor import _call_once, _number, _rss

    try:
        status = _call_once(endpoint, "status", CIRCUS_TIMEOUT, {})
        infos = process_infos(endpoint, watchers)
    except StackError:
        return [up("circus", False, "circusd")]
    if status.get("status") != "ok" or infos is None:
        return [up("circus", False, "circusd")]  # busy with a command of its own: next time
    states = status.get("statuses", {})
    running = Family("stackctl_watcher_up", "gauge", "1 if Circus runs the watcher (active).")
    processes = Family("stackctl_watcher_processes", "gauge", "Processes of the watcher.")
    cpu = Family("stackctl_watcher_cpu_percent", "gauge",
                 "CPU use of the watcher's processes, in percent of one core.")  # fmt: skip
    rss = Family("stackctl_watcher_rss_bytes", "gauge",
                 "Resident memory of the watcher's processes.")  # fmt: skip
    started = Family("stackctl_watcher_restarts_total", "counter",
                     "Processes Circus started in place of others (a crash, a recycled worker, "
                     "a reload) since the exporter started.")  # fmt: skip
    for name in watchers:
        state = states.get(name)
        if state is None:
            continue
        procs = {pid: info for pid, info in (infos.get(name) or {}).items()
                 if pid != "name" and isinstance(info, dict)}  # fmt: skip
        running.add(1 if state == "active" else 0, watcher=name)
        processes.add(len(procs), watcher=name)
        if all("cpu" in info for info in procs.values()):  # not when Circus gave pids alone
            cpu.add(sum(_number(info.get("cpu")) for info in procs.values()), watcher=name)
        rss.add(sum(_rss(int(pid)) for pid in procs), watcher=name)
        started.add(restarts.started.get(name, 0), watcher=name)
    return [up("circus", True, "circusd"), running, processes, cpu, rss, started]


# --- uWSGI, Redis, the websocket worker, NGiNX's port ------------------------------------------


def sweep_forever(directory: Path) -> None:
    """Remove the files of the workers that ended, scraped or not: a worker leaves its file
    behind (killed, recycled, replaced by a reload or by dev's restart on each save), and a
    stack that nobody scrapes would gather one per worker it ever started; the longer such a
    file stays, the likelier its pid is some other process's, taken for a worker."""
    while True:
        time.sleep(SWEEP_SECONDS)
        try:
            workerstats.read_all(directory)
        except OSError as e:
            log.warning("looking over the uWSGI workers' files failed: %s", e.strerror)


def wsgi_families(directory: Path) -> list[Family]:
    requests = Family("stackctl_wsgi_worker_requests_total", "counter",
                      "Requests a uWSGI worker answered, by its pid.")  # fmt: skip
    busy = Family("stackctl_wsgi_worker_busy_seconds_total", "counter",
                  "Time a uWSGI worker spent on requests, by its pid.")  # fmt: skip
    samples = workerstats.read_all(directory)
    for sample in samples:
        requests.add(sample.requests, pid=str(sample.pid))
        busy.add(sample.busy_seconds, pid=str(sample.pid))
    workers = Family("stackctl_wsgi_workers", "gauge", "uWSGI workers that keep statistics.")
    return [workers.add(len(samples)), requests, busy]


def redis_families(url: str, password_file: str | None) -> list[Family]:
    import redis

    from stackctl import realtime

    options: dict[str, Any] = {"password_file": password_file} if password_file else {
        "password": None}  # fmt: skip
    try:
        client = realtime.connect(url, **options, socket_timeout=SOURCE_TIMEOUT,
                                  socket_connect_timeout=SOURCE_TIMEOUT,
                                  retry=realtime.NO_RETRY)  # fmt: skip
        try:
            info = client.info()
        finally:
            client.close()
    except (redis.RedisError, OSError) as e:
        log.debug("Redis does not answer (%s)", type(e).__name__)  # its text may hold the URL
        return [up("redis", False, "Redis")]
    return [
        up("redis", True, "Redis"),
        Family("stackctl_redis_memory_bytes", "gauge", "Memory Redis uses (used_memory).")
        .add(int(info.get("used_memory", 0))),
        Family("stackctl_redis_connected_clients", "gauge", "Connections open to Redis.")
        .add(int(info.get("connected_clients", 0))),
        Family("stackctl_redis_commands_total", "counter", "Commands Redis has processed.")
        .add(int(info.get("total_commands_processed", 0))),
    ]  # fmt: skip


def read_unix(path: Path, timeout: float = SOURCE_TIMEOUT, limit: int = WS_PAGE_LIMIT) -> bytes:
    """What the server on ``path`` says before it closes: at most ``limit`` bytes, in at most
    ``timeout`` seconds in all (not per read: a server that trickles is dropped too)."""
    with closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as s:
        deadline = time.monotonic() + timeout
        s.settimeout(timeout)
        s.connect(str(path))
        chunks: list[bytes] = []
        size = 0
        while True:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ValueError(f"the websocket worker says more than {limit} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError("the websocket worker is too slow")


def ws_text(path: Path) -> str:
    """The websocket worker's own exposition, after its up gauge. The worker runs as the
    service user, who can put anything on that socket: a page that is not the worker's
    (a line that is not a stackctl_ws_ sample, a family twice) would make Prometheus refuse
    the whole scrape, or print what it likes in `stackctl top`, so it counts as no answer."""
    try:
        text = read_unix(path).decode()
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.debug("the websocket worker's counters: %s", type(e).__name__)
        return exposition([up("ws", False, "the websocket worker")])
    if not ws_page_is_sound(text):
        log.warning("the websocket worker's counters are not in the expected form: left out")
        return exposition([up("ws", False, "the websocket worker")])
    return exposition([up("ws", True, "the websocket worker")]) + text


def ws_page_is_sound(text: str) -> bool:
    """Only stackctl_ws_ families (never the exporter's own stackctl_ws_up), each described
    once, each series once, label values of plain characters."""
    if text and not text.endswith("\n"):
        return False
    described: set[tuple[str, str]] = set()
    series: set[str] = set()
    for line in text.splitlines():
        comment = WS_COMMENT.fullmatch(line)
        if comment is not None:
            key = (comment["kind"], comment["name"])
            if key in described or comment["name"] == "stackctl_ws_up":
                return False
            described.add(key)
            continue
        sample = WS_SAMPLE.fullmatch(line)
        if sample is None or sample["series"] in series or line.startswith("stackctl_ws_up"):
            return False
        series.add(sample["series"])
    return True


def nginx_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=SOURCE_TIMEOUT):
            return True
    except OSError:
        return False


# --- the exporter ------------------------------------------------------------------------------


@dataclass
class Sources:
    """Where this host's numbers are; None for what this host does not run."""

    circus_endpoint: str
    watchers: list[str]
    restarts: Restarts
    access_log: AccessLog | None = None
    front: tuple[str, int] | None = None
    wsgi_stats: Path | None = None
    redis_url: str | None = None
    redis_password_file: str | None = None
    ws_socket: Path | None = None
    readings: dict[str, Reading] = field(default_factory=dict)

    def scrape(self) -> str:
        """Every source at once, each on a thread of its own, waited for until SCRAPE_DEADLINE:
        a source that hangs (a Redis that trickles a reply without end honours its timeout on
        each read, never in all) costs its own numbers only, and the scrape still answers."""
        started: list[Reading] = []

        def start(source: str, what: str, read: Callable[[], str]) -> None:
            reading = self.readings.setdefault(source, Reading(source, what))
            reading.start(read)
            started.append(reading)

        start("circus", "circusd", lambda: exposition(
            circus_families(self.circus_endpoint, self.watchers, self.restarts)))  # fmt: skip
        if self.front is not None:
            front = self.front
            start("nginx", "NGiNX", lambda: exposition([up("nginx", nginx_answers(*front),
                                                           "NGiNX")]))  # fmt: skip
        if self.wsgi_stats is not None:
            stats = self.wsgi_stats
            start("wsgi", "the uWSGI workers' files", lambda: exposition(wsgi_families(stats)))
        if self.redis_url is not None:
            url, password_file = self.redis_url, self.redis_password_file
            start("redis", "Redis", lambda: exposition(redis_families(url, password_file)))
        if self.ws_socket is not None:
            ws = self.ws_socket
            start("ws", "the websocket worker", lambda: ws_text(ws))
        deadline = time.monotonic() + SCRAPE_DEADLINE
        pages = [reading.result(deadline) for reading in started]
        if self.access_log is not None:
            pages.insert(2 if self.front is not None else 1,
                         exposition(self.access_log.families()))  # fmt: skip
        return "".join(pages)


class Reading:
    """One source's reading, on a thread of its own. While one hangs, no other is started
    for that source: a source that never answers holds one thread, not one per scrape."""

    def __init__(self, source: str, what: str) -> None:
        self.source, self.what = source, what
        self.thread: threading.Thread | None = None
        self.page: list[str] = []

    def start(self, read: Callable[[], str]) -> None:
        if self.thread is not None and self.thread.is_alive():
            return  # still at an earlier one: its answer, if it comes in time, will do
        page: list[str] = []
        self.page = page
        self.thread = threading.Thread(
            target=lambda: page.append(guarded(self.source, self.what, read)),
            name=f"reading {self.source}", daemon=True,
        )  # fmt: skip
        self.thread.start()

    def result(self, deadline: float) -> str:
        if self.thread is not None:
            self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.page:
            return self.page[0]
        log.warning("%s did not answer within %.0f s: left out of the scrape", self.what,
                    SCRAPE_DEADLINE)  # fmt: skip
        return exposition([up(self.source, False, self.what)])


def guarded(source: str, what: str, read: Callable[[], str]) -> str:
    """``read()``, or if it fails in a way not foreseen, the source's up gauge at 0: one
    source's trouble must not cost the whole page."""
    try:
        return read()
    except Exception as e:
        log.warning("reading %s failed: %s", what, type(e).__name__)  # its text may hold a URL
        return exposition([up(source, False, what)])


class Cache:
    """The last scrape's page, shared by the scrapes that come within FRESH_FOR seconds."""

    def __init__(self, scrape: Callable[[], str], clock: Callable[[], float] = time.monotonic):
        self.scrape = scrape
        self.clock = clock
        self.lock = threading.Lock()
        self.page = b""
        self.taken = float("-inf")

    def get(self) -> bytes:
        with self.lock:  # one scrape at a time: the others wait and share it
            if self.clock() - self.taken >= FRESH_FOR:
                self.page = self.scrape().encode()
                self.taken = self.clock()
            return self.page


def handler(cache: Cache) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT
        server_version = "stackctl-metrics"
        sys_version = ""

        def parse_request(self) -> bool:
            parsed = super().parse_request()  # reads the headers too
            assert isinstance(self.server, Server)
            if not self.server.request_read(self.request):
                self.close_connection = True
                return False  # dropped for being slow: what it sent is cut short
            return parsed

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?", 1)[0] != "/metrics":
                self.answer(404, b"only /metrics is served here\n", "text/plain")
                return
            self.answer(200, cache.get(), CONTENT_TYPE)

        def answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per scrape would fill the log with nothing worth reading

    return Handler


class Server(ThreadingHTTPServer):
    """Every local user reaches the port. A connection that sends its request slowly, or
    never, holds a thread and a file: past MAX_WAITING such connections the oldest is
    dropped, so that a few hundred idle ones cannot use up the files the process may open
    (a scraper sends its request at once, and is never the oldest for long)."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], cache: Cache) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.waiting: dict[Any, None] = {}  # by arrival: the first is the oldest
        self.waiting_lock = threading.Lock()
        super().__init__(address, handler(cache))

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.waiting_lock:
            self.waiting[request] = None
            while len(self.waiting) > MAX_WAITING:
                oldest = next(iter(self.waiting))
                del self.waiting[oldest]
                with suppress(OSError):
                    oldest.shutdown(socket.SHUT_RD)  # its thread reads the end, and ends
        super().process_request(request, client_address)

    def request_read(self, request: Any) -> bool:
        """The request is in; False if it came too late (its connection was dropped)."""
        with self.waiting_lock:
            return self.waiting.pop(request, False) is None

    def shutdown_request(self, request: Any) -> None:
        self.request_read(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback per failed request: a client that leaves before
        # its answer, again and again, would fill the log with them.
        kind = sys.exc_info()[0]
        if kind is not None and issubclass(kind, ConnectionError):
            return
        log.warning("answering a request failed: %s", kind.__name__ if kind else "?")

    def server_bind(self) -> None:
        # HTTPServer's own looks the address up in DNS (getfqdn): a start held up by a slow
        # resolver, for a name nothing here uses.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


CRASH_EXIT_STATUS = 70  # EX_SOFTWARE: Circus starts a fresh exporter


def start_thread(run: Callable[[], None], name: str) -> None:
    """Run ``run`` for the life of the process. If it fails, the process ends: an exporter
    whose counts silently stopped would report a quiet site instead of a broken exporter."""

    def for_life() -> None:
        try:
            run()
        except BaseException:
            log.critical("%s failed; exiting so that Circus starts a fresh exporter", name,
                         exc_info=True)  # fmt: skip
            logging.shutdown()
            os._exit(CRASH_EXIT_STATUS)

    threading.Thread(target=for_life, name=name, daemon=True).start()


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(prog="python -m stackctl.metrics", description=__doc__)
    options.add_argument("--listen", required=True, help="HOST:PORT (metrics.listen)")
    options.add_argument("--endpoint", required=True, help="circusd's control endpoint")
    options.add_argument("--pubsub", required=True, help="circusd's event endpoint")
    options.add_argument("--watcher", action="append", default=[], help="a watcher to report")
    options.add_argument("--access-log", type=Path, help="NGiNX's access log")
    options.add_argument("--front", help="HOST:PORT where NGiNX serves the site")
    options.add_argument("--wsgi-stats", type=Path, help="the uWSGI workers' statistics files")
    options.add_argument("--redis", action="store_true",
                         help="report the Redis that STACKCTL_REDIS_URL names (with the password "
                         "in STACKCTL_REDIS_PASSWORD_FILE, if set): not on the command line, "
                         "which every user may read")  # fmt: skip
    options.add_argument("--ws-socket", type=Path, help="the websocket worker's counters")
    return options


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s metrics[%(process)d] %(levelname)s %(message)s"
    )
    try:
        listen = metrics_listen(args.listen)
    except Invalid as e:
        print(f"stackctl metrics: --listen: {e}", file=sys.stderr)
        return 2
    assert listen is not None
    restarts = Restarts(args.pubsub)
    sources = Sources(args.endpoint, args.watcher, restarts, front=host_port(args.front)
                      if args.front else None, wsgi_stats=args.wsgi_stats,
                      redis_url=os.environ[REDIS_URL_VARIABLE] if args.redis else None,
                      redis_password_file=os.environ.get(PASSWORD_FILE_VARIABLE),
                      ws_socket=args.ws_socket)  # fmt: skip
    start_thread(restarts.listen_forever, "circus events")
    if args.wsgi_stats is not None:
        start_thread(partial(sweep_forever, args.wsgi_stats), "workers' files")
    if args.access_log is not None:
        sources.access_log = AccessLog(args.access_log)
        start_thread(sources.access_log.follow_forever, "access log")
    server = Server((listen.host, listen.port), Cache(sources.scrape))
    log.info("serving Prometheus metrics on http://%s/metrics", listen)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
