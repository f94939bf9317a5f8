"""Several hosts: which parts this host runs, and how it reaches the others.

A profile per host role (``cluster.roles``): front hosts run NGiNX and balance across the app
hosts (``cluster.app_hosts``); app hosts run the wsgi pool and the websocket worker on TCP
ports of their private address (``cluster.address``), open only to the front hosts
(``cluster.front_hosts``); redis hosts (``cluster.redis_hosts``) run the one Redis every app
host shares, or, three or more of them, a primary, its replicas and Sentinel. The defaults
are one host running everything over unix sockets.

The settings are checked together here, once, when the profile is built; what the rest of
stackctl needs (the watchers to run, the URL the workers find Redis by) is derived here too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from stackctl.errors import StackError

if TYPE_CHECKING:
    from stackctl.profile import Profile

FRONT, WSGI, WS, REDIS = "front", "wsgi", "ws", "redis"
MIN_SENTINELS = 3
"""Sentinel promotes a replica only when a majority of Sentinels agree: with two redis hosts,
losing one leaves no majority, and nothing would be promoted."""


def runs(profile: Profile, role: str) -> bool:
    return role in profile.cluster.roles


def app_roles(profile: Profile) -> bool:
    return runs(profile, WSGI) or runs(profile, WS)


def serves_app_over_network(profile: Profile) -> bool:
    """App hosts of a cluster listen on TCP at cluster.address; a single host on unix sockets."""
    return app_roles(profile) and bool(profile.cluster.address)


def balances_app_hosts(profile: Profile) -> bool:
    """A front that proxies to cluster.app_hosts, rather than to this host's own pools."""
    return runs(profile, FRONT) and bool(profile.cluster.app_hosts)


def is_cluster(profile: Profile) -> bool:
    cluster = profile.cluster
    return bool(cluster.address or cluster.app_hosts or cluster.redis_hosts)


def uses_sentinel(profile: Profile) -> bool:
    return len(profile.cluster.redis_hosts) >= MIN_SENTINELS


def runs_redis(profile: Profile) -> bool:
    """This host runs a Redis server: the stack's own, or one of the redis hosts'."""
    return runs(profile, REDIS) and profile.redis.url == "embedded"


def runs_shared_redis(profile: Profile) -> bool:
    """This host is one of cluster.redis_hosts and runs its Redis (and Sentinel)."""
    return runs(profile, REDIS) and bool(profile.cluster.redis_hosts)


def needs_redis(profile: Profile) -> bool:
    """Only the app's processes talk to Redis: a front host has no use for it."""
    return app_roles(profile) or runs(profile, REDIS)


def shared_redis_url(profile: Profile) -> str:
    """How the app's processes on any host find the redis hosts' Redis: through Sentinel
    when there are several (it names the primary of the moment), else directly. The password
    is in a file of its own (``Stack.redis_password_file``), never in the URL."""
    cluster = profile.cluster
    if uses_sentinel(profile):
        sentinels = ",".join(host_port(h, cluster.sentinel_port) for h in cluster.redis_hosts)
        return f"sentinel://{sentinels}/{cluster.master_name}"
    return f"redis://{host_port(cluster.redis_hosts[0], cluster.redis_port)}/0"


def local_addresses() -> set[str]:
    """The IP addresses of this host's interfaces."""
    import psutil

    return {
        address.address.split("%", 1)[0]  # an IPv6 link-local address names its interface
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family in (socket.AF_INET, socket.AF_INET6)
    }


ADDRESS_FOUND = "this host's own address, found in {key}"


def listed_for_roles(profile: Profile) -> dict[str, tuple[str, ...]]:
    """The lists this host's address should be in, by key: cluster.app_hosts for an app host,
    cluster.redis_hosts for a redis host."""
    cluster = profile.cluster
    lists = {}
    if app_roles(profile) and cluster.app_hosts:
        lists["cluster.app_hosts"] = cluster.app_hosts
    if runs(profile, REDIS) and cluster.redis_hosts:
        lists["cluster.redis_hosts"] = cluster.redis_hosts
    return lists


def with_address(profile: Profile, addresses: Callable[[], set[str]]) -> Profile:
    """Every host can share one profile per role: cluster.address, when not given, is the one
    address of the lists naming this host's roles that this host has."""
    lists = listed_for_roles(profile)
    if profile.cluster.address or not lists:
        return profile
    local = addresses()
    mine = sorted({a for listed in lists.values() for a in listed if a in local})
    keys = " and ".join(lists)
    if len(mine) > 1:
        raise StackError(
            f"this host has several of the addresses in {keys} ({', '.join(mine)}); "
            "say which one it serves on with cluster.address"
        )
    if not mine:
        return profile  # check() says what is missing, if anything is
    sources = {**profile.sources, "cluster.address": ADDRESS_FOUND.format(key=keys)}
    return dataclasses.replace(
        profile, cluster=dataclasses.replace(profile.cluster, address=mine[0]), sources=sources
    )


def version(address: str) -> int:
    """4 or 6; ::ffff:198.18.0.10 is an IPv4 address (how a dual-stack socket names one)."""
    parsed = ipaddress.ip_address(address)
    mapped = parsed.ipv4_mapped if isinstance(parsed, ipaddress.IPv6Address) else None
    return 4 if mapped else parsed.version


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check(profile: Profile) -> None:
    """The cluster settings together: each problem names the file, key and value to change."""
    cluster = profile.cluster
    where = profile.where
    lists = listed_for_roles(profile)
    if lists and not cluster.address:
        keys = " and ".join(lists)
        raise StackError(
            f"{where('cluster.address')}: none of this host's addresses is in {keys} "
            f"({', '.join(a for listed in lists.values() for a in listed)}); add this host's "
            "private address there, or set cluster.address"
        )
    if serves_app_over_network(profile) and not cluster.front_hosts:
        raise StackError(
            f"{where('cluster.front_hosts')}: this host serves its app on "
            f"{cluster.address} (cluster.address) and must list the front hosts allowed to "
            'connect, e.g. ["10.0.0.10"]'
        )
    serves = serves_app_over_network(profile)
    mine = version(cluster.address) if serves else None
    strangers = [h for h in cluster.front_hosts if serves and version(h) != mine]
    if strangers:
        raise StackError(
            f"{where('cluster.front_hosts')}: {', '.join(strangers)} could never connect: "
            f"this host serves its app on {cluster.address} (cluster.address, from "
            f"{profile.source('cluster.address')}), of the other IP version; list the front "
            "hosts by their addresses of the same version"
        )
    if runs(profile, FRONT) and not app_roles(profile) and not cluster.app_hosts:
        raise StackError(
            f"{where('cluster.app_hosts')}: a front host without the wsgi and ws roles must "
            'list the app hosts it sends requests to, e.g. ["10.0.0.11", "10.0.0.12"]'
        )
    if runs(profile, FRONT) and not cluster.app_hosts and app_roles(profile) and not (
        runs(profile, WSGI) and runs(profile, WS)
    ):
        raise StackError(
            f"{where('cluster.roles')}: a front without cluster.app_hosts serves this host's "
            "own pools, so it needs both the wsgi and ws roles here; or list the app hosts"
        )
    check_redis(profile)
    check_ports(profile)


WILDCARDS = ("0.0.0.0", "::", "*", "")


def listening(profile: Profile) -> list[tuple[str, str, int]]:
    """(key, host, port) of each TCP socket this host's roles listen on."""
    cluster = profile.cluster
    sockets = []
    if runs(profile, FRONT):
        sockets.append(("server.listen", profile.server.listen.host, profile.server.listen.port))
        if profile.tls.certificate:
            sockets.append(("tls.listen", profile.tls.listen.host, profile.tls.listen.port))
    if serves_app_over_network(profile):
        for role, key, port in ((WSGI, "cluster.wsgi_port", cluster.wsgi_port),
                                (WS, "cluster.ws_port", cluster.ws_port)):  # fmt: skip
            if runs(profile, role):
                sockets.append((key, cluster.address, port))
    if runs_shared_redis(profile):
        sockets.append(("cluster.redis_port", cluster.address, cluster.redis_port))
        if uses_sentinel(profile):
            sockets.append(("cluster.sentinel_port", cluster.address, cluster.sentinel_port))
    return sockets


def check_ports(profile: Profile) -> None:
    """Two of this host's servers on one address and port: the second could never start
    (and its error would come late, from circusd, with part of the stack up)."""
    sockets = listening(profile)
    for i, (key, host, port) in enumerate(sockets):
        for other, other_host, other_port in sockets[:i]:
            shared = host == other_host or host in WILDCARDS or other_host in WILDCARDS
            if port == other_port and shared:
                raise StackError(
                    f"{profile.where(key)}: this host listens on port {port} for "
                    f"{other} already ({profile.where(other)}); give each a port of its own"
                )


def check_redis(profile: Profile) -> None:
    cluster = profile.cluster
    where = profile.where
    count = len(cluster.redis_hosts)
    if count and profile.redis.url != "embedded":
        raise StackError(
            f"{where('redis.url')}: cluster.redis_hosts is set too "
            f"(from {profile.source('cluster.redis_hosts')}); the app finds Redis either on "
            'the redis hosts or at redis.url: keep one of them (redis.url = "embedded")'
        )
    if count == MIN_SENTINELS - 1:
        raise StackError(
            f"{where('cluster.redis_hosts')}: two redis hosts cannot fail over (Sentinel needs "
            "a majority, and losing one host of two leaves none); list one (a shared Redis) or "
            "three or more (a primary, replicas and Sentinel)"
        )
    if runs_shared_redis(profile) and cluster.address not in cluster.redis_hosts:
        raise StackError(
            f"{where('cluster.address')}: this host has the redis role, so its address must be "
            f"one of cluster.redis_hosts {list(cluster.redis_hosts)} (from "
            f"{profile.source('cluster.redis_hosts')})"
        )
    shares = app_roles(profile) and (cluster.address or cluster.app_hosts)
    if shares and not count and profile.redis.url == "embedded":
        raise StackError(
            f"{where('cluster.redis_hosts')}: the app hosts of a cluster must share one Redis; "
            "list the redis hosts, or set redis.url to a Redis they all reach"
        )
