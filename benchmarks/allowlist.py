"""What a socket's allow list costs: requests per second through filtered and unfiltered sockets.

    python benchmarks/allowlist.py [--seconds 2] [--connections 32] [--rounds 12]

One circusd as stackctl runs it (stackctl.circusd) holds three TCP sockets on 127.0.0.1, each
served by one master-less uWSGI process with a trivial app over HTTP:
  open      no allow list
  one       stackctl_allow = 127.0.0.1
  long      64 entries, 127.0.0.1 the last one the filter compares
twice: with a new connection per request (uWSGI's --http-socket closes each connection after
its answer: the filter sees the SYN, the handshake's ACK and the request, the most packets per
request it can see; wrk counts each close as a "read" error, which is no failure here), then
with keep-alive connections (--http11-socket; a connection keeps the filter it was accepted
with). wrk measures each socket in turn, in short rounds, in the same run; the figures are the
median over the rounds of each socket's ratio to ``open`` (the machine is shared and noisy).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.circusd_alone

from common import Result, free_port, wait_http, workdir, wrk  # noqa: E402

from tests import circusd_alone  # noqa: E402

LONG_LIST = " ".join([*(f"10.0.{i}.0/24" for i in range(63)), "127.0.0.1"])
SOCKETS = {"open": "", "one": "127.0.0.1", "long": LONG_LIST}
MODES = {"close": "http-socket", "keepalive": "http11-socket"}
"""Each mode and the uWSGI socket option that serves it."""


def circus_ini(directory: Path, ports: dict[str, int], protocol: str) -> str:
    uwsgi = Path(sys.executable).with_name("uwsgi")
    sections = ""
    for name, allow in SOCKETS.items():
        sections += f"""
[socket:{name}]
host = 127.0.0.1
port = {ports[name]}
backlog = 1024
stackctl_allow = {allow}

[watcher:{name}]
cmd = {uwsgi} --processes 1 --disable-logging --need-app
    --chdir {directory} --wsgi-file {directory}/bench_apps.py --callable hello
    --{protocol} fd://$(circus.sockets.{name})
use_sockets = True
numprocesses = 1
"""
    return circusd_alone.config(directory, sections)


@contextmanager
def circusd(directory: Path, protocol: str) -> Iterator[dict[str, int]]:
    """circusd serving the three sockets; their ports. Stopped, by pid, on exit."""
    ports = {name: free_port() for name in SOCKETS}
    ini = directory / "circus.ini"
    ini.write_text(circus_ini(directory, ports, protocol))
    with circusd_alone.running(ini):
        for port in ports.values():
            wait_http(port)
        yield ports


def failures(result: Result, mode: str) -> int:
    """wrk's errors, but for the closes it counts as read errors when each request closes."""
    kinds = dict(kind.rsplit(" ", 1) for kind in result.error_kinds.split(", ") if kind)
    return sum(int(n) for kind, n in kinds.items() if not (mode == "close" and kind == "read"))


def row(result: Result, ratio: float, mode: str) -> str:
    return (f"  {result.name:<6} {result.rps:>9.0f} req/s   p99 {result.p99_ms:>6.1f} ms   "
            f"{failures(result, mode)} failures   {ratio:5.3f} of open")  # fmt: skip


def measure(mode: str, args: argparse.Namespace) -> tuple[dict[str, list[float]], float, int]:
    """Each filtered socket's requests/s as a ratio to ``open``'s, one per round; ``open``'s
    mean requests/s; and the failures."""
    ratios: dict[str, list[float]] = {name: [] for name in SOCKETS if name != "open"}
    open_rps = 0.0
    failed = 0
    with workdir() as directory, circusd(directory, MODES[mode]) as ports:
        for round_ in range(args.rounds):
            print(f"{mode}, round {round_ + 1}:")
            results = {}
            # Every other round in reverse: a machine slowing down during a round costs each
            # socket alike over the run.
            order = list(ports.items())[:: 1 if round_ % 2 == 0 else -1]
            for name, port in order:
                results[name] = wrk(name, f"http://127.0.0.1:{port}/", args.connections,
                                    args.seconds)  # fmt: skip
                failed += failures(results[name], mode)
            open_rps += results["open"].rps / args.rounds
            for name in SOCKETS:
                result = results[name]
                ratio = result.rps / results["open"].rps
                if name in ratios:
                    ratios[name].append(ratio)
                print(row(result, ratio, mode), flush=True)
    return ratios, open_rps, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    figures: dict[str, float] = {}
    failed = 0
    for mode in MODES:
        ratios, open_rps, mode_failed = measure(mode, args)
        failed += mode_failed
        # The median of the rounds' ratios: a burst of another program's work on this shared
        # machine moves one round, not the figure.
        figures[f"{mode}_allow_one_rps_ratio"] = round(statistics.median(ratios["one"]), 3)
        figures[f"{mode}_allow_64_rps_ratio"] = round(statistics.median(ratios["long"]), 3)
        figures[f"{mode}_open_rps"] = round(open_rps)
    figures["failures"] = failed
    print(json.dumps(figures))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
