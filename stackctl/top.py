"""``stackctl top``: the exporter's numbers, live in the terminal, as uwsgitop or ``pm2 monit``.

Each frame compares two scrapes of ``/metrics`` (metrics.listen) one second apart: the
counters become rates. Plain ANSI, no curses: the screen is cleared and redrawn. ``q`` or
Ctrl-C leaves; ``--once`` prints one frame and exits.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from stackctl.errors import StackError
from stackctl.settings import Listen

INTERVAL = 1.0
SCRAPE_TIMEOUT = 5.0
PAGE_LIMIT = 16 * 2**20  # a page of thousands of workers is some megabytes
CLEAR = "\x1b[H\x1b[2J"
BOLD, DIM, RED, RESET = "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[0m"
SAMPLE = re.compile(r"(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ANSI_PARTS = re.compile(f"({ANSI.pattern})")  # split() keeps the codes, at odd places
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Labels = tuple[tuple[str, str], ...]


@dataclass
class Scrape:
    """One reading of /metrics: every sample by name, then labels; and when it was taken."""

    at: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=lambda: defaultdict(dict))

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get(name, {}).get(tuple(sorted(labels.items())))

    def by(self, name: str, label: str) -> dict[str, float]:
        return {dict(k).get(label, ""): v for k, v in self.samples.get(name, {}).items()}


def parse(text: str, at: float) -> Scrape:
    scrape = Scrape(at)
    for line in text.splitlines():
        if not line or line.startswith("#") or not line.isprintable():
            continue  # a control character would reach the terminal as a code
        match = SAMPLE.match(line)
        if match is None:
            continue
        labels = tuple(sorted(LABEL.findall(match["labels"] or "")))
        try:
            scrape.samples[match["name"]][labels] = float(match["value"])
        except ValueError:
            continue
    return scrape


def read_page(response: BinaryIO, url: str) -> str:
    """The page, up to PAGE_LIMIT: a server that is not the exporter may send without end."""
    body = response.read(PAGE_LIMIT + 1)
    if len(body) > PAGE_LIMIT:
        raise StackError(f"metrics.listen: {url} sends more than {PAGE_LIMIT} bytes: is it "
                         "the exporter? see `stackctl logs metrics`")  # fmt: skip
    return body.decode(errors="replace")


def fetch(listen: Listen, clock: Callable[[], float] = time.monotonic) -> Scrape:
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    url = f"http://{host}:{listen.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
            return parse(read_page(response, url), clock())
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise StackError(
            f"metrics.listen: the exporter does not answer on {url} ({reason}); "
            "see `stackctl logs metrics`"
        ) from None


def rate(now: Scrape, before: Scrape, name: str, **labels: str) -> float:
    later, earlier = now.value(name, **labels), before.value(name, **labels)
    seconds = now.at - before.at
    if later is None or earlier is None or seconds <= 0 or later < earlier:
        return 0.0  # a counter that went back: the process restarted
    return (later - earlier) / seconds


def megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}M"


def state(up: float | None) -> str:
    return "up" if up == 1 else f"{RED}DOWN{RESET}"


def frame(now: Scrape, before: Scrape, title: str) -> str:
    """One screen: watchers, requests, uWSGI workers, Redis, realtime."""
    lines = [f"{BOLD}{title}{RESET}  {DIM}(q or Ctrl-C to leave){RESET}", ""]
    lines.append(f"{BOLD}{'WATCHER':<10} {'STATE':<6} {'PROCS':>5} {'CPU%':>6} {'RSS':>9} "
                 f"{'RESTARTS':>8}{RESET}")  # fmt: skip
    for watcher, running in now.by("stackctl_watcher_up", "watcher").items():
        procs = now.value("stackctl_watcher_processes", watcher=watcher) or 0
        cpu = now.value("stackctl_watcher_cpu_percent", watcher=watcher) or 0
        restarts = now.value("stackctl_watcher_restarts_total", watcher=watcher) or 0
        rss = megabytes(now.value("stackctl_watcher_rss_bytes", watcher=watcher))
        lines.append(f"{watcher:<10} {state(running):<6} {procs:>5.0f} {cpu:>6.1f} {rss:>9} "
                     f"{restarts:>8.0f}")  # fmt: skip
    if now.value("stackctl_circus_up") == 0:
        lines.append(f"{RED}circusd does not answer{RESET}")
    if now.samples.get("stackctl_nginx_requests_total"):
        classes = now.by("stackctl_nginx_requests_total", "status")
        per_class = "  ".join(
            f"{status} {rate(now, before, 'stackctl_nginx_requests_total', status=status):.1f}"
            for status in sorted(classes)
        )
        total = sum(rate(now, before, "stackctl_nginx_requests_total", status=s) for s in classes)
        name = "stackctl_nginx_upstream_response_seconds"
        count = rate(now, before, name + "_count")
        upstream = rate(now, before, name + "_sum") / count * 1000 if count else 0.0
        nginx = state(now.value("stackctl_nginx_up"))
        lines += ["", f"{BOLD}REQUESTS{RESET}   {total:.1f}/s   {per_class}   "
                  f"upstream {upstream:.1f} ms avg   NGiNX {nginx}"]  # fmt: skip
    workers = now.by("stackctl_wsgi_worker_requests_total", "pid")
    if workers or now.value("stackctl_wsgi_workers") is not None:
        lines += ["", f"{BOLD}{'UWSGI PID':<10} {'REQ/S':>7} {'BUSY%':>6} {'REQUESTS':>9}{RESET}"]
        for pid, requests in sorted(workers.items(), key=lambda item: int(item[0] or 0)):
            per_second = rate(now, before, "stackctl_wsgi_worker_requests_total", pid=pid)
            busy = rate(now, before, "stackctl_wsgi_worker_busy_seconds_total", pid=pid) * 100
            lines.append(f"{pid:<10} {per_second:>7.1f} {busy:>6.1f} {requests:>9.0f}")
    if now.value("stackctl_redis_up") is not None:
        lines += ["", f"{BOLD}REDIS{RESET}      {state(now.value('stackctl_redis_up'))}   "
                  f"memory {megabytes(now.value('stackctl_redis_memory_bytes'))}   clients "
                  f"{now.value('stackctl_redis_connected_clients') or 0:.0f}   commands "
                  f"{rate(now, before, 'stackctl_redis_commands_total'):.1f}/s"]  # fmt: skip
    if now.value("stackctl_ws_up") is not None:
        lines += ["", realtime_line(now, before)]
    return "\n".join(lines) + "\n"


def realtime_line(now: Scrape, before: Scrape) -> str:
    clients = now.by("stackctl_ws_connected_clients", "transport")
    by_transport = "  ".join(f"{t} {n:.0f}" for t, n in clients.items())
    if now.value("stackctl_ws_up") != 1:
        return f"{BOLD}REALTIME{RESET}   {state(0)}"

    def per_second(counter: str) -> str:
        return f"{rate(now, before, f'stackctl_ws_{counter}_total'):.1f}/s"

    def total(counter: str) -> str:
        return f"{now.value(f'stackctl_ws_{counter}_total') or 0:.0f}"

    return (
        f"{BOLD}REALTIME{RESET}   clients: {by_transport}   channels "
        f"{now.value('stackctl_ws_channels') or 0:.0f}\n"
        f"           received {per_second('messages_received')}   delivered "
        f"{per_second('messages_delivered')}   replayed {per_second('messages_replayed')}\n"
        f"           dropped {total('messages_dropped')}   slow clients closed "
        f"{total('slow_clients_closed')}   gaps {total('gaps_announced')}   Redis reconnects "
        f"{total('redis_reconnects')}"
    )


@contextlib.contextmanager
def keys(stream: TextIO) -> Iterator[Callable[[float], str]]:
    """A function that waits up to its argument in seconds for a key and returns it ("" if
    none); the terminal reads keys one at a time meanwhile, and is put back afterwards."""
    if not stream.isatty():

        def pause(timeout: float) -> str:
            time.sleep(timeout)
            return ""

        yield pause
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return stream.read(1) if ready else ""

    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(listen: Listen, title: str, once: bool, out: TextIO = sys.stdout) -> int:
    """Frames until q or Ctrl-C (exit status 0 either way), or one with ``once``."""
    try:
        before = fetch(listen)
        if once:
            time.sleep(INTERVAL)
            show(out, frame(fetch(listen), before, title))
            return 0
        with keys(sys.stdin) as key:
            while True:
                if key(INTERVAL) in ("q", "Q"):  # a rate needs a second between two scrapes
                    return 0
                try:
                    now = fetch(listen)
                except StackError as e:
                    # The exporter restarting (a crash, a reload): said on the screen, and
                    # asked again, rather than leaving the one watching.
                    show(out, f"{CLEAR}{BOLD}{title}{RESET}\n\n{RED}{e}{RESET}\n"
                              f"{DIM}asking again each second{RESET}\n")  # fmt: skip
                    continue
                show(out, CLEAR + frame(now, before, title))
                before = now
    except KeyboardInterrupt:
        return 0


def show(out: TextIO, text: str) -> None:
    """On a terminal, cut to its size; a file or a pipe (``stackctl top > file``, ``| less``)
    gets plain text, one frame after the other, without the codes that clear a screen."""
    if not out.isatty():
        text = ANSI.sub("", text) + ("\n" if text.startswith(CLEAR) else "")
    else:
        size = os.get_terminal_size(out.fileno())
        if size.columns and size.lines:  # 0 by 0: a terminal that does not say its size
            text = fit(text, size.columns, size.lines)
    out.write(text)
    out.flush()


def fit(text: str, columns: int, lines: int) -> str:
    """Each line cut at ``columns`` characters seen (colour codes are not), and the frame at
    ``lines`` - 1 lines (the last one's newline would scroll): a narrow terminal would wrap
    them, a short one scroll, and the top of the frame would be lost at each redraw."""
    rows = text.split("\n")
    if text.endswith("\n"):
        rows.pop()
    room = max(2, lines - 1)
    if len(rows) > room:
        hidden = len(rows) - room + 1
        rows = [
            *rows[: room - 1],
            f"{DIM}({hidden} more lines: a taller terminal shows them){RESET}",
        ]
    return "".join(cut(row, columns) + "\n" for row in rows)


def cut(row: str, columns: int) -> str:
    kept, seen = [], 0
    for index, part in enumerate(ANSI_PARTS.split(row)):
        if index % 2:  # a colour code: kept, it takes no room
            kept.append(part)
            continue
        kept.append(part[: max(0, columns - seen)])
        seen += len(part)
    return "".join(kept) + (RESET if seen > columns else "")
