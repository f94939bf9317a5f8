"""Realtime delivery when things go wrong: odd messages on the bus, Redis killed, clients that
push the worker's limits. Real stack (NGiNX, the gevent worker, Redis), real clients."""

from __future__ import annotations

import json
import re
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.sync.client import connect

from stackctl import realtime
from stackctl.stack import Stack
from tests.conftest import data_of, running_stack, stackctl
from tests.e2e.test_realtime import sse_events, ws_url

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="sc", dir="/tmp"))
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    with running_stack(root / "site", "--workers", "1") as running:
        yield running


def publish(stack: Stack, channel: str, message: Any) -> int:
    return realtime.publish(channel, message, url=stack.redis_url)


def pids(stack: Stack, watcher: str) -> list[int]:
    """The pids `stackctl status` lists for one watcher."""
    status = stackctl("status", cwd=stack.stack_dir).stdout
    section = re.search(rf"^{watcher} .*\n((?:\s+pid .*\n)*)", status, re.MULTILINE)
    assert section, status
    return [int(pid) for pid in re.findall(r"pid (\d+)", section.group(1))]


def test_messages_not_from_publish_are_skipped_and_delivery_goes_on(stack: Stack) -> None:
    worker = pids(stack, "ws")
    with connect(ws_url(stack, "odd")) as seen_by:
        publish(stack, "odd", "first")
        since = json.loads(seen_by.recv(timeout=2))["id"]
    sse = urllib.request.urlopen(stack.url() + "events/odd", timeout=10)
    with sse, connect(ws_url(stack, "odd", since=since)) as ws:
        bus = redis.Redis.from_url(stack.redis_url)
        for odd in ("not json", '{"no": "id"}', "[1, 2]", '{"id": 7}', '{"id": "1-0",\n"a": 1}'):
            assert bus.publish("stackctl:odd", odd) == 1
        assert publish(stack, "odd", "after") == 1
        assert data_of(ws.recv(timeout=5)) == "after"
        (event,) = sse_events(sse, 1)
        assert data_of(event["data"]) == "after"
        with urllib.request.urlopen(stack.url() + f"poll/odd?since={since}", timeout=10) as r:
            assert [m["data"] for m in json.loads(r.read())["messages"]] == ["after"]
    assert pids(stack, "ws") == worker  # not restarted: it never stopped hearing
    log = (stack.log_dir / "ws.log").read_text()
    assert len(re.findall("skipped .* not published by stackctl.realtime", log)) == 1, log
