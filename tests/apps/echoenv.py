"""The app the front-door tests load: it answers with the WSGI environ it was given."""

import json


def application(environ, start_response):
    seen = {k: v for k, v in environ.items() if isinstance(v, str)}
    headers = [("Content-Type", "application/json")]
    if environ.get("PATH_INFO") == "/own-headers":  # an app that sets its own frame options
        headers.append(("X-Frame-Options", "SAMEORIGIN"))
    start_response("200 OK", headers)
    return [json.dumps(seen).encode()]
