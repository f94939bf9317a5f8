"""HTTP/2 against HTTP/1.1, both over TLS, through one stack, measured in the same run.

    python benchmarks/tls.py [--seconds 10] [--concurrency 64]

One `stackctl up` with tls.certificate = "self-signed" on 127.0.0.1, the trivial app behind it.
h2load drives both protocols (--h1 for HTTP/1.1) with the same number of requests in flight
(and new connections every 1000 requests, as NGiNX's keepalive_requests has it):
  h1 xN        N HTTP/1.1 keep-alive connections, one request each at a time (a browser's way
               is 6 per host; here as many as there are requests in flight)
  h2 xN        N HTTP/2 connections, one stream each: the protocol's own cost
  h2 N/S       N/S HTTP/2 connections of S concurrent streams: multiplexing
for the app (a uWSGI worker answers) and for a small static file NGiNX serves itself, then wrk's
HTTP/1.1 over TLS as a cross-check of h2load --h1. The machines are noisy: read the ratios
(same run), not the rates.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import APP_AS_ROOT, APPS, SETTLE_SECONDS, free_port, workdir, wrk  # noqa: E402

from stackctl.stack import usable_cpus  # noqa: E402

STREAMS = 16
"""Concurrent streams per HTTP/2 connection in the multiplexed runs."""
STATIC_PATH = "/_stackctl/realtime.js"


@dataclass(frozen=True)
class Run:
    name: str
    rps: float
    succeeded: int
    failed: int
    protocol: str


KEEPALIVE_REQUESTS = 1000
"""NGiNX's keepalive_requests: it closes a connection after this many requests. h2load's
HTTP/1.1 clients reconnect, its HTTP/2 clients do not (a timed run of 4 connections stalls
after 4000 requests), so every run is made of batches of at most this many per connection."""


def h2load(name: str, url: str, clients: int, streams: int, seconds: int, h1: bool) -> Run:
    """Batches of h2load runs for about ``seconds``: ``clients`` connections with ``streams``
    requests in flight on each; the rate is the requests answered over h2load's own time."""
    batch = clients * KEEPALIVE_REQUESTS
    command = ["h2load", "--clients", str(clients), "--max-concurrent-streams", str(streams),
               "--threads", "1", "--requests", str(batch), url]  # fmt: skip
    if h1:
        command.insert(1, "--h1")
    succeeded = failed = 0
    busy, protocol = 0.0, "?"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
        took = re.search(r"finished in ([\d.]+)(ms|s),", out.stdout)
        counts = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out.stdout)
        spoken = re.search(r"Application protocol: (\S+)", out.stdout)
        if not (took and counts and spoken):
            raise RuntimeError(f"cannot read h2load's output:\n{out.stdout}")
        busy += float(took.group(1)) / (1000 if took.group(2) == "ms" else 1)
        succeeded += int(counts.group(1))
        failed += int(counts.group(2)) + int(counts.group(3))
        protocol = spoken.group(1)
    time.sleep(SETTLE_SECONDS)
    return Run(name, succeeded / busy, succeeded, failed, protocol)


@contextmanager
def tls_stack(run: Path, workers: int) -> Iterator[str]:
    """`stackctl up` of the trivial app with a self-signed certificate; yields its https URL."""
    site = run / "site"
    site.mkdir()
    (site / "bench_apps.py").write_text(APPS)
    stackctl = [sys.executable, "-m", "stackctl"]
    tls_port = free_port()
    up = [*stackctl, "up", "--detach", "--profile", "prod", "--listen",
          f"127.0.0.1:{free_port()}", "--workers", str(workers),
          "--set", "tls.certificate=self-signed",
          "--set", f"tls.listen=127.0.0.1:{tls_port}", *APP_AS_ROOT]  # fmt: skip
    subprocess.run([*stackctl, "init", "--app", "bench_apps:hello"], cwd=site, check=True,
                   capture_output=True)  # fmt: skip
    try:
        subprocess.run(up, cwd=site, check=True, capture_output=True)  # returns once it serves
        yield f"https://127.0.0.1:{tls_port}"
    finally:
        subprocess.run([*stackctl, "down"], cwd=site, capture_output=True)


def row(run: Run) -> str:
    return (
        f"  {run.name:<30} {run.rps:>10.0f} req/s   {run.succeeded:>8} ok   "
        f"{run.failed} failed   ({run.protocol})"
    )


def measure(url: str, what: str, concurrency: int, seconds: int) -> dict[str, Run]:
    shapes = {
        f"h1 x{concurrency}": (concurrency, 1, True),
        f"h2 x{concurrency}": (concurrency, 1, False),
        f"h2 {concurrency // STREAMS}x{STREAMS}": (max(1, concurrency // STREAMS), STREAMS, False),
    }
    runs = {}
    for shape, (clients, streams, h1) in shapes.items():
        runs[shape] = h2load(f"{what} {shape}", url, clients, streams, seconds, h1)
        print(row(runs[shape]), flush=True)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    if not shutil.which("h2load"):
        print("h2load is missing: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    workers = 2 * usable_cpus()
    print(f"{workers} workers, {args.concurrency} requests in flight, {args.seconds} s per run")
    with workdir() as run, tls_stack(run, workers) as base:
        results = {
            "app": measure(f"{base}/", "app", args.concurrency, args.seconds),
            "static": measure(f"{base}{STATIC_PATH}", "static", args.concurrency, args.seconds),
        }
        cross = wrk("wrk h1 app", f"{base}/", args.concurrency, args.seconds)
        print(f"  {'wrk h1 (app)':<30} {cross.rps:>10.0f} req/s   {cross.errors} errors")
    print("\nratios against HTTP/1.1 over TLS (same run):")
    for runs in results.values():
        h1, *h2 = runs.values()
        for other in h2:
            label = f"{other.name} / {h1.name}"
            print(f"  {label:<44} {other.rps / h1.rps:6.2f}")
    h1_app = results["app"][f"h1 x{args.concurrency}"]
    print(f"  {'h2load h1 app / wrk h1 app':<44} {h1_app.rps / cross.rps:6.2f}")
    failures = sum(r.failed for runs in results.values() for r in runs.values()) + cross.errors
    print(f"  failed requests, all runs: {failures}  (target 0)")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
