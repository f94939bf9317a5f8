"""Shared pieces of the benchmarks: wrk runs, peers started by hand, readiness, cleanup.

Every server runs on 127.0.0.1 or a unix socket in a temp dir, and every process started here
is stopped by pid when its block ends, whatever happens inside it.
"""

from __future__ import annotations

import http.client
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

APPS = """
import time

def hello(environ, start_response):
    body = b"Hello, world!\\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

def sleepy(environ, start_response):
    time.sleep(0.020)
    return hello(environ, start_response)
"""

NGINX_CONF = """
daemon off;
worker_processes auto;
{user}
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log {run}/nginx-access.log;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    uwsgi_temp_path {run}/uwsgi;
    fastcgi_temp_path {run}/fastcgi;
    scgi_temp_path {run}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            {location}
        }}
    }}
}}
"""


@dataclass(frozen=True)
class Result:
    name: str
    rps: float
    p99_ms: float
    requests: int
    errors: int
    error_kinds: str = ""
    """wrk's own words for the errors, e.g. "read 3, non-2xx 1"."""


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


# When wrk stops, the requests it abandoned are still queued at the server (NGiNX closed its
# side, but the app only finds out after doing the work), so a run started at once would
# begin behind them: with 64 connections and a 20 ms app, 4 % of the next 8 s run.
SETTLE_SECONDS = 1.0


def wrk(
    name: str,
    url: str,
    connections: int,
    seconds: int,
    threads: int = 2,
    headers: tuple[str, ...] = (),
) -> Result:
    """``headers``: request headers as "Name: value" (wrk sends no Accept-Encoding itself)."""
    out = subprocess.run(
        [
            "wrk",
            *(arg for header in headers for arg in ("-H", header)),
            "--latency",
            "-t",
            str(min(threads, connections)),
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--timeout",
            "10s",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not (p99 and total and rps):
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    time.sleep(SETTLE_SECONDS)
    kinds = {kind: int(n) for kind, n in re.findall(r"(connect|read|write|timeout) (\d+)", out)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    kinds["non-2xx"] = int(non2xx.group(1)) if non2xx else 0
    described = ", ".join(f"{kind} {n}" for kind, n in kinds.items() if n)
    return Result(name, float(rps.group(1)), _ms(*p99.groups()), int(total.group(1)),
                  sum(kinds.values()), described)  # fmt: skip


def wait_http(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/")
            # A redirect answers too: with TLS on, server.listen sends every visitor to https.
            if conn.getresponse().status in (200, 301):
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered 200 on port {port} within {timeout} s")


def wait_tcp(port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with closing(socket.socket()) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing accepted connections on port {port} within {timeout} s")


@contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="scb", dir="/tmp"))
    (path / "bench_apps.py").write_text(APPS)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def started(
    *commands: list[str], cwd: Path, env: dict[str, str] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Run the commands in the background; stop them (and their process groups) on exit."""
    procs = []
    try:
        for command in commands:
            procs.append(
                subprocess.Popen(
                    command,
                    cwd=cwd,
                    env={**os.environ, **(env or {})},
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=(cwd / f"{Path(command[0]).name}.err").open("ab"),
                )
            )
        yield procs
    finally:
        for proc in reversed(procs):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def nginx_command(run: Path, port: int, location: str) -> list[str]:
    conf = run / f"nginx-{port}.conf"
    # As root, NGiNX workers would run as "nobody", who cannot reach sockets in the 0700 temp dir.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(run=run, port=port, location=location, user=user))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return [nginx, "-p", str(run), "-c", str(conf), "-e", str(run / "nginx-error.log")]


APP_AS_ROOT: tuple[str, ...] = ("--set", "server.user=root") if os.geteuid() == 0 else ()
"""The benchmarks' sites are root's, in temporary directories: say that their apps run as root
(stackctl refuses it unless told)."""


@dataclass(frozen=True)
class Server:
    port: int
    backend_pids: list[int]
    """The pids of the programs behind NGiNX (a uWSGI or gunicorn master, say)."""
    stack_dir: Path | None = None
    """For a stackctl stack: where to run stackctl commands."""


@contextmanager
def behind_nginx(run: Path, location: str, *backends: list[str]) -> Iterator[Server]:
    """Start the backends, then NGiNX in front with ``location``."""
    port = free_port()
    with started(*backends, nginx_command(run, port, location), cwd=run) as procs:
        wait_http(port)
        yield Server(port, [p.pid for p in procs[: len(backends)]])


def nginx_alone(run: Path) -> AbstractContextManager[Server]:
    """The ceiling: NGiNX answering every request itself."""
    return behind_nginx(run, 'return 200 "Hello, world!\\n";')


def nginx_uwsgi(run: Path, app: str, processes: int) -> AbstractContextManager[Server]:
    """The hand-written setup: NGiNX -> unix socket -> uWSGI with a master."""
    sock = run / f"uwsgi-{app}.sock"
    # Temp paths hold no spaces, so plain splitting is safe here.
    uwsgi = f"""{_program("uwsgi")} --master --processes {processes} --socket {sock}
        --listen 1024 --module bench_apps:{app} --chdir {run} --home {sys.prefix}
        --disable-logging --die-on-term""".split()
    return behind_nginx(run, f"include {_uwsgi_params(run)}; uwsgi_pass unix:{sock};", uwsgi)


def nginx_gunicorn(run: Path, app: str, workers: int) -> AbstractContextManager[Server]:
    """NGiNX -> unix socket -> gunicorn with the same number of sync workers."""
    sock = run / f"gunicorn-{app}.sock"
    gunicorn = f"""{_program("gunicorn")} --workers {workers} --worker-class sync
        --bind unix:{sock} --backlog 1024 bench_apps:{app}""".split()
    location = f"proxy_pass http://unix:{sock}; proxy_set_header Host $host;"
    return behind_nginx(run, location, gunicorn)


CIRCUS_INI = """
[circus]
endpoint = ipc://{run}/circus.sock
pubsub_endpoint = ipc://{run}/circus-pubsub.sock
check_delay = 0.25

[socket:web]
path = {run}/circus-web.sock
backlog = 1024

[watcher:web]
cmd = {uwsgi} --uwsgi-socket fd://$(circus.sockets.web) --disable-logging {app_options}
use_sockets = True
numprocesses = {processes}
"""


def nginx_circus_uwsgi(run: Path, app: str, processes: int) -> AbstractContextManager[Server]:
    """Circus holding the socket for master-less uWSGI workers, every other setting Circus's
    default: among them the stop signal, SIGTERM."""
    app_options = f"--module bench_apps:{app} --chdir {run} --home {sys.prefix}"
    ini = CIRCUS_INI.format(run=run, processes=processes, uwsgi=_program("uwsgi"),
                            app_options=app_options)  # fmt: skip
    (run / "circus.ini").write_text(ini)
    circusd = [_program("circusd"), str(run / "circus.ini")]
    location = f"include {_uwsgi_params(run)}; uwsgi_pass unix:{run}/circus-web.sock;"
    return behind_nginx(run, location, circusd)


def circusctl(run: Path, *args: str) -> None:
    subprocess.run([_program("circusctl"), "--endpoint", f"ipc://{run}/circus.sock", *args],
                   check=True, capture_output=True)  # fmt: skip


@contextmanager
def stackctl_stack(
    run: Path,
    app: str,
    workers: int,
    *options: str,
    static: dict[str, bytes] | None = None,
    apps: str = APPS,
) -> Iterator[Server]:
    """The product: `stackctl up --detach` on the same app, stopped with `stackctl down`.
    ``static``: files (path -> content) of a static directory to serve, if any; ``apps``:
    the source of the bench_apps module, whose callable ``app`` is served."""
    site = Path(tempfile.mkdtemp(prefix=f"site-{app}-", dir=run))
    (site / "bench_apps.py").write_text(apps)
    for name, content in (static or {}).items():
        (site / "static" / name).parent.mkdir(parents=True, exist_ok=True)
        (site / "static" / name).write_bytes(content)
    port = free_port()
    stackctl = [sys.executable, "-m", "stackctl"]
    subprocess.run(
        [*stackctl, "init", "--app", f"bench_apps:{app}"], cwd=site, check=True, capture_output=True
    )
    subprocess.run(
        [
            *stackctl,
            "up",
            "--detach",
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--profile",
            "prod",
            # The exporter on a free port: its default one is the machine's.
            *(() if any("metrics.listen" in o for o in options) else
              ("--set", f"metrics.listen=127.0.0.1:{free_port()}")),
            *options,
            *APP_AS_ROOT,
        ],
        cwd=site,
        check=True,
        capture_output=True,
    )
    try:
        wait_http(port)
        yield Server(port, [], site)
    finally:
        subprocess.run([*stackctl, "down"], cwd=site, capture_output=True)


def _program(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _uwsgi_params(run: Path) -> Path:
    """The peers' uwsgi_params: stackctl's, less the lines that name variables only
    stackctl's own NGiNX config defines (NGiNX refuses to start on an unknown variable)."""
    from stackctl import resources

    shipped = (resources.templates_dir() / "nginx" / "uwsgi_params").read_text()
    params = run / "peer_uwsgi_params"
    params.write_text("".join(line for line in shipped.splitlines(keepends=True)
                              if "$stackctl_" not in line))  # fmt: skip
    return params
