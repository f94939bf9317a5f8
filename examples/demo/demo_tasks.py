"""The demo's background work: a slow job that a Celery worker runs beside the pool.

The stack runs the worker itself (stack.toml's [watchers.celery]), with the pool's
environment: the broker is the stack's own Redis (stackctl.broker), and the job reports its
progress on the board's channel with stackctl.realtime.publish, which every open page shows.
"""

from __future__ import annotations

import time

from celery import Celery

from stackctl.broker import celery_settings
from stackctl.realtime import publish

CHANNEL = "board"

app = Celery("demo_tasks")
app.add_defaults(celery_settings)  # the stack's Redis, found when first needed
app.conf.update(
    # One task at a time per worker thread, acknowledged once done: a worker asked to stop
    # finishes what it runs, and what it had not started goes back to the queue.
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
)


@app.task
def slow_job(job: str, steps: int = 10, seconds: float = 0.5) -> None:
    """Report 0 %, then each step's progress, up to 100 %."""
    for step in range(steps + 1):
        if step:
            time.sleep(seconds)
        publish(CHANNEL, {"job": job, "progress": step * 100 // steps})
