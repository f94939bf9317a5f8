"""Several hosts and their failures, measured: stackctl against Channels and Socket.IO.

    python benchmarks/failover.py [--quick] [--no-peers]      (root: it builds namespaces)

stackctl runs as six hosts (tests.cluster_hosts: one front, two app hosts, three redis hosts,
each a network namespace with addresses from 198.18.0.0/15 and a stack of its own), and goes
through the failures of tests/e2e/test_several_hosts.py with more clients:

1. app host loss: under GETs through the front and messages to websocket clients, app host A's
   stack is stopped, then its cable cut. Counted: failed GETs, and messages a client never got
   (or got twice, or was told it missed).
2. Redis primary loss: under publishing load, the redis host holding the primary dies (every
   process at once). Counted: acknowledged messages a client never got and was told nothing of,
   and the seconds from the kill to the first delivery of a message published after it.
3. cross-host broadcast: 2,000 clients per app host, through the front; messages published on
   app host A. The 99th percentile of publish-to-receipt, over every client and message.

The peers (benchmarks/peers_failover.py) go through the first two on 127.0.0.1, at the same
clients and rate, in the same run. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import workdir  # noqa: E402
from peers_failover import FULL, QUICK, measure, print_row  # noqa: E402
from ws_fanout import Crowd, Tally, raise_open_files_limit  # noqa: E402

from stackctl import realtime  # noqa: E402
from tests.cluster_hosts import (  # noqa: E402
    APP_A,
    APP_B,
    FRONT,
    HTTP_PORT,
    Cluster,
    Outcome,
    Pace,
    app_environment,
    app_host_loss,
    inside,
    redis_primary_loss,
    running_cluster,
)

TARGETS = {
    "app_host_loss_failed_gets": 0,
    "app_host_loss_lost_messages": 0,
    "redis_failover_seconds": 10.0,
    "redis_failover_lost_unannounced": 0,
    "cross_host_p99_ms": 400.0,
}
"""The issue's figures: each result must be at most its target (the seconds, below it)."""
CROSS_CHANNEL = "cross"
CROSS_INTERVAL = 0.5
CONNECT_CONCURRENCY = 128


def pace(preset: dict[str, Any], scenario: str) -> Pace:
    """The peers' load for a scenario, for stackctl too: the same clients and rate."""
    load = preset[scenario]
    return Pace(clients=load.clients, rate=load.rate, before=load.before, after=load.after)


def established(cluster: Cluster, host: str, port: int) -> int:
    """Connections established to ``port`` on ``host``: where the front put the clients."""
    result = cluster.host(host).run(["ss", "-Htn", "state", "established", f"sport = :{port}"],
                                    capture_output=True, text=True, check=True)  # fmt: skip
    return len(result.stdout.splitlines())


def cross_host(cluster: Cluster, per_host: int, messages: int) -> dict[str, Any]:
    """Clients through the front (which spreads them over both app hosts), messages published
    from app host A; the latency of each delivery."""
    tally = Tally(messages)
    crowd = Crowd((cluster.host(FRONT).address, HTTP_PORT), f"/ws/{CROSS_CHANNEL}", tally)
    try:
        connected = crowd.connect(2 * per_host, CONNECT_CONCURRENCY, patience=120)
        crowd.receive_until(lambda: False, time.monotonic() + 2)  # subscriptions settle
        spread = {h: established(cluster, h, 8002) for h in (APP_A, APP_B)}

        def publish_from_a() -> None:
            connection = realtime.connect(cluster.redis_url, password_file=str(
                cluster.password_file))  # fmt: skip
            for n in range(messages):
                data = json.dumps({"n": n, "t": time.time()})
                realtime.publish_json(connection, CROSS_CHANNEL, data, realtime.DEFAULT_HISTORY)
                time.sleep(CROSS_INTERVAL)

        publisher = threading.Thread(target=inside, args=(cluster.host(APP_A), publish_from_a))
        publisher.start()
        expected = connected * messages
        crowd.receive_until(lambda: len(tally.latencies) >= expected,
                            time.monotonic() + messages * CROSS_INTERVAL + 30)  # fmt: skip
        publisher.join()
    finally:
        crowd.close()
    latencies = sorted(tally.latencies) or [float("nan")]
    return {
        "clients": 2 * per_host,
        "connected": connected,
        "per_app_host": spread,
        "messages": messages,
        "lost": sum(max(0, connected - c) for c in tally.counts),
        "doubled": sum(max(0, c - connected) for c in tally.counts),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
    }


def outcome_row(outcome: Outcome) -> dict[str, Any]:
    row = dict(vars(outcome))
    row["failed_gets"] = len(outcome.failed_gets)
    if outcome.first_delivery_after is not None:
        row["first_delivery_after"] = round(outcome.first_delivery_after, 2)
    return row


def run_stackctl(preset: dict[str, Any], per_host: int, messages: int) -> dict[str, Any]:
    with workdir() as root, running_cluster(root) as cluster, app_environment(cluster):
        print("cluster up: 1 front, 2 app hosts, 3 redis hosts", flush=True)
        app = app_host_loss(cluster, pace(preset, "app_host_loss"), connections=32)
        print(f"  app host loss: {outcome_row(app)}", flush=True)
        redis, promoted = redis_primary_loss(cluster, pace(preset, "redis_primary_loss"))
        print(f"  redis primary loss (promoted: {promoted}): {outcome_row(redis)}", flush=True)
        cross = cross_host(cluster, per_host, messages)
        print(f"  cross-host broadcast: {cross}", flush=True)
    return {
        "app_host_loss": outcome_row(app),
        "redis_primary_loss": {**outcome_row(redis), "promoted": promoted},
        "cross_host": cross,
        "app_host_loss_failed_gets": len(app.failed_gets),
        "app_host_loss_lost_messages": app.lost_unannounced + app.lost_announced + app.doubled,
        "redis_failover_seconds": outcome_row(redis).get("first_delivery_after"),
        "redis_failover_lost_unannounced": redis.lost_unannounced,
        "cross_host_p99_ms": cross["p99_ms"],
    }


def met(result: dict[str, Any]) -> dict[str, bool]:
    checks = {}
    for key, target in TARGETS.items():
        value = result.get(key)
        below = key == "redis_failover_seconds"
        checks[key] = value is not None and (value < target if below else value <= target)
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer clients, shorter runs")
    parser.add_argument("--no-peers", action="store_true", help="stackctl only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("building the hosts (network namespaces) needs root")
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        parser.error("`ip netns` does not work here (iproute2 missing?)")
    raise_open_files_limit()
    preset = QUICK if args.quick else FULL
    result = run_stackctl(preset, per_host=500 if args.quick else 2000,
                          messages=10 if args.quick else 20)  # fmt: skip
    checks = met(result)
    for key, ok in checks.items():
        verdict = "ok" if ok else "MISSED"
        print(f"{key:<34} {result[key]!s:>8}  target {TARGETS[key]!s:>5}  {verdict}")
    if not args.no_peers:
        print("peers, same clients and rate (127.0.0.1):", flush=True)
        result.update(measure(quick=args.quick, report=print_row))
    result["targets_met"] = all(checks.values())
    print(json.dumps(result))
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
