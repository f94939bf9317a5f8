"""The app the restart tests load: slow GETs, echoing POSTs, and a request that hangs."""

import os
import signal
import time
from urllib.parse import parse_qs

# A test makes the workers slow to start, as a real app's often are.
if os.path.exists("slow-start"):
    with open("slow-start") as seconds:
        time.sleep(float(seconds.read()))


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if os.environ.get("DJANGO_SETTINGS_MODULE") == "refuse_all":  # settings that break a site
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"Bad Request (400): host not allowed"]
    if path == "/grow":
        return grow(environ, start_response)
    if path == "/stubborn":  # this worker now ignores the graceful stop signal
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if path == "/echo":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
    elif path == "/sleep":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if "mark" in query:  # lets a test know the request is in a worker
            open(query["mark"][0], "w").close()
        ms = int(query.get("ms", ["0"])[0])
        time.sleep(ms / 1000)
        body = f"slept {ms}".encode()
    elif path == "/hang":
        time.sleep(3600)
        body = b"never"
    else:
        body = f"pid {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


hoard = []


def grow(environ, start_response):
    """/grow: keep 96 MiB more in this worker, to cross a memory limit; answers its pid."""
    hoard.append(bytearray(96 * 2**20))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
