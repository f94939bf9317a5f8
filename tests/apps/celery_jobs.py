"""The app of the background-worker tests: a view enqueues Celery tasks, and each task
publishes its result on the "results" channel, where a websocket client waits for it."""

import json
import os
import time
from urllib.parse import parse_qs

from celery import Celery

from stackctl.broker import celery_settings
from stackctl.realtime import publish

app = Celery("celery_jobs")
# A worker asked to stop finishes its task; what it had not started stays in the queue.
app.add_defaults(celery_settings)
app.conf.update(worker_prefetch_multiplier=1, task_acks_late=True,
                broker_connection_retry_on_startup=True)
if "VISIBILITY_TIMEOUT" in os.environ:  # how soon a task killed mid-run is handed out again
    visibility = int(os.environ["VISIBILITY_TIMEOUT"])
    # (and looked for each second, not every 100 s; a lock left by a killed worker expires)
    app.conf.broker_transport_options = {
        "visibility_timeout": visibility, "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1, "unacked_mutex_expire": visibility,
    }


@app.task
def job(batch, number, seconds):
    time.sleep(seconds)
    publish("results", {"batch": batch, "number": number, "pid": os.getpid(),
                        "greeting": os.environ.get("GREETING"),
                        "has_redis_url": "STACKCTL_REDIS_URL" in os.environ})


def application(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if environ.get("PATH_INFO") == "/enqueue" and environ["REQUEST_METHOD"] == "POST":
        batch, count = query["batch"][0], int(query["count"][0])
        seconds = float(query.get("seconds", ["0"])[0])
        for number in range(count):
            job.delay(batch, number, seconds)
        start_response("202 Accepted", [("Content-Type", "application/json")])
        return [json.dumps({"enqueued": count}).encode()]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]
