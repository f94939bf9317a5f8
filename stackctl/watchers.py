"""The programs Circus supervises for a stack, named once.

The Circus config has a section per name, each has a log ``<log_dir>/<name>.log``, and
``stackctl reload``, ``logs``, ``status`` and the crash check all take their names from here.
"""

from __future__ import annotations

WATCHERS = ("redis", "sentinel", "wsgi", "ws", "nginx", "metrics")
"""In the order they start: Redis first, NGiNX once the pools behind it are up. A host runs
those of its roles (``Stack.watchers``); Sentinel only on the redis hosts of a cluster; the
Prometheus exporter (``metrics``) last, on every host where metrics.listen is set."""
BACKGROUND = "[watchers]"
"""Stands in STOP_ORDER for the profile's own programs ([watchers.NAME]: Celery...)."""
STOP_ORDER = (
    ("autoreload", "metrics", "nginx", "ws"), ("wsgi", BACKGROUND), ("sentinel",), ("redis",)
)
"""`stackctl down`, stage by stage: the development code reload (``autoreload``), the
exporter, the front and the realtime worker (whose clients would hold NGiNX) first, then the
pool with the background workers (which finish their running tasks), then Redis, which both
use."""
LOGS = ("circusd", *WATCHERS)
"""Every log ``stackctl logs`` shows: circusd's own, then one per watcher."""
