"""The demo's background work: a slow job that a Celery worker runs beside the pool.

The stack runs the worker itself (stack.toml's [watchers.celery]), with the pool's
environment: the broker is the stack's own Redis (stackctl.broker), and the job reports its
progress on the board's channel with stackctl.realtime.publish, which every open page shows.
"""

from __future__ import annotations

import time

from celery import Celery

from stackctl import realtime
from stackctl.broker import celery_settings
from stackctl.realtime import publish

CHANNEL = "board"
JOBS_KEY = "demo:slow-jobs"
MAX_JOBS = 4
"""Jobs running or waiting at once: each is 11 messages on the board's channel, which every
new visitor is shown, so clicks without end would push the board's messages off it (and grow
the queue for ever)."""
JOB_LEASE = 60
"""Seconds a job holds its place at most: one lost in a crash frees it then."""

app = Celery("demo_tasks")
app.add_defaults(celery_settings)  # the stack's Redis, found when first needed
app.conf.update(
    # One task at a time per worker thread, acknowledged once done: a worker asked to stop
    # finishes what it runs, and what it had not started goes back to the queue.
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
)


TAKE_PLACE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1] - ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
return redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
"""
"""In one step, so that clicks at the same instant cannot all find a free place."""


def take_place(job: str) -> bool:
    """Make room for ``job`` among the MAX_JOBS under way, or say there is none."""
    now = time.time()
    return bool(realtime.client().eval(TAKE_PLACE, 1, JOBS_KEY, now, JOB_LEASE, MAX_JOBS, job))


@app.task
def slow_job(job: str, steps: int = 10, seconds: float = 0.5) -> None:
    """Report 0 %, then each step's progress, up to 100 %."""
    try:
        for step in range(steps + 1):
            if step:
                time.sleep(seconds)
            publish(CHANNEL, {"job": job, "progress": step * 100 // steps})
    finally:
        realtime.client().zrem(JOBS_KEY, job)
