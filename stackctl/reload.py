"""Reloads that lose nothing.

A reload of the uWSGI pool first starts a *canary*: one worker on the new config, outside
Circus, on a scratch socket. It must load the app and answer a real request for the check
path no worse than the running workers do, or the reload is refused before anything is
touched. Then Circus's own reload replaces the workers, new ones ready before old ones retire
(:mod:`stackctl.circusd`; ``circusctl reload wsgi`` takes the same path, without the canary).
Each old worker is stopped by :mod:`stackctl.graceful`, which lets it finish its request
before it exits. The listening socket stays open in circusd throughout, so nothing is refused.
"""

from __future__ import annotations

import configparser
import fcntl
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import textwrap
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from stackctl import background, cluster, generation
from stackctl.errors import StackError
from stackctl.flapping import failure_note, has_exception, last_crash, log_tail
from stackctl.logfile import LIMITS_FILE
from stackctl.readiness import marked_since, ready_mark, startup_timeout
from stackctl.render import File
from stackctl.render.nginx import INCLUDES as NGINX_INCLUDES
from stackctl.render.nginx import RENDERED as NGINX_RENDERED
from stackctl.stack import Listen, Stack, open_connection
from stackctl.supervisor import ProcessInfo, call, failure_reason
from stackctl.supervisor import status as watchers_status
from stackctl.tls import leaf_der
from stackctl.users import as_service_user
from stackctl.watchers import WATCHERS

POLL = 0.05
NGINX_LISTEN_PATIENCE = 5.0
# NGiNX's old workers stop accepting once the HUP reaches them, within a second when idle;
# a busy machine may take longer, and waiting ends as soon as the new certificate is served.
CERTIFICATE_PATIENCE = 15.0
NGINX_FILES = {*NGINX_RENDERED, *NGINX_INCLUDES}
RELOAD_LOCK = "reload.lock"
ANSWER_LIMIT = 65536  # bytes of the check path's answer read: its status and a glimpse
CANARY_NICENESS = 10


def patience(stack: Stack) -> float:
    """How long a reload step may take: a worker's graceful stop, and then some to start."""
    return startup_timeout(stack.profile.wsgi.graceful_timeout)


def longest(stack: Stack) -> float:
    """The most `stackctl reload` waits: a trial worker and the replacement of every worker,
    once for a new config and once more for the watcher it names (or the app's code)."""
    return 2 * patience(stack) * (1 + max(stack.workers, 1))


def canary(stack: Stack, timeout: float, ini: Path | None = None) -> None:
    """Start one worker on ``ini`` (the running uWSGI config unless told), outside Circus;
    refuse the reload if it cannot serve."""
    # The canary runs the app's code: as the service user, writing only where it may.
    socket_path = stack.service_dir / f"canary-{os.getpid()}.sock"
    output = stack.log_dir / "wsgi-canary.log"
    with output.open("wb") as out:
        args = [stack.programs.uwsgi, "--ini", str(ini or stack.uwsgi_ini),
                "--uwsgi-socket", str(socket_path)]  # fmt: skip
        if stack.programs.setpriv:  # a reload killed midway must not leave its canary behind
            args = [stack.programs.setpriv, "--pdeathsig", "KILL", "--", *args]
        started = time.time()
        proc = subprocess.Popen(
            args, cwd=stack.stack_dir, env={**os.environ, **stack.worker_env()},
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            # A trial run: it must not take CPU from the workers serving meanwhile.
            preexec_fn=lambda: os.nice(CANARY_NICENESS), **as_service_user(stack),
        )  # fmt: skip
    mark = ready_mark(stack.run_dir, proc.pid)
    try:
        deadline = time.monotonic() + timeout
        while not marked_since(stack.run_dir, proc.pid, started):
            exited, late = proc.poll() is not None, time.monotonic() > deadline
            if exited or late:
                tail = "\n".join(output.read_text(errors="replace").splitlines()[-15:])
                how = "cannot start" if exited else f"did not load the app within {timeout:.0f} s"
                raise StackError(
                    f"the new uWSGI workers {how}, so the reload was refused; the running "
                    f"workers keep serving. A test worker said:\n{tail}"
                )
            time.sleep(POLL)
        compare_answers(stack, socket_path, deadline - time.monotonic())
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        mark.unlink(missing_ok=True)
        socket_path.unlink(missing_ok=True)


def compare_answers(stack: Stack, canary_socket: Path, timeout: float) -> None:
    """Refuse a canary that answers the check path with an error where the running workers
    do not: an app that imports but cannot serve (say, a Host its settings do not allow)."""
    path, host = stack.profile.wsgi.check_path, site_host(stack)
    try:
        new = uwsgi_get(canary_socket, path, host, timeout)
    except OSError as e:
        raise StackError(
            f"the new uWSGI workers did not answer GET {path} (Host: {host}): {e}; the reload "
            "was refused and the running workers keep serving"
        ) from None
    if new.status < 400:
        return
    try:
        old = uwsgi_get(stack.wsgi_address, path, host, timeout)
    except OSError:
        return  # no running worker answered: nothing to be worse than
    if old.status < 400:
        raise StackError(
            f"the new uWSGI workers answer GET {path} (Host: {host}) with {new.status_line}, "
            f"where the running ones answer {old.status_line}, so the reload was refused; the "
            f"running workers keep serving. The new answer began:\n"
            + textwrap.indent(new.body[:600].decode("utf-8", "replace"), "    ")
            + "\n(wsgi.check_path sets the path this check asks for.)"
        )


def site_host(stack: Stack) -> str:
    """The Host a real visitor would send: the first plain server name, else localhost."""
    for name in stack.profile.server.names.split():
        if name != "_" and "*" not in name and "~" not in name:
            return name
    return "localhost"


@dataclass(frozen=True)
class Answer:
    status: int
    status_line: str
    body: bytes


def uwsgi_get(address: Path | Listen, path: str, host: str, timeout: float) -> Answer:
    """GET ``path`` straight from a uWSGI socket, in the uwsgi protocol NGiNX speaks to it."""
    target = urllib.parse.urlsplit(path)
    variables = {
        "REQUEST_METHOD": "GET", "REQUEST_URI": path, "PATH_INFO": target.path,
        "QUERY_STRING": target.query, "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": host,
        "SERVER_NAME": host, "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1",
    }  # fmt: skip
    packet = b"".join(
        struct.pack("<H", len(k)) + k.encode() + struct.pack("<H", len(v.encode())) + v.encode()
        for k, v in variables.items()
    )
    with open_connection(address, max(timeout, 1.0)) as conn:
        conn.sendall(struct.pack("<BHB", 0, len(packet), 0) + packet)
        chunks: list[bytes] = []
        while (chunk := conn.recv(65536)) and sum(map(len, chunks)) < ANSWER_LIMIT:
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    match = re.match(r"HTTP/\S+ (\d{3})", status_line)
    if not match:
        raise OSError(f"{address} answered something that is not HTTP: {status_line!r}")
    return Answer(int(match.group(1)), status_line.split(" ", 1)[1], body)


@contextmanager
def one_at_a_time(stack: Stack) -> Iterator[None]:
    """Hold the stack's reload lock: two reloads at once would judge each other's workers."""
    lock = stack.run_dir / RELOAD_LOCK
    with lock.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise StackError(
                f"another `stackctl reload` of this stack is under way (pid {f.read().strip()}); "
                "run this one once it has finished"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def last_words(stack: Stack, wait: float = 2.0) -> str:
    """The traceback of a worker that died starting: circusd writes out what a dead process
    left in its pipe only when it gets to it, so give it a moment."""
    log = stack.log_dir / "wsgi.log"
    deadline = time.monotonic() + wait
    report = last_crash(log)
    while not has_exception(report.splitlines()) and time.monotonic() < deadline:
        time.sleep(POLL)
        report = last_crash(log)
    return textwrap.indent(report, "    ")


def replace_workers(stack: Stack, sequential: bool) -> int:
    """Replace every worker, ``1`` or all at a time, through Circus's own reload (made
    readiness-gated by :mod:`stackctl.circusd`); returns how many were replaced."""
    try:
        answer = call(stack, "reload", name="wsgi", sequential=sequential, waiting=True,
                      timeout=patience(stack) * max(stack.workers, 1))  # fmt: skip
    except StackError as e:
        raise StackError(
            f"{e}; the wsgi log says:\n{last_words(stack)}\n"
            "The reload was undone: the new workers were stopped, and the workers that were "
            "serving kept serving throughout."
        ) from None
    return len(answer["info"]["stopped"])


def reload_watcher(stack: Stack, watcher: str, sequential: bool) -> str:
    """Reload one watcher's processes; returns what was done."""
    timeout = patience(stack)
    if watcher not in WATCHERS:  # a background watcher: Circus waits for its old processes
        own = background.longest_graceful(w for w in stack.profile.watchers if w.name == watcher)
        timeout = max(timeout, startup_timeout(own))
        if restart_if_stopped(stack, watcher):
            return f"{watcher} had stopped after crashing; started it again"
    if watcher == "redis":
        restart_redis(stack)
        return "restarted redis"
    if watcher != "wsgi":
        call(stack, "reload", name=watcher, graceful=True, waiting=True, timeout=timeout)
        return f"reloaded {watcher}"
    # The canary imports the app as a worker would, and shows the traceback if it cannot.
    canary(stack, timeout=timeout)
    if restart_if_stopped(stack, "wsgi"):
        return "wsgi had stopped after crashing; started it again"
    replaced = replace_workers(stack, sequential=sequential)
    return f"reloaded wsgi: {replaced} workers replaced, each once its successor was ready"


BACKGROUND_SETTLE = 2.5
"""Seconds a background process must live to count as started: the flapping plugin's
min_uptime (2 s, circus.ini) and a margin."""
BACKGROUND_PATIENCE = 60.0
"""Seconds to wait for that: five crashes of a slow-starting program (and a busy machine)."""


def touched_background(stack: Stack, old_circus_ini: str, named: str | None) -> set[str]:
    """The background watchers a reload (re)started: those whose sections of circus.ini
    changed, and the one it was named."""
    changed = {section.split(":", 1)[-1] for section, _ in
               circus_differences(old_circus_ini, stack.circus_ini.read_text())}  # fmt: skip
    return {w.name for w in background.on_this_host(stack) if w.name in (*changed, named)}


def check_background_started(stack: Stack, names: set[str], since: float) -> None:
    """After a reload: each background watcher of ``names`` (re)started since ``since`` (a
    time.time()) lives through its first seconds, or the reload fails naming it and why.

    Circus retires the old processes whatever the new ones do, so a new command that cannot
    start would otherwise leave nothing doing the watcher's work, after a reload that said
    all was well.
    """
    wanted = {w.name: w.numprocesses for w in background.on_this_host(stack) if w.name in names}
    deadline = time.monotonic() + BACKGROUND_PATIENCE
    while wanted:
        for info in watchers_status(stack):
            if info.name not in wanted:
                continue
            note = failure_note(stack.run_dir, info.name)
            if info.state == "stopped" and note.is_file() and note.stat().st_mtime >= since:
                reason = failure_reason(stack, info.name)
                raise StackError(background_failed(stack, info.name, reason))
            if info.state == "stopped":
                del wanted[info.name]  # stopped before this reload, which left it so
            elif settled(info.processes, wanted[info.name], since):
                del wanted[info.name]
                # Running again: a stop of it later is not the crash of before.
                note.unlink(missing_ok=True)
        if not wanted:
            return
        if time.monotonic() > deadline:
            name = min(wanted)
            tail = log_tail(stack.log_dir / f"{name}.log", 10)
            raise StackError(background_failed(
                stack, name, f"keeps restarting; from its log:\n{textwrap.indent(tail, '    ')}"))
        time.sleep(POLL)


def settled(processes: list[ProcessInfo], count: int, since: float) -> bool:
    """All ``count`` processes run, each started before ``since`` or long enough ago."""
    now = time.time()
    return len(processes) >= count and all(
        now - p.age < since or p.age >= BACKGROUND_SETTLE for p in processes
    )


def background_failed(stack: Stack, name: str, reason: str) -> str:
    # The key, not its value: a command line may carry a password, and this may reach a log.
    key = f"{background.SECTION}.{name}.cmd"
    return (f"{stack.profile.source(key)}: {key}: {name} does not start, and none of its "
            "processes runs now (old ones, if any, were stopped). Fix it, then `stackctl "
            f"reload` (a changed profile) or `stackctl reload {name}` (a changed program) "
            f"starts it again. It {reason}")


def reload_nginx(stack: Stack, previous: list[File]) -> None:
    """HUP NGiNX onto its new config; if it cannot listen where that config says (NGiNX then
    keeps serving on its old config), put the old files back and say so."""
    call(stack, "signal", name="nginx", signum=int(signal.SIGHUP))
    deadline = time.monotonic() + NGINX_LISTEN_PATIENCE
    while not nginx_listens(stack):
        if time.monotonic() > deadline:
            for file in previous:
                put_back(stack.run_dir, file)
            call(stack, "signal", name="nginx", signum=int(signal.SIGHUP))
            raise StackError(
                f"NGiNX could not listen on {' and '.join(map(str, stack.listens().values()))}, "
                "so it kept its previous config and the site is served as before. NGiNX says:\n"
                + textwrap.indent(log_tail(stack.log_dir / "nginx.log", 3), "    ")
            )
        time.sleep(POLL)
    if stack.tls:
        wait_for_certificate(stack, time.monotonic() + CERTIFICATE_PATIENCE)


def wait_for_certificate(stack: Stack, deadline: float) -> None:
    """NGiNX's old workers answer new connections until the HUP reaches them: return once a
    new connection gets the certificate just rendered, so that what runs after the reload
    (certbot's deploy hook, a check) sees it."""
    assert stack.tls is not None
    wanted = leaf_der(stack.tls.certificate.read_bytes())
    address = (stack.local_host, stack.front.port)
    while time.monotonic() < deadline:
        try:
            served = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(address, timeout=2))
        except (OSError, ValueError):
            served = b""
        if served == wanted:
            return
        time.sleep(POLL)


def put_back(directory: Path, file: File) -> None:
    staged = directory / f".{file.name}.previous"
    staged.write_text(file.content)
    os.replace(staged, directory / file.name)


def nginx_listens(stack: Stack) -> bool:
    """The NGiNX master holds a listening socket on ``server.listen`` (and ``tls.listen``)."""
    return not unheld_listens(stack)


def unheld_listens(stack: Stack) -> list[str]:
    """The keys of the addresses the stack listens on that the NGiNX master does not hold."""
    keys = list(stack.listens())
    if not keys:
        return []  # a host without the front role runs no NGiNX
    try:
        (master,) = call(stack, "list", name="nginx")["pids"]
        sockets = psutil.Process(int(master)).net_connections(kind="inet")
    except (ValueError, psutil.Error):
        return keys
    listening = {(c.laddr.ip, c.laddr.port) for c in sockets if c.status == psutil.CONN_LISTEN}
    return [key for key in keys if not addresses(stack.listens()[key]) & listening]


def addresses(listen: Listen) -> set[tuple[str, int]]:
    return {(str(info[4][0]), listen.port) for info in socket.getaddrinfo(listen.host, listen.port)}


def restart_redis(stack: Stack) -> None:
    """Redis has nothing to reload: stop it, then start it (two at once would fight over its
    socket file). The websocket worker reconnects and replays what its clients missed."""
    call(stack, "restart", name="redis", waiting=True, timeout=patience(stack))


def restart_if_stopped(stack: Stack, watcher: str) -> bool:
    """Start a watcher the flapping plugin stopped; True if it had to."""
    # (Asked about one watcher, Circus puts its state where "ok" would be: ask about all.)
    if call(stack, "status")["statuses"].get(watcher) != "stopped":
        return False
    failure_note(stack.run_dir, watcher).unlink(missing_ok=True)
    call(stack, "start", name=watcher, waiting=True)
    return True


def circus_differences(old: str, new: str) -> set[tuple[str, str]]:
    """The (section, key) pairs that differ between two circus.ini texts."""
    parsed = []
    for text in (old, new):
        parser = configparser.RawConfigParser()
        parser.read_string(text)
        parsed.append({(s, k): v for s in parser.sections() for k, v in parser.items(s)})
    before, after = parsed
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def describe_differences(old: str, new: str, differences: set[tuple[str, str]]) -> list[str]:
    """What a reload of circus.ini changed, for the user: a watcher that comes or goes (a
    [watchers.NAME] added or removed) in a word rather than each of its options."""
    before, after = ({s.split(":", 1)[1] for s in sections(text) if s.startswith("watcher:")}
                     for text in (old, new))  # fmt: skip
    came, went = sorted(after - before), sorted(before - after)
    whole = {*came, *went}
    # (The flapping plugin's list of watchers to judge changes with them.)
    rest = sorted(f"{s} {k}" for s, k in differences if s.split(":", 1)[-1] not in whole
                  and not (whole and (s, k) == ("plugin:flapping", "also")))  # fmt: skip
    return [*(f"started {name}" for name in came), *(f"stopped {name}" for name in went), *rest]


def sections(text: str) -> list[str]:
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    return parser.sections()


SOCKET_PLACE = {"path", "host", "port", "family"}


def refuse_moved_sockets(differences: set[tuple[str, str]]) -> None:
    """A pool's socket that would move (another address, port or path): Circus 0.19 closes the
    old socket and then fails before binding the new one, so the pool would stop serving.
    Refused before anything is touched; only its allow list may change live."""
    moved = sorted({section.split(":", 1)[1] for section, key in differences
                    if section.startswith("socket:") and key in SOCKET_PLACE})  # fmt: skip
    if moved:
        raise StackError(
            f"the {' and '.join(moved)} pool would listen elsewhere (cluster.address, "
            "cluster.wsgi_port or cluster.ws_port changed): a reload cannot move a listening "
            "socket, so nothing was changed; run `stackctl down`, then `stackctl up`, on this "
            "host (the fronts send its requests to the other app hosts meanwhile)"
        )


def refuse_changed_roles(before: tuple[str, ...], stack: Stack) -> None:
    """Another set of roles (``before``: the running stack's) is other programs (NGiNX, the
    pools, Redis) to start or stop, with their sockets and ports to bind: `up`'s work, with its
    checks, not a reload's."""
    if tuple(before) != stack.profile.cluster.roles:
        raise StackError(
            f"{stack.profile.where('cluster.roles')}: the running stack has the roles "
            f"{', '.join(before)}; a reload does not start or stop parts of the stack, so "
            "nothing was changed; run `stackctl down`, then `stackctl up`, on this host"
        )


SHARED_REDIS_PLACE = ("cluster.redis_port", "cluster.sentinel_port", "cluster.master_name")


def refuse_moved_shared_redis(saved: dict[str, Any], stack: Stack) -> None:
    """A redis host's Redis or Sentinel on another port, or the primary under another name:
    the other redis hosts and the app hosts know them by the running ones, so this host alone
    would leave the cluster (and Sentinel would start over from the first of
    cluster.redis_hosts as the primary, whatever it learned since)."""
    if not cluster.runs_shared_redis(stack.profile):
        return
    moved = [key for key in SHARED_REDIS_PLACE if saved.get(key, stack.profile.value(key))
             != stack.profile.value(key)]  # fmt: skip
    if moved:
        raise StackError(
            f"{stack.profile.where(moved[0])}: the running one is {saved[moved[0]]!r}, and the "
            "other hosts know it so; a reload of one redis host cannot change it, so nothing "
            "was changed; change it in the profile of every host, then run `stackctl down` "
            "and `stackctl up` on each"
        )


def changed_files(stack: Stack, files: list[File]) -> set[str]:
    def current(name: str) -> str | None:
        path = stack.run_dir / name
        return path.read_text() if path.is_file() else None

    return {f.name for f in files if current(f.name) != f.content}


def apply_config(stack: Stack) -> list[str]:
    """Re-render for ``stack`` and apply only what changed; returns what was done.

    The new generation is validated before any file or process is touched, so a bad
    profile or config leaves the running stack exactly as it was.
    """
    files = generation.render_all(stack)
    changed = changed_files(stack, files)
    if not changed:
        return []
    new_circus = next(f.content for f in files if f.name == stack.circus_ini.name)
    old_circus = stack.circus_ini.read_text()
    differences = circus_differences(old_circus, new_circus)
    refuse_moved_sockets(differences)
    # Circus replaces the workers itself when their command line or environment changed.
    workers_adopt = any(section in ("watcher:wsgi", "env:wsgi") and key != "numprocesses"
                        for section, key in differences)  # fmt: skip
    timeout = patience(stack)
    nginx_before = [File(f.name, (stack.run_dir / f.name).read_text()) for f in files
                    if f.name in NGINX_FILES and (stack.run_dir / f.name).is_file()]  # fmt: skip

    def try_new_workers(staged: Path) -> None:
        # Before the swap: a uWSGI config its workers cannot start on must not reach the disk,
        # where Circus would give it to the next worker it respawns.
        if "uwsgi.ini" in changed or workers_adopt:
            canary(stack, timeout, ini=staged / stack.uwsgi_ini.name)

    generation.write(stack, files, trial=try_new_workers)
    done = []
    if differences == {("watcher:wsgi", "numprocesses")}:
        call(stack, "set", name="wsgi", options={"numprocesses": stack.workers}, waiting=True,
             timeout=timeout)  # fmt: skip
        done.append(f"wsgi now runs {stack.workers} workers")
    elif differences:
        # A background watcher whose command changed is stopped, its tasks finishing, first.
        longest = startup_timeout(background.longest_graceful(stack.profile.watchers))
        call(stack, "reloadconfig", waiting=True,
             timeout=max(timeout * max(stack.workers, 1), longest))  # fmt: skip
        done.append("Circus reloaded its config: "
                    + ", ".join(describe_differences(old_circus, new_circus, differences)))
    if changed & NGINX_FILES:
        reload_nginx(stack, nginx_before)
        done.append("NGiNX reloaded its config (HUP)")
    if "uwsgi.ini" in changed and not workers_adopt:
        done.append(f"wsgi: {replace_workers(stack, sequential=False)} workers replaced")
    if "redis.conf" in changed:
        restart_redis(stack)
        done.append("Redis restarted")
    if "sentinel.conf" in changed:
        call(stack, "restart", name="sentinel", waiting=True, timeout=timeout)
        done.append("Sentinel restarted on its new settings")
    if LIMITS_FILE in changed:
        logs = stack.profile.logs
        done.append(f"logs now rotate at {logs.max_mb} MiB, {logs.keep} kept (nothing restarted)")
    return done
