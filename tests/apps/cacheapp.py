"""The app of the cache tests: views that mark their answers cacheable or not, each call of
the app written down (calls.log, one line per request, whichever worker ran it).

Every body says which call of the app made it, so that a test tells a kept copy from a
fresh answer: "call 7 of /public?t=a over http: one".
"""

import os
import time
from urllib.parse import parse_qs

PUBLIC = ("Cache-Control", "public, max-age=60")


def record(environ):
    """This call's number for its path and query (the lines of calls.log that name it)."""
    uri = environ["REQUEST_URI"]
    line = f"{environ['REQUEST_METHOD']} {uri}\n"
    try:
        fd = os.open("calls.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except PermissionError:  # a service user in root's stack directory: no count kept
        return 0
    try:
        os.write(fd, line.encode())  # O_APPEND: one write is one whole line, across workers
    finally:
        os.close(fd)
    with open("calls.log") as log:
        return sum(1 for seen in log if seen.split(" ", 1)[1] == uri + "\n")


def content():
    try:
        with open("content.txt") as f:
            return f.read().strip()
    except FileNotFoundError:
        return "one"


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    n = record(environ)
    headers = [("Content-Type", "text/plain")]
    status = "200 OK"
    if path == "/public":  # even a POST answer that says so: NGiNX keeps GET and HEAD only
        headers.append(PUBLIC)
    elif path == "/accel":
        headers.append(("X-Accel-Expires", "60"))
    elif path == "/smaxage":
        headers.append(("Cache-Control", "s-maxage=60"))
    elif path == "/cookie":
        headers += [PUBLIC, ("Set-Cookie", f"sessionid=s{n}; HttpOnly")]
    elif path == "/private":
        headers.append(("Cache-Control", "private, max-age=60"))
    elif path == "/nostore":
        headers.append(("Cache-Control", "public, max-age=60, no-store"))
    elif path == "/slow":
        time.sleep(int(query.get("ms", ["0"])[0]) / 1000)
        headers.append(PUBLIC)
    elif path == "/short":  # fresh for a second, then served stale while it is fetched again
        headers.append(("Cache-Control", "public, max-age=1"))
        if os.path.exists("fail"):
            status = "500 Internal Server Error"
            headers = [("Content-Type", "text/plain")]
    elif path == "/maxage":  # for browsers only: no "public", which shared caches need here
        headers.append(("Cache-Control", "max-age=60"))
    elif path == "/expires":  # HTTP/1.0's date alone, no Cache-Control
        headers.append(("Expires", "Thu, 01 Jan 2099 00:00:00 GMT"))
    elif path == "/accel-cookie":
        headers += [("X-Accel-Expires", "60"), ("Set-Cookie", f"sessionid=s{n}; HttpOnly")]
    elif path == "/odd-case":
        headers.append(("cache-control", "PUBLIC, MAX-AGE=60, PRIVATE"))
    elif path == "/links":  # a page with an absolute link, built from the Host the app is given
        headers.append(PUBLIC)
        body = f'<a href="//{environ.get("HTTP_HOST", "")}/next">call {n}</a>'.encode()
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]
    elif path == "/forwarded":  # as Django with USE_X_FORWARDED_HOST builds its links
        headers.append(PUBLIC)
        host = environ.get("HTTP_X_FORWARDED_HOST", "")
        body = f'<a href="//{host}/next">call {n}</a>'.encode()
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]
    elif path == "/proxyfix":  # as Werkzeug's ProxyFix(x_port=1, x_prefix=1) builds links
        headers.append(PUBLIC)
        port = environ.get("HTTP_X_FORWARDED_PORT", "")
        prefix = environ.get("HTTP_X_FORWARDED_PREFIX", "")
        body = f"port={port} prefix={prefix} call {n}".encode()
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]
    elif path == "/article":  # kept while published; gone (404, unmarked) or failing later
        if content() == "gone":
            status = "404 Not Found"
        elif os.path.exists("fail"):
            status = "500 Internal Server Error"
        else:
            headers.append(PUBLIC)
    elif path == "/conditional":  # an app that answers a visitor's own conditions itself
        headers += [PUBLIC, ("ETag", '"v1"')]
        if "HTTP_RANGE" in environ:
            status = "206 Partial Content"
            headers.append(("Content-Range", "bytes 0-3/4"))
        elif environ.get("HTTP_IF_NONE_MATCH") == '"v1"':
            start_response("304 Not Modified", headers)
            return [b""]
    elif path in ("/do-refresh", "/do-purge"):  # stackctl.cache from inside a worker
        from stackctl import cache

        target = query["path"][0]
        done = cache.refresh(target) if path == "/do-refresh" else cache.purge(target)
        body = f"{done}".encode()
        start_response(status, [*headers, ("Cache-Control", "no-store")])
        return [body]
    scheme = environ.get("REQUEST_SCHEME")
    body = f"call {n} of {environ['REQUEST_URI']} over {scheme}: {content()}".encode()
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return [body]
