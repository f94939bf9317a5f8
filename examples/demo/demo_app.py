"""The stackctl demo: a live message board.

The page and the form are plain WSGI, served by the uWSGI pool. Posting a message publishes it
to the "board" channel; the gevent worker pushes it to every open page over a websocket, and a
page that was offline for a moment gets what it missed when it reconnects. The CSS and
JavaScript are static files that NGiNX serves without the app seeing the request.

"Run a slow job" hands the work to a Celery worker (demo_tasks.py) that the stack runs beside
the pool; the job's progress comes back to every open page over the same channel.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from urllib.parse import parse_qs

from stackctl.realtime import publish

CHANNEL = "board"
MAX_MESSAGE = 500

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>stackctl demo: live board</title>
<link rel="stylesheet" href="/static/board.css">
</head>
<body>
<h1>Live board</h1>
<p>Messages posted here appear on every open copy of this page, pushed over a websocket.</p>
<form id="post" method="post" action="/post">
  <input name="message" maxlength="{max}" autocomplete="off" placeholder="Say something" required>
  <button>Post</button>
</form>
<form id="job" method="post" action="/job">
  <button>Run a slow job</button> <span>(a Celery worker runs it; its progress shows here)</span>
</form>
<p id="state">connecting...</p>
<ul id="board"></ul>
<script src="/_stackctl/realtime.js"></script>
<script src="/static/board.js" data-channel="{channel}"></script>
</body>
</html>
"""

StartResponse = Callable[..., object]


def respond(
    start_response: StartResponse, status: str, body: bytes, content_type: str
) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def read_message(environ: dict) -> str:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    form = parse_qs(environ["wsgi.input"].read(min(length, 64 * 1024)).decode("utf-8", "replace"))
    return form.get("message", [""])[0].strip()[:MAX_MESSAGE]


def application(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", "/"), environ["REQUEST_METHOD"]
    if path == "/" and method in ("GET", "HEAD"):
        page = PAGE.format(max=MAX_MESSAGE, channel=CHANNEL).encode()
        return respond(start_response, "200 OK", page, "text/html; charset=utf-8")
    if path == "/post" and method == "POST":
        message = read_message(environ)
        if not message:
            return respond(start_response, "400 Bad Request", b"empty message\n", "text/plain")
        publish(CHANNEL, {"text": message})
        if "application/json" in environ.get("HTTP_ACCEPT", ""):
            return respond(start_response, "200 OK", b'{"ok": true}', "application/json")
        start_response("303 See Other", [("Location", "/"), ("Content-Length", "0")])
        return [b""]
    if path == "/job" and method == "POST":
        return start_job(environ, start_response)
    return respond(start_response, "404 Not Found", b"not found\n", "text/plain")


def start_job(environ: dict, start_response: StartResponse) -> list[bytes]:
    try:
        from demo_tasks import MAX_JOBS, slow_job, take_place  # only this page needs Celery
    except ImportError:
        body = b"the slow job needs Celery: pip install 'stackctl[demo]'\n"
        return respond(start_response, "503 Service Unavailable", body, "text/plain")
    job = uuid.uuid4().hex[:8]
    if not take_place(job):
        body = f"{MAX_JOBS} slow jobs are under way already; try again once one is done\n"
        return respond(start_response, "429 Too Many Requests", body.encode(), "text/plain")
    slow_job.delay(job)
    if "application/json" in environ.get("HTTP_ACCEPT", ""):
        body = f'{{"ok": true, "job": "{job}"}}'.encode()
        return respond(start_response, "202 Accepted", body, "application/json")
    start_response("303 See Other", [("Location", "/"), ("Content-Length", "0")])
    return [b""]
