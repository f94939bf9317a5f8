"""The Circus config: the sockets circusd holds and the watchers it supervises (those of this
host's roles)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from stackctl import background, cluster
from stackctl.logfile import LIMITS_FILE, MIB, limits_json
from stackctl.realtime import PASSWORD_FILE_VARIABLE, REDIS_URL_VARIABLE
from stackctl.render import File, render_template
from stackctl.settings import Listen
from stackctl.stack import Stack
from stackctl.watchers import WATCHERS
from stackctl.workerstats import STATS_DIR_VARIABLE


def log_files(stack: Stack) -> dict[str, str]:
    return {name: str(stack.log_dir / f"{name}.log") for name in (*WATCHERS, *stack.watchers)}


def tied_to_circusd(stack: Stack, args: list[str], signal: str = "TERM") -> list[str]:
    """Make the program die with circusd: if circusd is killed, its children get ``signal``.

    Without this, master-less uWSGI processes whose log pipe is gone have been seen spinning
    on SIGPIPE. The parent-death signal survives exec, so Circus still watches the program's
    own pid.
    """
    if stack.programs.setpriv is None:
        return args
    return [stack.programs.setpriv, "--pdeathsig", signal, "--", *args]


def wsgi_command(stack: Stack) -> str:
    if "wsgi" not in stack.watchers:
        return ""
    # KILL: a uWSGI worker still loading the app when circusd dies (a reload under way) takes
    # SIGTERM for a reload of its own and lives on, orphaned, holding the socket.
    args = tied_to_circusd(stack, [stack.programs.uwsgi, "--ini", str(stack.uwsgi_ini)], "KILL")
    return shlex.join(args) + " --uwsgi-socket fd://$(circus.sockets.wsgi)"


def ws_command(stack: Stack) -> str:
    if "ws" not in stack.watchers:
        return ""
    profile = stack.profile
    ws = profile.ws
    args = [stack.programs.python, "-m", "stackctl.ws", "--prefix", ws.prefix,
            "--sse-prefix", ws.sse_prefix, "--poll-prefix", ws.poll_prefix,
            "--graceful-timeout", str(profile.wsgi.graceful_timeout),
            "--ping-interval", str(ws.ping_interval), "--max-message", str(ws.max_message),
            "--max-connections", str(ws.max_connections),
            "--queue-limit", str(ws.queue_limit),
            "--token-max-age", str(ws.token_max_age)]  # fmt: skip
    args += [f"--allowed-origin={origin}" for origin in ws.allowed_origins]
    args += [f"--client-publish={pattern}" for pattern in ws.client_publish]
    if "metrics" in stack.watchers:
        args += ["--metrics-socket", str(stack.ws_metrics_socket)]
    return shlex.join(tied_to_circusd(stack, args)) + " --fd $(circus.sockets.ws)"


def nginx_command(stack: Stack) -> str:
    if "nginx" not in stack.watchers:
        return ""
    args = [stack.programs.nginx, "-p", str(stack.run_dir), "-c", str(stack.nginx_conf),
            "-e", str(stack.nginx_error_log)]  # fmt: skip
    return shlex.join(tied_to_circusd(stack, args))


def redis_command(stack: Stack) -> str:
    if stack.programs.redis_server is None or not stack.embedded_redis:
        return ""
    if stack.shared_redis:
        return seeded_command(stack, "redis", stack.redis_conf)
    return shlex.join(tied_to_circusd(stack, [stack.programs.redis_server, str(stack.redis_conf)]))


def sentinel_command(stack: Stack) -> str:
    if stack.programs.redis_server is None or not stack.runs_sentinel:
        return ""
    return seeded_command(stack, "sentinel", stack.sentinel_conf)


def seeded_command(stack: Stack, kind: str, seed: Path) -> str:
    """A redis host's Redis or Sentinel, started on a config of its own made from ``seed``."""
    assert stack.programs.redis_server is not None
    args = [stack.programs.python, "-m", "stackctl.seed", "--kind", kind, "--seed", str(seed),
            "--conf", str(stack.own_conf(kind)), "--password-file", str(stack.redis_password_file),
            "--", stack.programs.redis_server]  # fmt: skip
    return shlex.join(tied_to_circusd(stack, args))


def metrics_command(stack: Stack) -> str:
    """The Prometheus exporter, with where each of this host's sources is."""
    listen = stack.profile.metrics.listen
    if listen is None:
        return ""
    # As autoreload: circusd's user (it asks circusd's control socket), -I, -u.
    args = [stack.programs.python, "-I", "-u", "-m", "stackctl.metrics", "--listen", str(listen),
            "--endpoint", stack.circus_endpoint, "--pubsub", stack.circus_pubsub]  # fmt: skip
    for name in stack.watchers:
        args += ["--watcher", name]
    if "nginx" in stack.watchers:
        args += ["--access-log", str(stack.nginx_access_log), "--front",
                 f"{stack.local_host}:{stack.front.port}"]  # fmt: skip
    if "wsgi" in stack.watchers:
        args += ["--wsgi-stats", str(stack.wsgi_stats_dir)]
    if "ws" in stack.watchers:
        args += ["--ws-socket", str(stack.ws_metrics_socket)]
    if cluster.needs_redis(stack.profile):
        args += ["--redis"]  # the one metrics_env names
    return shlex.join(tied_to_circusd(stack, args))


def metrics_env(stack: Stack) -> dict[str, str]:
    """The exporter's Redis. In its environment, not on its command line, which every user
    may read (ps): redis.url may hold a password. A redis host asks its own Redis; the
    others, the one the app's processes use."""
    if stack.profile.metrics.listen is None or not cluster.needs_redis(stack.profile):
        return {}
    env = {REDIS_URL_VARIABLE: f"redis://{stack.redis_listen}/0" if stack.redis_listen
           else stack.redis_url}  # fmt: skip
    password_file = stack.shared_env().get(PASSWORD_FILE_VARIABLE)
    if password_file:
        env[PASSWORD_FILE_VARIABLE] = password_file
    return env


def wsgi_env(stack: Stack) -> dict[str, str]:
    """The pool's environment; with metrics on, where each worker keeps its numbers."""
    env = stack.worker_env()
    if "metrics" in stack.watchers:
        env[STATS_DIR_VARIABLE] = str(stack.wsgi_stats_dir)
    return env


def autoreload_command(stack: Stack) -> str:
    if not stack.profile.wsgi.autoreload or "wsgi" not in stack.watchers:
        return ""
    # It runs as root, in the stack directory, with PYTHONPATH naming it (as every watcher):
    # -I keeps both off sys.path, so that no module of the app's is imported in place of the
    # standard library's; -u, as PYTHONUNBUFFERED (ignored by -I) did.
    args = [stack.programs.python, "-I", "-u", "-m", "stackctl.autoreload", str(stack.stack_dir),
            "--endpoint", stack.circus_endpoint,
            "--ignore", str(stack.run_dir), "--ignore", str(stack.log_dir)]  # fmt: skip
    return shlex.join(tied_to_circusd(stack, args))


SOCKET_UMASK = 0o117
"""The sockets circusd binds for the pools: rw for their owner and group, nothing for others."""


WS_BACKLOG = 2048
"""The websocket worker accepts as fast as it can; the pool's backlog is wsgi.backlog."""


def socket_options(stack: Stack, address: Path | Listen, backlog: int) -> dict[str, Any]:
    if isinstance(address, Path):
        return {"path": address, "backlog": backlog, "umask": SOCKET_UMASK, "replace": True}
    options: dict[str, Any] = {"host": address.host, "port": address.port, "backlog": backlog}
    if ":" in address.host:
        options["family"] = "AF_INET6"
    # And this host itself: stackctl's own checks (up, status, reload) connect from it.
    options["stackctl_allow"] = " ".join([*stack.profile.cluster.front_hosts, address.host])
    return options


def sockets(stack: Stack) -> list[dict[str, Any]]:
    """The listening sockets of this host's pools, for circusd to bind."""
    found = []
    if "wsgi" in stack.watchers:
        options = socket_options(stack, stack.wsgi_address, stack.profile.wsgi.backlog)
        found.append({"name": "wsgi", "options": options})
    if "ws" in stack.watchers:
        options = socket_options(stack, stack.ws_address, WS_BACKLOG)
        found.append({"name": "ws", "options": options})
    return found


def run_as(stack: Stack) -> dict[str, int]:
    """Circus's uid and gid options for the watchers that run the app's code and data."""
    if not stack.switches_user:
        return {}
    return {"uid": stack.user.uid, "gid": stack.user.gid}


def render(stack: Stack) -> list[File]:
    content = render_template(
        "circus.ini.j2",
        profile=stack.profile.name,
        endpoint=stack.circus_endpoint,
        pubsub_endpoint=stack.circus_pubsub,
        pidfile=stack.circus_pidfile,
        circus_log=stack.log_dir / "circusd.log",
        sockets=sockets(stack),
        run_as=run_as(stack),
        redis_cmd=redis_command(stack),
        sentinel_cmd=sentinel_command(stack),
        run_dir=stack.run_dir,
        log_dir=stack.log_dir,
        stack_dir=stack.stack_dir,
        logs=log_files(stack),
        log_limits=stack.run_dir / LIMITS_FILE,
        nginx_access_log=stack.nginx_access_log,
        nginx_error_log=stack.nginx_error_log,
        wsgi_cmd=wsgi_command(stack),
        ws_cmd=ws_command(stack),
        nginx_cmd=nginx_command(stack),
        autoreload_cmd=autoreload_command(stack),
        metrics_cmd=metrics_command(stack),
        metrics_env=metrics_env(stack),
        workers=stack.workers,
        graceful_timeout=stack.profile.wsgi.graceful_timeout,
        worker_env=wsgi_env(stack),
        ws_env=stack.shared_env(),
        background=background.circus_sections(stack),
        # Commas: Circus passes a plugin its options on a command line that it splits at spaces.
        judged_too=",".join(w.name for w in background.on_this_host(stack)),
    )
    logs = stack.profile.logs
    return [
        File(stack.circus_ini.name, content),
        File(LIMITS_FILE, limits_json(logs.max_mb * MIB, logs.keep)),
    ]
