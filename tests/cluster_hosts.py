"""A whole cluster on one machine: one front, two app hosts and three redis hosts, each a
network namespace (tests.netns) running its own stack of the demo app with its own profile,
started and stopped with stackctl as a user would on six machines. For the several-hosts
test and benchmarks/failover.py.

The test process sits outside, on the bridge (``net.outside``): it sends HTTP and websocket
traffic to the front, publishes through the redis hosts' Sentinels, and enters a host's
namespace (``inside``) where a client must stand on that host, e.g. on the front to reach an
app host directly (its ports are open to the front hosts only).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.netns import Host, Network

FRONT, APP_A, APP_B = "front", "app-a", "app-b"
REDIS_HOSTS = ("redis-1", "redis-2", "redis-3")
HOSTS = (FRONT, APP_A, APP_B, *REDIS_HOSTS)
HTTP_PORT = 8000
STACK_TIMEOUT = 180
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


@dataclass
class Cluster:
    net: Network
    root: Path
    dirs: dict[str, Path] = field(default_factory=dict)

    def host(self, name: str) -> Host:
        return self.net[name]

    @property
    def front_url(self) -> str:
        return f"http://{self.net[FRONT].address}:{HTTP_PORT}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.net[FRONT].address}:{HTTP_PORT}/ws/"

    def app_ws_url(self, name: str) -> str:
        """An app host's websocket worker, reached directly (from the front's namespace)."""
        return f"ws://{self.net[name].address}:8002/ws/"

    @property
    def redis_url(self) -> str:
        sentinels = ",".join(f"{self.net[h].address}:26379" for h in REDIS_HOSTS)
        return f"sentinel://{sentinels}/stackctl"

    @property
    def password_file(self) -> Path:
        return self.dirs[FRONT] / ".stackctl" / "redis-password"

    def stackctl(self, name: str, *args: str, timeout: float = STACK_TIMEOUT,
                 check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run stackctl on a host, in its stack directory, with its profile."""
        command = [sys.executable, "-m", "stackctl", "-C", str(self.dirs[name]), *args]
        if args and args[0] in ("up", "reload", "render"):
            command += ["--profile", "host", "--set", "server.user=root"]
        result = self.net[name].run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"stackctl {' '.join(args)} on {name} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def up(self, *names: str) -> None:
        """Start the stacks of ``names`` at once, as several machines would."""
        in_parallel([lambda n=n: self.stackctl(n, "up", "--detach") for n in names])

    def down(self, *names: str) -> None:
        in_parallel([lambda n=n: self.stackctl(n, "down", check=False) for n in names])

    def write_profile(self, name: str, text: str) -> None:
        (self.dirs[name] / "profiles" / "host.toml").write_text(text)


def profile_text(cluster: Cluster, name: str, **extra: str) -> str:
    """The profile of host ``name``: what every host shares, then its own role and address."""
    address = {h: cluster.net[h].address for h in HOSTS}
    shared = {
        "front_hosts": f'["{address[FRONT]}"]',
        "app_hosts": f'["{address[APP_A]}", "{address[APP_B]}"]',
        "redis_hosts": "[" + ", ".join(f'"{address[h]}"' for h in REDIS_HOSTS) + "]",
    }
    shared.update(extra)
    role = (
        '["front"]' if name == FRONT
        else '["wsgi", "ws"]' if name in (APP_A, APP_B)
        else '["redis"]'
    )  # fmt: skip
    lines = ['extends = "prod"', "", "[server]", f'listen = "{address[name]}:{HTTP_PORT}"', ""]
    if name == FRONT:  # the test's clients all come from one address: the bridge's
        lines += ["[limits]", f'exempt = ["127.0.0.1", "{cluster.net.outside}"]', ""]
    lines += ["[cluster]", f"roles = {role}"]
    if name != FRONT:
        lines.append(f'address = "{address[name]}"')
    lines += [f"{key} = {value}" for key, value in shared.items()]
    return "\n".join(lines) + "\n"


def make_sites(cluster: Cluster) -> None:
    """The demo site on every host, and the secrets made once and copied, as the README says."""
    for name in HOSTS:
        directory = cluster.root / name
        subprocess.run([sys.executable, "-m", "stackctl", "init", "--demo", str(directory)],
                       check=True, capture_output=True)  # fmt: skip
        (directory / "profiles").mkdir()
        cluster.dirs[name] = directory
        cluster.write_profile(name, profile_text(cluster, name))
    first = cluster.dirs[REDIS_HOSTS[0]]
    subprocess.run([sys.executable, "-m", "stackctl", "-C", str(first), "secrets"],
                   check=True, capture_output=True)  # fmt: skip
    for name in HOSTS:
        private = cluster.dirs[name] / ".stackctl"
        private.mkdir(mode=0o700, exist_ok=True)
        for secret in ("secret", "redis-password"):
            if private != first / ".stackctl":
                shutil.copy2(first / ".stackctl" / secret, private / secret)


@contextmanager
def running_cluster(root: Path) -> Iterator[Cluster]:
    """Six hosts, their stacks started in the order of the README (redis, app, front), and
    everything stopped and removed at the end, however the block ends."""
    with Network(HOSTS) as net:
        cluster = Cluster(net, root)
        make_sites(cluster)
        try:
            cluster.up(*REDIS_HOSTS)
            cluster.up(APP_A, APP_B)
            cluster.up(FRONT)
            yield cluster
        finally:
            cluster.down(*HOSTS)
        # Network's exit kills whatever a failed `down` left in the namespaces.


def in_parallel(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run ``jobs`` in threads; raise the first error once all have ended."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(index: int, job: Callable[[], Any]) -> None:
        try:
            results[index] = job()
        except BaseException as e:  # noqa: BLE001 - reported below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


_libc = ctypes.CDLL(None, use_errno=True)


def enter(host: Host) -> None:
    """Move the calling thread (only it: a network namespace is per thread) into ``host``:
    the sockets it opens from now on are that host's."""
    fd = os.open(f"/run/netns/{host.netns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {host.netns}")
    finally:
        os.close(fd)


def inside(host: Host, work: Callable[[], T]) -> T:
    """Run ``work`` in a thread that stands on ``host``; its result, or its error."""
    box: list[Any] = []

    def run() -> None:
        try:
            enter(host)
            box.append((True, work()))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            box.append((False, e))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]
