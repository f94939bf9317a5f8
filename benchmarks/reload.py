"""Requests lost and latency during graceful reloads, against peers in the same run.

    python benchmarks/reload.py [--reloads 5] [--connections 64] [--storm]

An app that sleeps 20 ms per request, 4 workers, under wrk: first at rest, then while the
workers are reloaded N times, one reload every INTERVAL seconds, for
  stackctl             `stackctl reload wsgi` (new workers ready before old ones stop)
  stackctl rolling     `stackctl reload wsgi --sequential` (one worker at a time)
  circusctl wsgi       `circusctl reload wsgi --waiting` on the same stack (stackctl's circusd)
  circusctl nginx      `circusctl reload nginx --waiting` (NGiNX's own graceful HUP)
  stackctl nginx       `stackctl reload nginx`
  circusctl all        `circusctl reload --waiting`: the whole stack
  gunicorn             `kill -HUP` to the gunicorn master behind NGiNX
  uwsgi                `kill -HUP` to a uWSGI --master behind NGiNX (its graceful reload)
  circus TERM          `circusctl reload` of master-less uWSGI workers under a Circus left at
                       its defaults, whose stop signal (SIGTERM) kills a worker mid-request
Printed: requests, failures and p99 at rest and during the reloads, and their ratio.
With --storm, the stackctl and circusctl rows of the wsgi pool are reloaded every INTERVAL
seconds for a minute instead.

Each peer gets a discarded warm-up run, then rest, reloads, rest again, and "at rest" is the
mean of the runs on either side. Between runs the server is left to finish the requests the
last run abandoned (see common.SETTLE_SECONDS): back-to-back runs made every run after the
first look slower (p99 545 ms instead of 329 ms), which passed for a property of the machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Result,
    Server,
    circusctl,
    nginx_circus_uwsgi,
    nginx_gunicorn,
    nginx_uwsgi,
    stackctl_stack,
    workdir,
    wrk,
)

WORKERS = 4
INTERVAL = 2.0
REST_SECONDS = 10
STORM_SECONDS = 60
TARGET = 1.1
STORM_TARGET = 1.25
STORM_PEERS = "stackctl,circusctl wsgi"


def hup(server: Server) -> None:
    os.kill(server.backend_pids[0], signal.SIGHUP)


def stackctl_reload(*args: str) -> Callable[[Server], None]:
    def reload(server: Server) -> None:
        subprocess.run([sys.executable, "-m", "stackctl", "reload", *args],
                       cwd=server.stack_dir, check=True, capture_output=True)  # fmt: skip

    return reload


def stack_circusctl(*args: str) -> Callable[[Server], None]:
    """circusctl, as a user of the stack runs it, against the stack's own circusd."""

    def reload(server: Server) -> None:
        endpoint = f"ipc://{server.stack_dir}/.stackctl/run/circus.ctl"
        subprocess.run([str(Path(sys.executable).parent / "circusctl"), "--endpoint", endpoint,
                        "--timeout", "120", *args], check=True, capture_output=True)  # fmt: skip

    return reload


def during_reloads(name: str, server: Server, reload: Callable[[Server], None], reloads: int,
                   connections: int) -> Result:  # fmt: skip
    """wrk for the whole window while ``reload`` runs every INTERVAL seconds."""

    def reload_loop() -> None:
        time.sleep(1)
        for _ in range(reloads):
            started = time.monotonic()
            reload(server)
            time.sleep(max(0.0, INTERVAL - (time.monotonic() - started)))

    reloader = threading.Thread(target=reload_loop)
    reloader.start()
    url = f"http://127.0.0.1:{server.port}/"
    result = wrk(name, url, connections, int(reloads * INTERVAL + 2))
    reloader.join()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--storm", action="store_true",
                        help=f"reload every {INTERVAL:.0f} s for {STORM_SECONDS} s")  # fmt: skip
    parser.add_argument("--peers", default="stackctl,stackctl rolling,circusctl wsgi,"
                        "circusctl nginx,stackctl nginx,circusctl all,gunicorn,uwsgi,circus TERM",
                        help="comma-separated subset of the peers to run")  # fmt: skip
    args = parser.parse_args()
    if args.storm:
        args.reloads = int(STORM_SECONDS / INTERVAL)
        args.peers = STORM_PEERS
    target = STORM_TARGET if args.storm else TARGET
    rows = []
    with workdir() as run:
        peers = [
            ("stackctl", stackctl_stack, stackctl_reload("wsgi")),
            ("stackctl rolling", stackctl_stack, stackctl_reload("wsgi", "--sequential")),
            ("circusctl wsgi", stackctl_stack, stack_circusctl("reload", "wsgi", "--waiting")),
            ("circusctl nginx", stackctl_stack, stack_circusctl("reload", "nginx", "--waiting")),
            ("stackctl nginx", stackctl_stack, stackctl_reload("nginx")),
            ("circusctl all", stackctl_stack, stack_circusctl("reload", "--waiting")),
            ("gunicorn", nginx_gunicorn, hup),
            ("uwsgi", nginx_uwsgi, hup),
            ("circus TERM", nginx_circus_uwsgi, lambda server: circusctl(run, "reload", "web")),
        ]
        for name, start, reload in peers:
            if name not in args.peers.split(","):
                continue
            with start(run, "sleepy", WORKERS) as server:
                url = f"http://127.0.0.1:{server.port}/"
                wrk(name, url, args.connections, REST_SECONDS)  # warm-up, discarded
                before = wrk(name, url, args.connections, REST_SECONDS)
                busy = during_reloads(name, server, reload, args.reloads, args.connections)
                after = wrk(name, url, args.connections, REST_SECONDS)
            rest_p99 = (before.p99_ms + after.p99_ms) / 2
            rows.append((name, rest_p99, before.errors + after.errors, busy))
            print(f"  {name:<17} done", flush=True)

    print(f"\n{args.reloads} reloads, one every {INTERVAL:.0f} s; sleep-20 ms app, "
          f"{WORKERS} workers, {args.connections} connections")  # fmt: skip
    print(f"  {'':<17} {'requests':>9} {'failures':>9} {'p99 rest':>10} "
          f"{'p99 reloads':>12} {'ratio':>6}")  # fmt: skip
    failed = False
    for name, rest_p99, rest_errors, busy in rows:
        ratio = busy.p99_ms / rest_p99
        print(f"  {name:<17} {busy.requests:>9} {busy.errors:>9} {rest_p99:>8.0f}ms "
              f"{busy.p99_ms:>10.0f}ms {ratio:>6.2f}")  # fmt: skip
        if name.startswith(("stackctl", "circusctl")):
            failed |= busy.errors > 0 or rest_errors > 0 or ratio > target
    print(f"targets for stackctl and circusctl: 0 failures, p99 during reloads <= {target} x "
          "p99 at rest")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
