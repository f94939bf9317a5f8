"""A tiny HTTP server on a listening socket it is handed by fd (Circus's ``use_sockets``):
it answers every GET with its own pid.

    python tests/apps/fdhttp.py FD
"""

from __future__ import annotations

import os
import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Pid(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = HTTPServer(("", 0), Pid, bind_and_activate=False)
    server.socket.close()
    # The socket is Circus's, non-blocking: an accept that finds the queue empty is skipped.
    server.socket = socket.socket(fileno=int(sys.argv[1]))
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
