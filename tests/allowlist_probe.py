"""Connecting to a filtered socket from a chosen source address, as another host would.

On loopback every address of 127.0.0.0/8 is local, so a client bound to 127.0.0.2 reaches
127.0.0.1 with 127.0.0.2 as its source. IPv6 has only ::1 there: ``python -m
tests.allowlist_probe`` runs the IPv6 check inside a network namespace of its own (``unshare
--net``, which ends with the process) with two addresses of the benchmarking range
2001:2::/48 (RFC 5180) on its loopback, and prints what it saw as JSON.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager

from stackctl import allowlist

REFUSED_WITHIN = 1.0
"""Seconds a client waits for a dropped SYN to be answered: Linux resends the SYN after 1 s,
so a connection the filter let in is answered well within this."""
HELLO = b"hello\n"


@contextmanager
def listener(host: str, allow: str, backlog: int = 64) -> Iterator[socket.socket]:
    """A TCP socket listening on ``host`` (an ephemeral port), filtered before it is bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with closing(socket.socket(family, socket.SOCK_STREAM)) as server:
        allowlist.attach(server, allowlist.parse(allow))
        server.bind((host, 0))
        server.listen(backlog)
        yield server


def connect_from(address: tuple[str, int], source: str,
                 timeout: float = REFUSED_WITHIN) -> socket.socket | None:  # fmt: skip
    """A socket connected to ``address`` from ``source``, or None when no answer came."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    client = socket.socket(family, socket.SOCK_STREAM)
    try:
        client.bind((source, 0))
        client.settimeout(timeout)
        client.connect(address)
    except TimeoutError:
        client.close()
        return None
    except BaseException:
        client.close()
        raise
    return client


def talks(server: socket.socket, source: str, host: str | None = None) -> str:
    """Connect from ``source`` (to ``host``, else the address the server is bound to), have
    the server accept and answer: 'talked', or what failed."""
    bound, port = server.getsockname()[:2]
    client = connect_from((host or bound, port), source)
    if client is None:
        return "timeout"
    with closing(client):
        server.settimeout(5)
        conn, peer = server.accept()
        with closing(conn):
            conn.sendall(HELLO)
            client.settimeout(5)
            answer = client.recv(len(HELLO))
        if peer[0].removeprefix("::ffff:") != source or answer != HELLO:
            return f"wrong peer {peer[0]} or answer {answer!r}"
        return "talked"


def queued(server: socket.socket) -> list[str]:
    """The sources of the connections waiting in ``server``'s accept queue (accepted here)."""
    server.settimeout(0.2)
    sources = []
    while True:
        try:
            conn, peer = server.accept()
        except TimeoutError:
            return sources
        conn.close()
        sources.append(peer[0])


def attached(sock: socket.socket) -> list[allowlist.Instruction]:
    """The filter program the kernel holds for ``sock`` (SO_GET_FILTER), [] when none.

    Through libc: the option's length counts instructions, not bytes, which Python's
    getsockopt cannot express."""
    libc = ctypes.CDLL(None, use_errno=True)
    count = ctypes.c_uint32(0)
    if libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, allowlist.SO_ATTACH_FILTER, None,
                       ctypes.byref(count)) != 0:  # fmt: skip
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    code = ctypes.create_string_buffer(8 * count.value)
    if count.value and libc.getsockopt(sock.fileno(), socket.SOL_SOCKET,
                                       allowlist.SO_ATTACH_FILTER, code,
                                       ctypes.byref(count)) != 0:  # fmt: skip
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return [allowlist.Instruction(*struct.unpack_from("HBBI", code.raw, 8 * i))
            for i in range(count.value)]  # fmt: skip


IPV6_SERVER = "2001:2::1"
IPV6_LISTED = "2001:2::2"


def wait_for_path(host: str, source: str, within: float = 10.0) -> None:
    """Return once ``source`` reaches an unfiltered listener on ``host``.

    The kernel finishes a new IPv6 address (its local route) in a work queue of its own, a
    moment after `ip addr add` returns; on a loaded machine a first SYN can go out before, and
    is lost. Without this wait such a loss would read as the filter's doing."""
    deadline = time.monotonic() + within
    with listener(host, "::/0") as server:
        while talks(server, source) != "talked":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{source} never reached {host}, even unfiltered")


def ipv6_check() -> dict[str, object]:
    """In a namespace of its own: a server on 2001:2::1 that lets in 2001:2::2 only."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for address in (IPV6_SERVER, IPV6_LISTED):
        subprocess.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"],
                       check=True)  # fmt: skip
    wait_for_path(IPV6_SERVER, IPV6_LISTED)
    with listener(IPV6_SERVER, f"[{IPV6_LISTED}]") as server:
        seen: dict[str, object] = {
            IPV6_LISTED: talks(server, IPV6_LISTED),
            IPV6_SERVER: talks(server, IPV6_SERVER),
        }
        seen["queued"] = queued(server)
    with listener("::1", "::1") as server:  # and ::1 itself, when it is the one listed
        seen["::1 listed"] = talks(server, "::1")
    return seen


if __name__ == "__main__":
    print(json.dumps(ipv6_check()))
