"""The Redis server's config (and Sentinel's, on the redis hosts of a cluster); nothing when
this host runs no Redis."""

from __future__ import annotations

from stackctl import cluster
from stackctl.render import File, render_template
from stackctl.settings import Listen
from stackctl.stack import Stack

SENTINEL_DOWN_AFTER_MS = 2000
"""A primary silent this long is down for a Sentinel; with the election, a failover takes
some 3 to 5 s. Shorter would promote on a busy primary's pause."""
SENTINEL_FAILOVER_TIMEOUT_MS = 3000
"""A failover Sentinel had to give up is tried again after twice this. It gives up at once
when the replicas' last reports are older than 5 s (it asks them every 10 s until the primary
is down, then every second), which often ends the first try. Sentinel's default, 3 minutes,
would leave the site without realtime for 6; 3 s retries after 6 s (seen: 21 s with 10 s).
On a private network a replica is promoted, and the others follow it, well within it."""


def primary(stack: Stack) -> Listen | None:
    """The primary a redis host replicates at first: the first of cluster.redis_hosts
    (Sentinel reconfigures them all after a failover); None on that host itself."""
    hosts = stack.profile.cluster.redis_hosts
    if not stack.shared_redis or len(hosts) < cluster.MIN_SENTINELS:
        return None
    first = Listen(hosts[0], stack.profile.cluster.redis_port)
    return None if first.host == stack.profile.cluster.address else first


def quorum(stack: Stack) -> int:
    """Sentinels that must agree a primary is down: a majority of them."""
    return len(stack.profile.cluster.redis_hosts) // 2 + 1


def render(stack: Stack) -> list[File]:
    if not stack.embedded_redis:
        return []
    content = render_template(
        "redis.conf.j2",
        profile=stack.profile.name,
        socket=stack.redis_socket,
        listen=stack.redis_listen,
        primary=primary(stack),
        data_dir=stack.service_dir,
    )
    files = [File(stack.redis_conf.name, content)]
    sentinel = stack.sentinel_listen
    if sentinel is not None:
        hosts = stack.profile.cluster.redis_hosts
        seed = render_template(
            "sentinel.conf.j2",
            profile=stack.profile.name,
            listen=sentinel,
            data_dir=stack.service_dir,
            master=stack.profile.cluster.master_name,
            primary=Listen(hosts[0], stack.profile.cluster.redis_port),
            replicas=[Listen(h, stack.profile.cluster.redis_port) for h in hosts[1:]],
            quorum=quorum(stack),
            down_after=SENTINEL_DOWN_AFTER_MS,
            failover_timeout=SENTINEL_FAILOVER_TIMEOUT_MS,
        )
        files.append(File(stack.sentinel_conf.name, seed))
    return files
