"""A socket's allow list against the real kernel and the real circusd (stackctl.circusd): a
host that is not listed gets no connection, and a changed list applies without a restart."""

from __future__ import annotations

import http.client
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from stackctl import allowlist
from stackctl.errors import StackError
from stackctl.supervisor import call_endpoint
from tests import circusd_alone
from tests.allowlist_probe import REFUSED_WITHIN, connect_from, listener, queued, talks
from tests.conftest import REPO, free_port, wait_for

pytestmark = pytest.mark.e2e

SERVER = "127.0.0.1"
LISTED = "127.0.0.2"
OTHER = "127.0.0.3"
FDHTTP = REPO / "tests" / "apps" / "fdhttp.py"


# --- the filter on a plain socket -----------------------------------------------------------


def test_only_a_listed_ipv4_source_gets_a_connection() -> None:
    with listener(SERVER, f"{LISTED} 198.18.0.0/15") as server:
        assert talks(server, LISTED) == "talked"
        assert talks(server, SERVER) == "timeout"
        assert talks(server, OTHER) == "timeout"
        assert queued(server) == []  # the dropped SYNs left nothing behind


def test_an_ipv4_network_lets_in_every_address_in_it() -> None:
    with listener(SERVER, "127.0.0.0/30") as server:
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            assert talks(server, source) == "talked", source
        assert talks(server, "127.0.0.4") == "timeout"


def test_only_a_listed_ipv6_source_gets_a_connection() -> None:
    if not Path("/proc/net/if_inet6").exists():
        pytest.skip("this kernel has no IPv6")
    # Loopback has one IPv6 address: the check runs in a network namespace of its own,
    # which ends with the process (nothing of it can be left behind).
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "tests.allowlist_probe"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == (
        '{"2001:2::2": "talked", "2001:2::1": "timeout", "queued": [], "::1 listed": "talked"}'
    ), result.stderr


def test_a_dual_stack_socket_filters_ipv4_clients_by_the_ipv4_entries() -> None:
    with listener("::", f"fd00::1 {LISTED}") as server:  # IPv6 socket, IPv4 packets too
        assert server.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert talks(server, LISTED, host=SERVER) == "talked"
        assert talks(server, SERVER, host=SERVER) == "timeout"
        assert talks(server, "::1", host="::1") == "timeout"


def test_the_longest_list_the_kernel_takes_is_attached_and_enforced() -> None:
    hosts = [f"fd00::{i:x}:1" for i in range(400)] + [f"127.0.{i}.9" for i in range(100)]
    assert len(allowlist.program(allowlist.parse(" ".join(hosts)))) > 3000
    with listener(SERVER, " ".join([*hosts, LISTED])) as server:
        assert talks(server, LISTED) == "talked"
        assert talks(server, SERVER) == "timeout"


def test_a_flood_from_an_unlisted_host_leaves_the_queue_to_a_listed_one() -> None:
    attempts, batch = 2000, 250
    with listener(SERVER, LISTED, backlog=16) as server:
        address = server.getsockname()
        answered = 0
        for _ in range(attempts // batch):
            answered += len(flood_batch(address, SERVER, batch))
        assert answered == 0
        # Nobody accepted meanwhile: without the filter the 16 places would be long taken.
        client = connect_from(address, LISTED, timeout=5)
        assert client is not None, "the listed host got no connection after the flood"
        with closing(client):
            assert queued(server) == [LISTED]


def flood_batch(address: tuple[str, int], source: str, count: int) -> list[socket.socket]:
    """Start ``count`` connections at once from ``source``; the ones answered within 0.2 s."""
    clients = [socket.socket() for _ in range(count)]
    try:
        with selectors.DefaultSelector() as selector:
            for client in clients:
                client.setblocking(False)
                client.bind((source, 0))
                client.connect_ex(address)
                selector.register(client, selectors.EVENT_WRITE)
            time.sleep(0.2)
            return [key.fileobj for key, _ in selector.select(timeout=0)]  # type: ignore[misc]
    finally:
        for client in clients:
            client.close()


# --- the filter on circusd's sockets ----------------------------------------------------------


@dataclass
class Circusd:
    process: subprocess.Popen[bytes]
    ini: Path
    endpoint: str
    log: Path
    port: int

    def write(self, allow: str, port: int | None = None) -> None:
        self.ini.write_text(circus_ini(self.ini.parent, port or self.port, allow))

    def pid(self) -> int:
        (pid,) = call_endpoint(self.endpoint, "list", name="web")["pids"]
        return int(pid)

    def socket_fd(self) -> int:
        (sock,) = call_endpoint(self.endpoint, "listsockets")["sockets"]
        return int(sock["fd"])

    def circusctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "circus.circusctl", "--endpoint", self.endpoint,
             "--timeout", "60", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip


def circus_ini(directory: Path, port: int, allow: str) -> str:
    """circusd's config: one TCP socket ``web`` with an allow list, served by FDHTTP."""
    return circusd_alone.config(directory, served_socket("web", port, allow))


def served_socket(name: str, port: int, allow: str) -> str:
    return f"""
[socket:{name}]
host = 127.0.0.1
port = {port}
stackctl_allow = {allow}

[watcher:{name}]
cmd = {sys.executable} {FDHTTP} $(circus.sockets.{name})
use_sockets = True
numprocesses = 1
"""


@contextmanager
def circusd(directory: Path, allow: str) -> Iterator[Circusd]:
    """circusd serving one filtered TCP socket; stopped on exit, and checked for leaks."""
    ini, port = directory / "circus.ini", free_port()
    ini.write_text(circus_ini(directory, port, allow))
    with circusd_alone.running(ini) as process:
        yield Circusd(process, ini, circusd_alone.endpoint(directory), directory / "circusd.log",
                      port)  # fmt: skip


def get_from(port: int, source: str) -> str | None:
    """The body of a GET from ``source``, or None when the connection got no answer."""
    conn = http.client.HTTPConnection(SERVER, port, timeout=REFUSED_WITHIN,
                                      source_address=(source, 0))  # fmt: skip
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode()
    except TimeoutError:
        return None
    finally:
        conn.close()


def served(circus: Circusd, source: str) -> bool:
    with suppress(ConnectionRefusedError):
        return get_from(circus.port, source) is not None
    return False


def test_circusd_serves_only_listed_hosts_and_reloads_a_changed_list_live(
    short_tmp: Path,
) -> None:
    with circusd(short_tmp, LISTED) as circus:
        wait_for(lambda: served(circus, LISTED), timeout=30, what="the watcher to serve")
        pid, fd = circus.pid(), circus.socket_fd()
        assert f"socket web accepts connections from {LISTED}/32 only" in circus.log.read_text()
        assert get_from(circus.port, LISTED) == str(pid)
        assert get_from(circus.port, OTHER) is None

        circus.write(f"{OTHER} 198.18.0.10")
        result = circus.circusctl("reloadconfig", "--waiting")
        assert result.returncode == 0, result.stdout + result.stderr

        assert get_from(circus.port, OTHER) == str(pid)
        assert get_from(circus.port, LISTED) is None
        assert (circus.pid(), circus.socket_fd()) == (pid, fd)  # no restart, no new socket
        assert f"socket web now accepts connections from {OTHER}/32 198.18.0.10/32" in (
            circus.log.read_text()
        )

        circus.write("")  # no list: every host; applied as `stackctl reload` asks for it
        call_endpoint(circus.endpoint, "reloadconfig", waiting=True)
        for source in (SERVER, LISTED, OTHER):
            assert get_from(circus.port, source) == str(pid), source
        assert circus.pid() == pid


def test_circusd_refuses_a_list_that_does_not_parse_at_reload_and_keeps_the_old(
    short_tmp: Path,
) -> None:
    with circusd(short_tmp, LISTED) as circus:
        wait_for(lambda: served(circus, LISTED), timeout=30, what="the watcher to serve")
        pid = circus.pid()
        circus.write(f"{OTHER} 127.0.0.300")
        result = circus.circusctl("reloadconfig", "--waiting")
        assert result.returncode != 0
        assert (
            f"{circus.ini}: [socket:web] stackctl_allow = '{OTHER} 127.0.0.300': "
            "'127.0.0.300' is not an IP address or network; expected IP addresses or networks "
            "separated by spaces"
        ) in result.stdout + result.stderr
        with pytest.raises(StackError, match="127.0.0.300"):  # and without --waiting
            call_endpoint(circus.endpoint, "reloadconfig")
        assert get_from(circus.port, LISTED) == str(pid)
        assert get_from(circus.port, OTHER) is None
        assert circus.pid() == pid


def test_circusd_does_not_start_with_a_list_that_does_not_parse(short_tmp: Path) -> None:
    with circusd(short_tmp, "127.0.0.0/8 localhost") as circus:
        assert circus.process.wait(timeout=30) == 1
        assert (
            "[socket:web] stackctl_allow = '127.0.0.0/8 localhost': 'localhost' is not an IP "
            "address or network"
        ) in circus.log.read_text()
        with pytest.raises(ConnectionRefusedError):  # the socket was never bound
            socket.create_connection((SERVER, circus.port), timeout=5).close()


def test_a_list_on_a_unix_socket_is_refused(short_tmp: Path) -> None:
    with circusd(short_tmp, LISTED) as circus:
        wait_for(lambda: served(circus, LISTED), timeout=30, what="the watcher to serve")
        text = circus.ini.read_text().replace("host = 127.0.0.1\n", f"path = {short_tmp}/w.s\n")
        circus.ini.write_text(text)
        result = circus.circusctl("reloadconfig", "--waiting")
        assert "applies to a TCP socket (host and port), not to a Unix socket path" in (
            result.stdout + result.stderr
        )
        assert result.returncode != 0


def test_a_socket_added_at_reload_is_filtered_from_the_start(short_tmp: Path) -> None:
    # Circus binds it itself, through the class stackctl.circusd puts in its place.
    with circusd(short_tmp, LISTED) as circus:
        wait_for(lambda: served(circus, LISTED), timeout=30, what="the watcher to serve")
        pid, port = circus.pid(), free_port()
        circus.ini.write_text(circus.ini.read_text() + served_socket("web2", port, OTHER))
        result = circus.circusctl("reloadconfig", "--waiting")
        assert result.returncode == 0, result.stdout + result.stderr
        second_served = Circusd(circus.process, circus.ini, circus.endpoint, circus.log, port)
        wait_for(lambda: served(second_served, OTHER), timeout=30, what="the new socket")
        assert get_from(port, LISTED) is None
        assert get_from(circus.port, LISTED) == str(pid)  # the first one untouched
