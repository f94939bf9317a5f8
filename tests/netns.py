"""Several hosts on one machine, for the multi-host tests and benchmarks/failover.py.

``with Network(["front", "app-a", "app-b"]) as net:`` makes one Linux network namespace per
host, each joined to one bridge by a veth pair, with addresses from 198.18.0.0/15 (RFC 2544,
kept for benchmarks) only: the bridge, where this process (``net.outside``) talks to the hosts,
is ``198.18.N.1`` and the hosts ``198.18.N.10`` and up, where ``N`` is a /24 claimed for this
network alone. A host has no route beyond that /24, so nothing it sends can leave the bridge.

Everything made here is named after its owner, the process that made it (pid and start time):
namespaces ``sc<pid>-<start>-<k>-<host>``, links ``sc<pid>n<k>...`` with the alias
``stackctl-netns sc<pid>-<start>-<k>``. That is how ``sweep()`` finds the leftovers of a run
that was killed (SIGKILL leaves no chance to clean up) without ever touching what it did not
make, or what a live process still uses.

Needs root and iproute2 (``ip``); uses only the standard library, so benchmarks can import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

RANGE = ipaddress.IPv4Network("198.18.0.0/15")
FIRST_HOST = 10
"""Hosts get .10, .11, ...; .1 is the bridge, where this process sits."""
MAX_HOSTS = 99
"""Link names carry the host's index in two digits, to stay within 15 characters."""
MARK = "stackctl-netns"
NETNS_DIR = Path("/run/netns")
LOCK = Path("/run/lock/stackctl-netns.lock")
KILL_WAIT = 3.0
"""Seconds a process in a namespace gets between SIGTERM and SIGKILL."""
HOST_NAME = re.compile(r"[a-z][a-z0-9-]{0,23}")
COPIED_SYSCTLS = ("net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
                  "net.ipv4.ip_local_port_range")
"""Per-namespace settings a new namespace would otherwise take from the kernel's defaults,
not from this machine's tuning: a stack in a host must get the backlog it gets outside."""

_NETNS_NAME = re.compile(r"sc(\d+)-(\d+)-(\d+)-")
_ALIAS = re.compile(rf"{MARK} sc(\d+)-(\d+)-(\d+)")
_counter = iter(range(1_000_000))


class NetnsError(RuntimeError):
    """A namespace, a link or a process could not be made or removed."""


@dataclass(frozen=True)
class Owner:
    """A process, told apart from a later one that reuses its pid by its start time."""

    pid: int
    start: int

    @classmethod
    def me(cls) -> Owner:
        pid = os.getpid()
        start = _start_time(pid)
        assert start is not None
        return cls(pid, start)

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start


def _start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot; None when there is no such pid,
    or only its zombie (dead, waiting for its parent to collect its exit status)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces: count the fields after it.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _ip(*args: str, batch: Sequence[str] = (), check: bool = True) -> str:
    command = ["ip", *args]
    if batch:
        command += ["-batch", "-"]
    result = subprocess.run(
        command, input="".join(f"{line}\n" for line in batch), capture_output=True, text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(command)} failed: {result.stderr.strip()}\n"
                         + "".join(f"  {line}\n" for line in batch))
    return result.stdout


def _mac(subnet: int, last: int) -> str:
    """A locally administered MAC address, unique per network and host."""
    return f"02:53:63:{subnet >> 8:02x}:{subnet & 0xFF:02x}:{last:02x}"


# -- processes in a namespace ------------------------------------------------------------------


def _netns_inode(netns: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / netns)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _pids_in(inode: tuple[int, int]) -> list[int]:
    """The processes whose network namespace is ``inode`` (what ``ip netns pids`` does)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # gone, or a zombie: it holds no namespace any more
            continue
        if (st.st_dev, st.st_ino) == inode:
            pids.append(int(entry.name))
    return pids


def _signal_exactly(pid: int, inode: tuple[int, int], sig: int) -> None:
    """Signal ``pid`` only if it is still the process in that namespace: a pidfd pins it, so
    a pid reused in the meantime is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
        if (st.st_dev, st.st_ino) == inode:
            signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


def kill_processes(netns_names: Sequence[str], reap: Callable[[], None] = lambda: None) -> None:
    """SIGTERM every process in these namespaces, SIGKILL what is left after KILL_WAIT, and
    return when none is left. ``reap`` collects this process's own children as they die."""
    inodes = [i for i in map(_netns_inode, netns_names) if i is not None]

    def alive() -> list[tuple[int, tuple[int, int]]]:
        reap()
        return [(pid, inode) for inode in inodes for pid in _pids_in(inode)]

    deadline = time.monotonic() + KILL_WAIT
    sig = signal.SIGTERM
    while left := alive():
        if time.monotonic() > deadline + 2 * KILL_WAIT:
            raise NetnsError(f"processes survive SIGKILL: {[pid for pid, _ in left]}")
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        # Again each round: a process may have forked a new one after the last signal.
        for pid, inode in left:
            _signal_exactly(pid, inode, sig)
        time.sleep(0.05)


# -- the network ---------------------------------------------------------------------------


@dataclass
class Host:
    """One "machine": a network namespace with one address on the bridge."""

    name: str
    address: str
    netns: str
    link: str
    """The bridge side of its veth pair, in this process's namespace."""
    mac: str
    _children: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def exec_args(self, cmd: Sequence[str]) -> list[str]:
        """The command line that runs ``cmd`` inside this host."""
        return ["ip", "netns", "exec", self.netns, *cmd]

    def run(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.exec_args(cmd), **kwargs)

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside this host; it is killed, at the latest, with the network."""
        child = subprocess.Popen(self.exec_args(cmd), **kwargs)
        self._children.append(child)
        return child

    def pids(self) -> list[int]:
        """Every process in this host, whoever started it."""
        inode = _netns_inode(self.netns)
        return _pids_in(inode) if inode else []

    def cut(self) -> None:
        """Pull its cable: whatever it sends or is sent is dropped, silently (so a connection
        attempt times out, as it does to a dead machine), until ``restore()``."""
        _ip("link", "set", "dev", self.link, "down")

    def restore(self) -> None:
        """Plug the cable back in; returns once the host's side has its carrier again."""
        _ip("link", "set", "dev", self.link, "up")
        # The kernel hands carrier changes to a worker that may lag: wait for it, so that a
        # test's next connection does not race it.
        deadline = time.monotonic() + 10
        while " UP " not in _ip("-n", self.netns, "-br", "link", "show", "dev", "eth0"):
            if time.monotonic() > deadline:
                raise NetnsError(f"{self.name}: its link is still down 10 s after restore()")
            time.sleep(0.01)

    def _reap(self) -> None:
        for child in self._children:
            child.poll()


class Network:
    """A bridge, and one namespace per host on it; all of it removed when the block ends,
    however it ends: an exception, Ctrl-C, or SIGTERM (which unwinds the program as Ctrl-C does
    while a network lives). Only SIGKILL leaves leftovers, for ``sweep()``."""

    def __init__(self, hosts: Sequence[str]) -> None:
        bad = [h for h in hosts if not HOST_NAME.fullmatch(h)]
        if bad or not hosts or len(set(hosts)) != len(hosts) or len(hosts) > MAX_HOSTS:
            raise ValueError(
                f"hosts: expected 1 to {MAX_HOSTS} distinct names of lowercase letters, digits "
                f"and '-', starting with a letter, at most 24 characters; got {list(hosts)}"
            )
        self.owner = Owner.me()
        self._k = k = next(_counter)
        self.id = f"sc{self.owner.pid}-{self.owner.start}-{k}"
        self.bridge = f"sc{self.owner.pid}n{k}b"
        self._link_prefix = f"sc{self.owner.pid}n{k}v"
        if len(f"{self._link_prefix}{MAX_HOSTS}") > 15:
            raise NetnsError(f"link names would pass Linux's 15 characters: {self.bridge}")
        self._names = list(hosts)
        self.hosts: dict[str, Host] = {}
        self.subnet = ipaddress.IPv4Network("198.18.0.0/24")
        self.outside = ""
        self._interrupts = _Interrupts()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    def __enter__(self) -> Network:
        self._interrupts.install()
        try:
            sweep()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process in the hosts, remove the namespaces, the links and the bridge."""
        with self._interrupts.deferred():
            netns = [f"{self.id}-{name}" for name in self._names]
            try:
                kill_processes(netns, reap=self._reap)
            finally:  # even a process that survives SIGKILL leaves no link behind
                remove(netns, [h.link for h in self] + [self.bridge])
            for host in self:
                for child in host._children:
                    child.wait(timeout=KILL_WAIT)  # dead already: this only reaps it
            left = [n for n in netns if (NETNS_DIR / n).exists()]
            left += [link for link in [*(h.link for h in self), self.bridge]
                     if Path(f"/sys/class/net/{link}").exists()]
            if left:
                raise NetnsError(f"could not remove {left}")

    def _reap(self) -> None:
        for host in self:
            host._reap()

    def _build(self) -> None:
        with _locked():
            index = _free_subnet(start=self.owner.pid * 7 + self._k)
            self.subnet = list(RANGE.subnets(new_prefix=24))[index]
            self.outside = str(self.subnet[1])
            bridge_mac = _mac(index, 1)
            for i, name in enumerate(self._names):
                self.hosts[name] = Host(
                    name=name, address=str(self.subnet[FIRST_HOST + i]),
                    netns=f"{self.id}-{name}", link=f"{self._link_prefix}{i}",
                    mac=_mac(index, FIRST_HOST + i),
                )
            alias = f'alias "{MARK} {self.id}"'
            create = [f"netns add {h.netns}" for h in self]
            create += [f"link add {self.bridge} address {bridge_mac} type bridge",
                       f"link set dev {self.bridge} {alias}",
                       f"addr add {self.outside}/24 dev {self.bridge}"]
            for h in self:
                create += [f"link add {h.link} type veth peer name eth0 address {h.mac} "
                           f"netns {h.netns}",
                           f"link set dev {h.link} {alias} master {self.bridge}"]
            _ip(batch=create)
        # IPv6 would chatter (router solicitations, DAD) on the bridge: only 198.18 goes there.
        for link in [self.bridge, *(h.link for h in self)]:
            _write_sysctl_file(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6", "1")
        # Fixed neighbours: no ARP, so a cut host looks like a dead one (no answer at all)
        # rather than an unreachable one (an error after about 3 s, when ARP gives up).
        _ip(batch=[f"link set dev {link} up" for link in [self.bridge, *(h.link for h in self)]]
            + [f"neigh replace {h.address} lladdr {h.mac} dev {self.bridge} nud permanent"
               for h in self])
        neighbours = [(self.outside, bridge_mac)] + [(h.address, h.mac) for h in self]
        setups = [(h.name, self._setup(h, neighbours)) for h in self]
        failed = [(name, _finish(child)) for name, child in setups]
        failed = [(name, err) for name, err in failed if err is not None]
        if failed:
            raise NetnsError(f"setting up hosts failed: {failed}")

    def _setup(self, host: Host, neighbours: list[tuple[str, str]]) -> subprocess.Popen[str]:
        """Inside the host: its settings, its address, lo up, its neighbours (all hosts at
        once, in parallel: one process each)."""
        settings = [f"{key}={_read_sysctl(key)}" for key in COPIED_SYSCTLS]
        settings.append("net.ipv6.conf.eth0.disable_ipv6=1")
        batch = ["link set dev lo up", f"addr add {host.address}/24 dev eth0",
                 "link set dev eth0 up"]
        batch += [f"neigh replace {address} lladdr {mac} dev eth0 nud permanent"
                  for address, mac in neighbours if address != host.address]
        script = 'sysctl -q -w "$@" && exec ip -batch -'
        child = subprocess.Popen(
            host.exec_args(["sh", "-c", script, "sh", *settings]),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        assert child.stdin is not None
        child.stdin.write("".join(f"{line}\n" for line in batch))
        child.stdin.close()
        return child


def _finish(child: subprocess.Popen[str]) -> str | None:
    """Wait for ``child``; what it said on stderr if it failed."""
    assert child.stderr is not None
    error = child.stderr.read()
    child.stderr.close()
    return error if child.wait(timeout=60) != 0 else None


def _read_sysctl(key: str) -> str:
    return " ".join(Path("/proc/sys", *key.split(".")).read_text().split())


def _write_sysctl_file(path: str, value: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # no IPv6 in this kernel: nothing to silence
        Path(path).write_text(value)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Held while a network picks its /24 and puts it on its bridge, so that two processes
    building networks at once never pick the same one."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_subnet(start: int) -> int:
    """The index of a /24 of 198.18.0.0/15 that no address of this namespace is in."""
    used = set()
    for line in _ip("-4", "-o", "addr", "show").splitlines():
        address = ipaddress.ip_interface(line.split()[3])
        if address.ip in RANGE:
            used.add((int(address.ip) - int(RANGE.network_address)) >> 8)
    count = RANGE.num_addresses >> 8
    for step in range(count):
        index = (start + step) % count
        if index not in used:
            return index
    raise NetnsError("every /24 of 198.18.0.0/15 is in use")


def remove(netns: Sequence[str], links: Sequence[str]) -> None:
    """Delete links and namespaces that may or may not exist (-force: go on past the ones that
    do not). The links first: a namespace some process still holds would keep its veth."""
    existing = [link for link in links if Path(f"/sys/class/net/{link}").exists()]
    batch = [f"link del dev {link}" for link in existing]
    batch += [f"netns del {name}" for name in netns if (NETNS_DIR / name).exists()]
    if batch:
        _ip("-force", batch=batch, check=False)


# -- leftovers -----------------------------------------------------------------------------


@dataclass
class Leftovers:
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.netns or self.links)


def leftovers(owned_by: Callable[[Owner], bool]) -> Leftovers:
    """The namespaces and links made here whose owner ``owned_by`` selects."""
    found = Leftovers()
    names = sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else []
    for name in names:
        if (m := _NETNS_NAME.match(name)) and owned_by(Owner(int(m[1]), int(m[2]))):
            found.netns.append(name)
    for link in sorted(os.listdir("/sys/class/net")):
        try:
            alias = Path(f"/sys/class/net/{link}/ifalias").read_text().strip()
        except OSError:
            continue
        m = _ALIAS.fullmatch(alias)
        if m and link.startswith(f"sc{m[1]}n") and owned_by(Owner(int(m[1]), int(m[2]))):
            found.links.append(link)
    return found


def sweep() -> Leftovers:
    """Remove what networks of processes that are gone left behind (they were SIGKILLed):
    their processes first, then their links and namespaces. Returns what it removed."""
    found = leftovers(lambda owner: not owner.alive())
    if found:
        kill_processes(found.netns)
        remove(found.netns, found.links)
    return found


class _Interrupts:
    """While a network lives, SIGTERM unwinds the program as Ctrl-C does, so that ``with``
    blocks end and the network is removed; while it is being removed, SIGINT and SIGTERM wait
    until it is gone. Handlers someone else installed keep working (they are called)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.pending: list[int] = []
        self.removing = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread
        for sig in self.SIGNALS:
            previous = signal.getsignal(sig)
            if previous not in (signal.SIG_IGN, None):
                self.previous[sig] = previous
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.removing:
            self.pending.append(signum)
        else:
            self._forward(signum, frame)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        previous = self.previous[signum]
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.removing = True
        try:
            yield
        finally:
            self.removing = False
            handlers, self.previous = self.previous, {}
            for sig, previous in handlers.items():
                signal.signal(sig, previous)
            pending, self.pending = self.pending, []
            if pending:
                self.previous = handlers
                try:
                    self._forward(pending[0], None)
                finally:
                    self.previous = {}
