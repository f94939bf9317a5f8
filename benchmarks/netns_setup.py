"""How long the multi-host tests spend building and removing their hosts (tests/netns.py).

    sudo python benchmarks/netns_setup.py [--hosts 6] [--runs 10]

Builds a network of N hosts (network namespaces on a bridge, 198.18.0.0/15), starts one
process in each (a `sleep`, which dies on SIGTERM), and removes it all; RUNS times. Prints
each run, then one JSON line with the medians in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.netns

from tests.netns import Network  # noqa: E402


def one_run(hosts: int) -> tuple[float, float]:
    """Seconds to build the network, and to remove it with one process in each host."""
    started = time.perf_counter()
    net = Network([f"host-{i}" for i in range(hosts)])
    with net:
        built = time.perf_counter()
        for host in net:
            host.popen(["sleep", "60"], stdout=subprocess.DEVNULL)
        while not all(host.pids() for host in net):
            time.sleep(0.01)
        removing = time.perf_counter()
    return built - started, time.perf_counter() - removing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=6)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    builds, removals = [], []
    for run in range(args.runs):
        build, removal = one_run(args.hosts)
        builds.append(build)
        removals.append(removal)
        print(f"run {run + 1}: build {build * 1000:.0f} ms, removal {removal * 1000:.0f} ms")
    print(json.dumps({
        "hosts": args.hosts,
        "runs": args.runs,
        "netns_build_seconds": round(statistics.median(builds), 3),
        "netns_removal_seconds": round(statistics.median(removals), 3),
        "netns_build_seconds_max": round(max(builds), 3),
        "netns_removal_seconds_max": round(max(removals), 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
