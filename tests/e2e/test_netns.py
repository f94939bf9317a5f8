"""The several-hosts harness (tests/netns.py): real namespaces, real sockets, real signals.

Each test attacks one promise the multi-host tests rely on: hosts reach each other only on
198.18.0.0/15, a cut host is silent, two networks never meet, and nothing is left behind,
whether the block raises, the process gets SIGTERM, or it is SIGKILLed (then the sweeper)."""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import netns
from tests.conftest import REPO, netns_unavailable, wait_for

pytestmark = pytest.mark.skipif(bool(netns_unavailable()), reason=netns_unavailable() or "")

Make = Callable[[Sequence[str]], netns.Network]
PORT = 8000
"""Any port will do: each host is a fresh namespace where nothing else listens."""

SERVER = textwrap.dedent("""
    import socket, sys
    server = socket.create_server((sys.argv[1], int(sys.argv[2])))
    while True:
        conn, _ = server.accept()
        conn.sendall(sys.argv[3].encode())
        conn.close()
""")

CLIENT = textwrap.dedent("""
    import errno, socket, sys
    address, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            print("reply", conn.recv(100).decode())
    except TimeoutError:
        print("timeout")
    except OSError as e:
        print("error", errno.errorcode.get(e.errno, e.errno))
""")


def serve(host: netns.Host, reply: str) -> None:
    """A server in ``host`` on its address, answering ``reply``; ready when this returns."""
    host.popen([sys.executable, "-c", SERVER, host.address, str(PORT), reply])
    wait_for(lambda: connect(host.address, 1.0) == f"reply {reply}", what=f"{reply} to listen")


def connect(address: str, timeout: float) -> str:
    """From this process (outside every host): what a connection to ``address`` gets."""
    try:
        with socket.create_connection((address, PORT), timeout=timeout) as conn:
            return f"reply {conn.recv(100).decode()}"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return f"error {e.errno}"


def connect_from(host: netns.Host, address: str, timeout: float) -> str:
    """What a connection from inside ``host`` to ``address`` gets."""
    result = host.run([sys.executable, "-c", CLIENT, address, str(PORT), str(timeout)],
                      capture_output=True, text=True, timeout=timeout + 30, check=True)
    return result.stdout.strip()


def in_range(address: str) -> bool:
    ip = ipaddress.ip_address(address.strip("[]"))
    return ip in netns.RANGE or ip.is_loopback


def left_of(names: Sequence[str], links: Sequence[str]) -> list[str]:
    return [n for n in names if (netns.NETNS_DIR / n).exists()] + [
        link for link in links if Path(f"/sys/class/net/{link}").exists()
    ]


def test_a_server_in_one_host_is_reached_from_another_and_from_outside(network: Make) -> None:
    net = network(["app-a", "app-b"])
    a, b = net["app-a"], net["app-b"]
    assert ipaddress.ip_address(net.outside) in netns.RANGE
    assert all(ipaddress.ip_address(h.address) in net.subnet for h in net)
    serve(a, "hello from a")

    assert connect_from(b, a.address, 5) == "reply hello from a"
    assert connect(a.address, 5) == "reply hello from a"
    # Only a's address is listened on, and a has no address, and no route, beyond 198.18/15.
    listening = a.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    locals_ = [line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines()]
    assert locals_ == [a.address]
    addresses = a.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    assert all(in_range(line.split()[3].split("/")[0]) for line in addresses.splitlines())
    beyond = a.run(["ip", "route", "get", "192.0.2.1"], capture_output=True, text=True)
    assert beyond.returncode != 0 and "unreachable" in beyond.stderr
    assert len(a.pids()) == 1, "the server, found by its namespace"
    assert b.pids() == []


def test_a_cut_host_is_silent_until_restored(network: Make) -> None:
    net = network(["app-a", "app-b", "app-c"])
    a, b, c = net["app-a"], net["app-b"], net["app-c"]
    serve(a, "a")
    serve(c, "c")
    assert connect_from(b, a.address, 5) == "reply a"

    a.cut()
    # A pulled cable: no refusal, no "unreachable" (which ARP would report after 3 s), just
    # no answer, both ways, like a dead machine. All at once, to wait 5 s only once.
    with ThreadPoolExecutor() as pool:
        tries = [pool.submit(connect_from, b, a.address, 5), pool.submit(connect, a.address, 5),
                 pool.submit(connect_from, a, c.address, 5)]
        assert [t.result() for t in tries] == ["timeout"] * 3
    assert connect_from(b, c.address, 5) == "reply c", "the others still reach each other"

    a.restore()  # returns when the link works again: no polling needed
    assert connect(a.address, 5) == "reply a"
    assert connect_from(b, a.address, 5) == "reply a"
    assert connect_from(a, c.address, 5) == "reply c"


def test_everything_is_removed_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), netns.Network(["a", "b"]) as net:
        serve(net["a"], "a")
        # A daemon: not this process's child, found only because it lives in the namespace.
        net["b"].run(["sh", "-c", "sleep 300 >/dev/null 2>&1 &"], check=True)
        names, links = [h.netns for h in net], [h.link for h in net] + [net.bridge]
        processes = [owner_of(pid) for h in net for pid in h.pids()]
        assert len(processes) == 2 and len(left_of(names, links)) == 5
        raise RuntimeError("the test failed")
    assert left_of(names, links) == []
    assert [p for p in processes if p.alive()] == []


CHILD = textwrap.dedent("""
    import json, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from tests import netns
    with netns.Network(["a", "b"]) as net:
        net["a"].popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # A daemon: not the child's child; found only because it lives in the namespace.
        net["b"].run(["sh", "-c", sys.argv[2] + " >/dev/null 2>&1 &"], check=True)
        print(json.dumps({
            "namespaces": [h.netns for h in net],
            "links": [h.link for h in net] + [net.bridge],
            "processes": [[pid, netns._start_time(pid)] for h in net for pid in h.pids()],
            "subnet": str(net.subnet),
        }), flush=True)
        time.sleep(300)
""")

STUBBORN = (
    f"{sys.executable} -c 'import pathlib, signal, sys, time; "
    "signal.signal(signal.SIGTERM, lambda *_: pathlib.Path(sys.argv[1], \"term\").touch()); "
    "pathlib.Path(sys.argv[1], \"ready\").touch(); time.sleep(300)' {marker}"
)
"""A process that outlives SIGTERM (until SIGKILL, KILL_WAIT later), and says when it is
ready for it and when it got it, in the directory ``marker``."""


@dataclass
class Child:
    """A child python that built a network, with a process in each host, and waits."""

    process: subprocess.Popen[str]
    namespaces: list[str]
    links: list[str]
    processes: list[netns.Owner]
    subnet: str


@pytest.fixture
def children() -> Iterator[Callable[[int, str], list[Child]]]:
    """Starts ``count`` children at once, their host b running ``daemon``; they are killed,
    and their networks swept, when the test ends."""
    started: list[subprocess.Popen[str]] = []

    def start(count: int, daemon: str = "sleep 300") -> list[Child]:
        for _ in range(count):
            started.append(subprocess.Popen(
                [sys.executable, "-c", CHILD, str(REPO), daemon],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        made = []
        for process in started[-count:]:
            assert process.stdout is not None
            line = json.loads(process.stdout.readline())
            owners = [netns.Owner(pid, start) for pid, start in line.pop("processes")]
            made.append(Child(process, processes=owners, **line))
            assert len(owners) == 2 and len(left_of(line["namespaces"], line["links"])) == 5
        return made

    yield start
    try:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    finally:
        netns.sweep()  # the children are dead: whatever they left is a leftover now
        for process in started:
            process.communicate(timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_removes_everything(
    children: Callable[..., list[Child]], sig: signal.Signals
) -> None:
    [child] = children(1)
    child.process.send_signal(sig)
    _, stderr = child.process.communicate(timeout=60)
    assert "KeyboardInterrupt" in stderr and "NetnsError" not in stderr
    assert_gone(child)


def test_a_second_signal_waits_until_everything_is_removed(
    children: Callable[..., list[Child]], short_tmp: Path
) -> None:
    [child] = children(1, STUBBORN.format(marker=short_tmp))
    wait_for((short_tmp / "ready").exists, what="the stubborn process to start")
    child.process.send_signal(signal.SIGTERM)
    # The stubborn process got its SIGTERM: the child is removing its network now, and will
    # be for KILL_WAIT seconds. A second Ctrl-C or SIGTERM must not cut that short.
    wait_for((short_tmp / "term").exists, what="the network's removal to begin")
    child.process.send_signal(signal.SIGTERM)
    child.process.send_signal(signal.SIGINT)
    _, stderr = child.process.communicate(timeout=60)
    assert "KeyboardInterrupt" in stderr and "NetnsError" not in stderr
    assert_gone(child)


def test_the_sweeper_removes_what_a_killed_run_left(
    children: Callable[..., list[Child]],
) -> None:
    [child] = children(1)
    child.process.kill()
    child.process.wait(timeout=30)
    assert len(left_of(child.namespaces, child.links)) == 5  # SIGKILL: no chance to clean up
    assert all(p.alive() for p in child.processes), "its hosts' processes still run"

    swept = netns.sweep()
    assert sorted(swept.netns) == sorted(child.namespaces)
    assert_gone(child)


def test_processes_building_networks_at_once_get_their_own(
    children: Callable[..., list[Child]],
) -> None:
    made = children(3)
    assert len({c.subnet for c in made}) == 3
    assert len({n for c in made for n in c.namespaces}) == 6
    assert len({link for c in made for link in c.links}) == 9
    for child in made:
        child.process.send_signal(signal.SIGTERM)
    for child in made:
        child.process.communicate(timeout=60)
        assert_gone(child)


def test_the_sweeper_leaves_live_networks_and_what_it_did_not_make(network: Make) -> None:
    net = network(["a"])
    serve(net["a"], "a")
    dead = dead_pid()
    foreign_netns = f"sc{dead}-foreign"
    unmarked = f"sc{dead}n0b"  # named like ours, but without our alias
    marked_elsewhere = f"scx{dead}"  # our alias, but not a name we give
    try:
        subprocess.run(["ip", "netns", "add", foreign_netns], check=True)
        subprocess.run(["ip", "link", "add", unmarked, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "add", marked_elsewhere, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", "dev", marked_elsewhere, "alias",
                        f"{netns.MARK} sc{dead}-1-0"], check=True)

        assert netns.sweep() == netns.Leftovers()
        assert len(left_of([foreign_netns], [unmarked, marked_elsewhere])) == 3
        assert connect(net["a"].address, 5) == "reply a"
    finally:
        netns.remove([foreign_netns], [unmarked, marked_elsewhere])


def test_two_networks_at_once_do_not_collide(network: Make) -> None:
    one, two = network(["a", "b"]), network(["a", "b"])
    assert one.subnet != two.subnet
    assert one.subnet.subnet_of(netns.RANGE) and two.subnet.subnet_of(netns.RANGE)
    assert not {h.netns for h in one} & {h.netns for h in two}
    assert not {one.bridge, *(h.link for h in one)} & {two.bridge, *(h.link for h in two)}
    serve(one["a"], "one")
    serve(two["a"], "two")  # same port, another host

    assert connect_from(one["b"], one["a"].address, 5) == "reply one"
    assert connect_from(two["b"], two["a"].address, 5) == "reply two"
    assert connect_from(one["b"], two["a"].address, 5) == "error ENETUNREACH"


def test_host_names_are_checked() -> None:
    with pytest.raises(ValueError, match=r"got \['front', 'front'\]"):
        netns.Network(["front", "front"])
    with pytest.raises(ValueError, match="Front"):
        netns.Network(["Front"])


# -- helpers -----------------------------------------------------------------------------------


def owner_of(pid: int) -> netns.Owner:
    start = netns._start_time(pid)
    assert start is not None
    return netns.Owner(pid, start)


def assert_gone(child: Child) -> None:
    assert left_of(child.namespaces, child.links) == []
    assert [p for p in child.processes if p.alive()] == []


def dead_pid() -> int:
    """A pid no process has now (it was just reaped)."""
    probe = subprocess.Popen(["true"])
    probe.wait()
    return probe.pid


def test_the_session_fails_when_a_network_is_left_behind(short_tmp: Path) -> None:
    test = short_tmp / "test_forgets.py"
    test.write_text("from tests import netns\n\n\n"
                    "def test_forgets_its_network() -> None:\n"
                    "    netns.Network(['a']).__enter__()\n")
    session = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(REPO), "-c", str(REPO / "pyproject.toml"), "-q", str(test)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = session.communicate(timeout=120)
        left = netns.leftovers(lambda owner: owner.pid == session.pid)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
        netns.sweep()  # the session is over: what it left, if anything, is a leftover
    assert session.returncode != 0
    assert "network namespaces or links left behind" in output, output
    assert f"sc{session.pid}n0b" in output, "it names what it found"
    assert not left, "and removes it"
