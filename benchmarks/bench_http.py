"""Requests per second and p99 through the stack, against peers measured in the same run.

    python benchmarks/bench_http.py [--seconds 10] [--connections 64]

A trivial app and an app that sleeps 20 ms per request, each behind:
  ceiling   NGiNX answering `return 200` itself (trivial app only)
  uwsgi     hand-written NGiNX -> uWSGI --master, same process count, unix socket
  gunicorn  NGiNX -> gunicorn, same number of sync workers
  stackctl  `stackctl up`: NGiNX -> Circus-held socket -> master-less uWSGI pool
then a burst of 256 concurrent connections at the stack, which must get no errors.
Machines here are noisy, so the ratios (same run) are the figures to read, not the rates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Result,
    nginx_alone,
    nginx_gunicorn,
    nginx_uwsgi,
    stackctl_stack,
    workdir,
    wrk,
)

from stackctl.stack import usable_cpus  # noqa: E402

SLEEP_SECONDS = 0.020


def row(result: Result) -> str:
    return (
        f"  {result.name:<22} {result.rps:>10.0f} req/s   p99 {result.p99_ms:>7.1f} ms   "
        f"{result.requests:>8} requests   {result.errors} errors"
    )


def measure(run: Path, app: str, workers: int, connections: int, seconds: int) -> dict[str, Result]:
    results: dict[str, Result] = {}
    peers = [("uwsgi", nginx_uwsgi), ("gunicorn", nginx_gunicorn), ("stackctl", stackctl_stack)]
    if app == "hello":
        with nginx_alone(run) as server:
            url = f"http://127.0.0.1:{server.port}/"
            results["ceiling"] = wrk("nginx return 200", url, connections, seconds)
            print(row(results["ceiling"]), flush=True)
    for name, peer in peers:
        with peer(run, app, workers) as server:
            url = f"http://127.0.0.1:{server.port}/"
            wrk(name, url, connections, 2)  # warm-up
            results[name] = wrk(f"{name} ({app})", url, connections, seconds)
            print(row(results[name]), flush=True)
    return results


def verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return ""
    return f"  (target >= {target})  " + ("ok" if ratio >= target else "BELOW TARGET")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    workers = 2 * usable_cpus()
    print(
        f"{workers} workers (2 x {usable_cpus()} CPUs), {args.connections} connections, "
        f"{args.seconds} s per run"
    )

    with workdir() as run:
        print("trivial app:")
        hello = measure(run, "hello", workers, args.connections, args.seconds)
        print("app sleeping 20 ms per request:")
        sleepy = measure(run, "sleepy", workers, args.connections, args.seconds)
        with stackctl_stack(run, "hello", workers) as server:
            url = f"http://127.0.0.1:{server.port}/"
            burst = wrk("stackctl burst 256", url, 256, 5, threads=2)
        print(row(burst))

    stack, ceiling = hello["stackctl"], workers / SLEEP_SECONDS
    figures = [
        ("stack / gunicorn, trivial app", stack.rps / hello["gunicorn"].rps, 2.0),
        ("stack / hand-written uWSGI, trivial app", stack.rps / hello["uwsgi"].rps, 0.95),
        ("stack / NGiNX ceiling, trivial app", stack.rps / hello["ceiling"].rps, None),
        ("stack / gunicorn, sleep app", sleepy["stackctl"].rps / sleepy["gunicorn"].rps, None),
        ("stack / uWSGI, sleep app", sleepy["stackctl"].rps / sleepy["uwsgi"].rps, None),
        (f"stack / sleep ceiling ({ceiling:.0f} req/s)", sleepy["stackctl"].rps / ceiling, 0.97),
    ]
    print("\nratios (same run):")
    failed = False
    for label, ratio, target in figures:
        print(f"  {label:<44} {ratio:6.2f}{verdict(ratio, target)}")
        failed |= target is not None and ratio < target
    stack_runs = [hello["stackctl"], sleepy["stackctl"], burst]
    errors = sum(r.errors for r in stack_runs)
    print(f"  stack errors, all runs and the 256-connection burst: {errors}  (target 0)")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
