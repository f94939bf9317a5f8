"""Starting, asking and stopping the stack's circusd.

circusd is started in a session of its own, so that Ctrl-C in the terminal reaches only
``stackctl up``, which then asks circusd for an orderly stop instead of every child getting
SIGINT at once.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterable
from contextlib import closing, suppress
from dataclasses import dataclass
from typing import Any

import psutil

from stackctl import background, cluster, drain, flapping, processes
from stackctl.errors import StackError
from stackctl.flapping import FAILED_DIR, failure_note
from stackctl.logfile import no_follow
from stackctl.profile import Profile
from stackctl.readiness import ready_dir
from stackctl.stack import Stack
from stackctl.watchers import BACKGROUND, STOP_ORDER, WATCHERS

POLL_INTERVAL = 0.1
CONFLICT_PATIENCE = 10.0


# --- talking to circusd -----------------------------------------------------------------------


def call(stack: Stack, command: str, timeout: float = 10.0, **props: Any) -> dict[str, Any]:
    """Send one command to the stack's circusd; see :func:`call_endpoint`."""
    return call_endpoint(stack.circus_endpoint, command, timeout, **props)


def call_endpoint(endpoint: str, command: str, timeout: float = 10.0,
                  **props: Any) -> dict[str, Any]:  # fmt: skip
    """Send one command to circusd; a refusal becomes a StackError with Circus's reason.

    circusd refuses a command while it runs another ("arbiter is already running ...")
    rather than queueing it; such a refusal is retried for a few seconds.
    """
    deadline = time.monotonic() + CONFLICT_PATIENCE
    while True:
        answer = _call_once(endpoint, command, timeout, props)
        busy = "already running" in str(answer.get("reason", ""))
        if answer.get("status") == "ok" or not busy or time.monotonic() > deadline:
            break
        time.sleep(POLL_INTERVAL)
    if answer.get("status") != "ok":
        raise StackError(f"circusd refused {command!r}: {answer.get('reason', answer)}")
    return answer


def _call_once(endpoint: str, command: str, timeout: float,
               props: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    from circus.client import CircusClient
    from circus.exc import CallError

    client = CircusClient(endpoint=endpoint, timeout=timeout)
    try:
        answer: dict[str, Any] = client.send_message(command, **props)
    except CallError as e:
        raise StackError(f"circusd did not answer {command!r}: {e}") from None
    finally:
        client.stop()
    return answer


def running_pid(stack: Stack) -> int | None:
    """The pid of this stack's circusd, or None when it is not running."""
    proc = processes.circusd(stack.run_dir)
    return proc.pid if proc is not None else None


def clean_stale(stack: Stack) -> list[int]:
    """After a crash: stop leftover processes and remove pid files and sockets of the dead stack."""
    leftovers = processes.find(stack.run_dir)
    processes.kill_all(leftovers)
    for directory in (stack.run_dir / FAILED_DIR, ready_dir(stack.run_dir)):
        shutil.rmtree(directory, ignore_errors=True)
    for path in (stack.circus_pidfile, stack.run_dir / processes.NGINX_PIDFILE,
                 stack.wsgi_socket, stack.ws_socket, stack.redis_socket,
                 stack.run_dir / "circus.ctl", stack.run_dir / "circus.pub", stack.cache_socket,
                 *stack.service_dir.glob("canary-*.sock")):  # fmt: skip
        path.unlink(missing_ok=True)
    return [p.pid for p in leftovers]


# --- readiness --------------------------------------------------------------------------------


def probe_tls() -> ssl.SSLContext:
    """For stackctl's own probes of its own NGiNX over loopback: whether it serves, not who
    it is (a self-signed certificate names no CA, and a real one may name no loopback)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def http_answers(stack: Stack) -> bool:
    """True once NGiNX and a WSGI worker behind it answer ``GET /`` (any status below 500):
    over HTTPS when it is on, since plain HTTP then only redirects."""
    conn = (
        http.client.HTTPSConnection(
            stack.local_host, stack.front.port, timeout=2, context=probe_tls()
        )
        if stack.tls
        else http.client.HTTPConnection(stack.local_host, stack.front.port, timeout=2)
    )
    try:
        conn.request("GET", "/", headers={"Host": "localhost"})
        return conn.getresponse().status < 500
    except OSError:
        return False
    finally:
        conn.close()


def front_socket(stack: Stack, address: tuple[str, int]) -> socket.socket:
    plain = socket.create_connection(address, timeout=2)
    if not stack.tls:
        return plain
    try:
        return probe_tls().wrap_socket(plain)
    except OSError:
        plain.close()
        raise


def readiness_checks(stack: Stack) -> list[Callable[[], bool]]:
    """What must answer before `up` returns: the site and the websocket endpoint through a
    front's NGiNX; on a host without one, its pools directly; on a redis host, Redis."""
    if "nginx" in stack.watchers:
        return [lambda: http_answers(stack), lambda: websocket_accepts(stack)]
    checks: list[Callable[[], bool]] = []
    if stack.embedded_redis:
        checks.append(lambda: redis_answers(stack)[0])
    if "wsgi" in stack.watchers:
        checks.append(lambda: pool_answers(stack))
    if "ws" in stack.watchers:
        checks.append(lambda: realtime_health(stack).ok)
    return checks


def pool_answers(stack: Stack) -> bool:
    """A wsgi worker answers the check path (any status below 500) on the pool's socket."""
    from stackctl.reload import site_host, uwsgi_get

    try:
        answer = uwsgi_get(stack.wsgi_address, stack.profile.wsgi.check_path,
                           site_host(stack), timeout=2)  # fmt: skip
    except OSError:
        return False
    return answer.status < 500


def realtime_health(stack: Stack) -> Any:
    from stackctl import realtime

    return realtime.health(stack.ws_address, stack.profile.ws.prefix)


def websocket_accepts(stack: Stack) -> bool:
    """True once the ws worker, through NGiNX, completes a websocket handshake."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, RejectConnection, Request

    address = (stack.local_host, stack.front.port)
    ws = WSConnection(ConnectionType.CLIENT)
    try:
        with closing(front_socket(stack, address)) as sock:
            sock.sendall(
                ws.send(Request(host="localhost", target=f"{stack.profile.ws.prefix}_ready"))
            )
            while True:
                data = sock.recv(4096)
                if not data:
                    return False
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        return True
                    if isinstance(event, RejectConnection):
                        return False
    except OSError:
        return False


class FailureWatch:
    """Notices watchers that Circus stopped after they had started (flapping, crashing).

    A watcher that has not started yet is "stopped" too, so a stopped watcher counts as failed
    only if it was seen active before, or the flapping plugin left a note (it may stop a pool
    that crashes at once before any poll saw it active).
    """

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.seen_active: set[str] = set()

    def failures(self) -> list[str]:
        try:
            statuses = call(self.stack, "status", timeout=3)["statuses"]
        except StackError:
            return []
        failed = []
        for name, state in statuses.items():
            if name not in WATCHERS:
                continue
            if state == "active":
                self.seen_active.add(name)
            elif state == "stopped" and (
                name in self.seen_active or failure_note(self.stack.run_dir, name).is_file()
            ):
                failed.append(f"{name}: {failure_reason(self.stack, name)}")
        return failed


def failure_reason(stack: Stack, watcher: str) -> str:
    """Why a watcher stopped by itself (the flapping plugin's note), with its last traceback."""
    note = failure_note(stack.run_dir, watcher)
    reason = note.read_text().strip() if note.is_file() else "stopped after crashing"
    return f"{reason}; from its log:\n{crash_report(stack, watcher)}"


def crash_report(stack: Stack, watcher: str) -> str:
    """The last traceback in a watcher's log (else its last lines), indented."""
    return textwrap.indent(flapping.last_crash(stack.log_dir / f"{watcher}.log"), "    ")


def log_tail(stack: Stack, watcher: str) -> str:
    """The end of a watcher's log, indented to sit under a message."""
    return textwrap.indent(flapping.log_tail(stack.log_dir / f"{watcher}.log"), "    ")


def wait_until(check: Callable[[], bool], deadline: float, alive: Callable[[], bool]) -> bool:
    while time.monotonic() < deadline:
        if check():
            return True
        if not alive():
            return False
        time.sleep(POLL_INTERVAL)
    return False


# --- start and stop --------------------------------------------------------------------------


@dataclass
class Running:
    stack: Stack
    process: subprocess.Popen[bytes]


def check_port_free(stack: Stack, keys: Iterable[str] | None = None) -> None:
    """NGiNX's addresses (those of ``keys``), and when starting (no ``keys``) those the other
    hosts reach this one on and the exporter's."""
    wanted = {**stack.listens(keys), **(stack.cluster_listens() if keys is None else {})}
    if stack.profile.metrics.listen is not None and (keys is None or "metrics.listen" in keys):
        wanted["metrics.listen"] = stack.profile.metrics.listen
    for key, listen in wanted.items():
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        with closing(socket.socket(family, socket.SOCK_STREAM)) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((listen.host, listen.port))
            except OSError as e:
                value = "PORT" if key.startswith("cluster.") else "HOST:PORT"
                flag = "--listen HOST:PORT" if key == "server.listen" else f"--set {key}={value}"
                raise StackError(
                    f"{key}: {listen} is not available ({e.strerror}); stop what holds it, "
                    f"or pick another address with {flag}"
                ) from None


def start(stack: Stack, timeout: float) -> Running:
    """Start circusd and return once the site and the websocket endpoint answer.

    If they do not within ``timeout``, everything started is stopped again and the error
    says which watcher failed, with its log.
    """
    drain.stop(stack.run_dir)  # a stack that starts takes visitors, whatever came before
    out = open(stack.log_dir / "circusd.out", "ab", opener=no_follow)  # noqa: SIM115
    env = {**os.environ, processes.MARKER: str(stack.run_dir)}
    proc = subprocess.Popen(
        [stack.programs.python, "-m", "stackctl.circusd", str(stack.circus_ini)],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=stack.run_dir,
        start_new_session=True,
    )
    out.close()
    running = Running(stack, proc)
    deadline = time.monotonic() + timeout

    watch = FailureWatch(stack)

    def alive() -> bool:
        return proc.poll() is None and not watch.failures()

    if all(wait_until(check, deadline, alive) for check in readiness_checks(stack)):
        return running
    why = "\n".join(watch.failures()) or (
        f"circusd exited with status {proc.returncode}:\n{log_tail(stack, 'circusd')}"
        if proc.poll() is not None
        else f"the site did not answer within {timeout:.0f} s; the workers' logs end with:\n"
        + "\n".join(f"{name}:\n{log_tail(stack, name)}" for name in ("wsgi", "ws"))
    )
    stop(stack, proc.pid)
    raise StackError(f"the stack did not start; nothing is left running.\n{why}")


# Front to back. NGiNX first, so that no request reaches a pool that is going away, with the
# realtime worker: it closes its websockets (1012), which NGiNX would otherwise wait for
# until it is killed (and with the dev code reload, which must reload nothing on the way
# out). Then the WSGI pool, once NGiNX is gone, and Redis last.


START_TIMEOUT = 60.0
"""Seconds `stackctl up` waits for the site and the websocket endpoint to answer."""


def stop_grace(profile: Profile) -> float:
    """How long one step of a stop may take: a worker's graceful timeout (the longest of the
    pool's and the background watchers'), and some slack."""
    return max(profile.wsgi.graceful_timeout, background.longest_graceful(profile.watchers)) + 5


def longest_stop(profile: Profile) -> float:
    """The most :func:`stop` can take: draining, each stage of STOP_ORDER, then circusd's
    own stop."""
    return profile.server.drain_seconds + (len(STOP_ORDER) + 1) * stop_grace(profile)


def stop(stack: Stack, pid: int | None = None, *, drain_first: bool = False) -> list[int]:
    """Stop the watchers gracefully, front first, then circusd; make sure nothing is left.
    ``drain_first``: a stack that serves says so to load balancers, and keeps serving for
    server.drain_seconds, before anything stops.

    Returns the pids that had to be killed after the graceful stop.
    """
    pid = pid or running_pid(stack)
    if pid is not None:
        if drain_first:
            drain_before_stop(stack)
        grace = stop_grace(stack.profile)
        stop_watchers_in_order(stack, grace)
        terminate_circusd(pid, grace)
    return clean_stale(stack)


def drain_before_stop(stack: Stack) -> None:
    with suppress(OSError, StackError):  # a run directory gone or broken: nothing to drain
        drain.start(stack.run_dir)
    if "nginx" in stack.watchers and stack.profile.server.drain_seconds:
        print(f"draining: health checks answer 503; stopping in "
              f"{stack.profile.server.drain_seconds} s", flush=True)  # fmt: skip
        time.sleep(stack.profile.server.drain_seconds)


def stop_watchers_in_order(stack: Stack, grace: float) -> None:
    """Circus, told to stop, stops every watcher at once: NGiNX would keep passing requests
    to pools that are gone, and they would wait until its own timeout, then fail. Here each
    stage is stopped, and waited for, before the next; circusd's own stop does what is left
    should circusd not answer."""
    try:
        running = call(stack, "status", timeout=5)["statuses"]
    except StackError:
        return
    # Whatever else circusd runs is a background watcher, even one the profile no longer has;
    # but not Circus's plugins (listed as "plugin:NAME"), which it stops last, by itself.
    own = [name for name in running
           if name not in (*WATCHERS, "autoreload") and not name.startswith("plugin:")]  # fmt: skip
    for stage in STOP_ORDER:
        names = [name for name in stage if name != BACKGROUND]
        names += own if BACKGROUND in stage else []
        names = [name for name in names if running.get(name) not in (None, "stopped")]
        if not names:
            continue
        pattern = "^(" + "|".join(names) + ")$"
        try:
            call(stack, "stop", timeout=grace, name=pattern, match="regex", waiting=True)
        except StackError:
            return


def terminate_circusd(pid: int, grace: float) -> None:
    """SIGTERM makes circusd stop every watcher with its own stop signal, then exit.

    circusd ignores a SIGTERM that arrives while it is still starting its watchers, so the
    signal is repeated until it takes.
    """
    deadline = time.monotonic() + grace
    try:
        proc = psutil.Process(pid)
        while time.monotonic() < deadline:
            proc.send_signal(signal.SIGTERM)
            # Exited is enough: once `stackctl up` has returned, circusd's parent is init,
            # which may take seconds to reap it.
            if not processes.wait_for_exit([proc], min(2.0, deadline - time.monotonic())):
                return
    except psutil.NoSuchProcess:
        return


def catch_stop_signals() -> list[int]:
    """From now on Ctrl-C, SIGTERM and SIGHUP are requests to stop the stack, listed in the
    result.

    Call it before telling the user that Ctrl-C stops the stack: one pressed right after
    reading that must not find Python's default handler still in place. SIGHUP comes when
    the terminal or ssh session closes: by default it killed stackctl alone, and circusd (in
    a session of its own) went on without it, undrained. Under nohup it stays ignored.
    """
    stop_requested: list[int] = []

    def request_stop(signum: int, _frame: Any) -> None:
        stop_requested.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, request_stop)
    return stop_requested


def wait_foreground(running: Running, stop_requested: list[int]) -> int:
    """``stackctl up`` in the foreground: wait for circusd, or for a stop request."""
    while running.process.poll() is None and not stop_requested:
        try:
            running.process.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
    if stop_requested:
        stop(running.stack, running.process.pid, drain_first=True)
        return 128 + stop_requested[0]
    stop(running.stack)
    return running.process.returncode or 0


# --- status ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    age: float
    cpu: float
    mem_rss: int


@dataclass(frozen=True)
class WatcherInfo:
    name: str
    state: str
    processes: list[ProcessInfo]
    failure: str | None
    """Why the watcher stopped by itself, when it did."""


def status(stack: Stack) -> list[WatcherInfo]:
    states = call(stack, "status")["statuses"]
    try:
        infos = call(stack, "stats")["infos"]
    except StackError:
        infos = {name: watcher_stats(stack, name) for name in states}
    result = []
    for name in dict.fromkeys((*WATCHERS, *stack.watchers)):
        if name not in states:
            continue
        procs = []
        for pid, info in sorted(infos.get(name, {}).items()):
            if not isinstance(info, dict) or pid == "name":
                continue
            procs.append(
                ProcessInfo(
                    int(pid), float(info.get("age", 0)), _number(info.get("cpu")), _rss(int(pid))
                )
            )
        stopped_itself = states[name] == "stopped" and failure_note(stack.run_dir, name).is_file()
        failure = failure_reason(stack, name) if stopped_itself else None
        result.append(WatcherInfo(name, states[name], procs, failure))
    return result


def watcher_stats(stack: Stack, name: str) -> dict[str, Any]:
    """Circus's stats of one watcher's processes. Circus fails them when one of its processes
    has a child that exited and was never waited for (a zombie: a program's sloppy
    subprocess, Redis's between its fork's exit and its wait): its pids and ages, then."""
    try:
        info: dict[str, Any] = call(stack, "stats", name=name)["info"]
        return info
    except StackError:
        pids = call(stack, "list", name=name).get("pids", [])
    return {str(pid): {"age": _age(int(pid))} for pid in pids}


def _age(pid: int) -> float:
    try:
        return max(0.0, time.time() - psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def health(stack: Stack) -> list[Check]:
    """Whether the stack serves, not only whether its processes exist: the site through
    NGiNX, Redis, and the realtime worker's subscription to it."""
    checks = []
    if "nginx" in stack.watchers:
        site = http_answers(stack)
        checks.append(
            Check("site", site, "answers" if site else f"GET / on {stack.url()} gets no answer")
        )
    if "wsgi" in stack.watchers and "nginx" not in stack.watchers:
        pool = pool_answers(stack)
        checks.append(Check("wsgi", pool, "answers" if pool else
                            f"no answer on {stack.wsgi_address}"))  # fmt: skip
    if cluster.needs_redis(stack.profile):
        checks.append(Check("redis", *redis_answers(stack)))
    if "ws" in stack.watchers:
        delivery = realtime_health(stack)
        checks.append(Check("realtime", delivery.ok, delivery.reason))
    return checks


def redis_password_option(stack: Stack) -> dict[str, Any]:
    """How stackctl itself (status, publish) gives Redis the password: the file the stack's
    workers read, or none, said outright (a broken profile must not be read to find out)."""
    from stackctl import realtime

    password_file = stack.shared_env().get(realtime.PASSWORD_FILE_VARIABLE)
    return {"password_file": password_file} if password_file else {"password": None}


def redis_answers(stack: Stack) -> tuple[bool, str]:
    import redis

    from stackctl import realtime

    # A redis host asks its own Redis; the others, the one the app's processes use.
    url = f"redis://{stack.redis_listen}/0" if stack.redis_listen else stack.redis_url
    client = realtime.connect(url, **redis_password_option(stack), socket_timeout=2,
                              socket_connect_timeout=2, retry=realtime.NO_RETRY)  # fmt: skip
    try:
        client.ping()
    except redis.RedisError as e:
        return False, f"does not answer ({type(e).__name__})"  # its text may hold the URL
    finally:
        client.close()
    return True, "answers"


def check_redis_password(stack: Stack) -> None:
    """An app host whose password the redis hosts refuse would start, then wait in vain for
    its websocket worker to deliver: say so before starting anything. Redis hosts that do not
    answer yet are no reason not to start (the workers keep trying until they do)."""
    import redis

    from stackctl import cluster, realtime

    if not (cluster.app_roles(stack.profile) and stack.profile.cluster.redis_hosts):
        return
    client = realtime.connect(stack.redis_url, **redis_password_option(stack), socket_timeout=2,
                              socket_connect_timeout=2, retry=realtime.NO_RETRY)  # fmt: skip
    try:
        client.ping()
    except redis.RedisError as e:
        if isinstance(e, redis.AuthenticationError) or "Authentication" in str(e):
            raise StackError(
                f"{stack.redis_password_file}: the redis hosts refuse this password; copy "
                "that file from the host where `stackctl secrets` made it (the same file on "
                "every host), then run `stackctl up` again"
            ) from None
    finally:
        client.close()


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _rss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0
