"""The Circus config: the sockets circusd holds and the four watchers it supervises."""

from __future__ import annotations

import shlex

from stackctl.logfile import LIMITS_FILE, MIB, limits_json
from stackctl.render import File, render_template
from stackctl.stack import Stack
from stackctl.watchers import WATCHERS


def log_files(stack: Stack) -> dict[str, str]:
    return {name: str(stack.log_dir / f"{name}.log") for name in WATCHERS}


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
    # KILL: a uWSGI worker still loading the app when circusd dies (a reload under way) takes
    # SIGTERM for a reload of its own and lives on, orphaned, holding the socket.
    args = tied_to_circusd(stack, [stack.programs.uwsgi, "--ini", str(stack.uwsgi_ini)], "KILL")
    return shlex.join(args) + " --uwsgi-socket fd://$(circus.sockets.wsgi)"


def ws_command(stack: Stack) -> str:
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
    return shlex.join(tied_to_circusd(stack, args)) + " --fd $(circus.sockets.ws)"


def nginx_command(stack: Stack) -> str:
    args = [stack.programs.nginx, "-p", str(stack.run_dir), "-c", str(stack.nginx_conf),
            "-e", str(stack.nginx_error_log)]  # fmt: skip
    return shlex.join(tied_to_circusd(stack, args))


def redis_command(stack: Stack) -> str:
    if stack.programs.redis_server is None or not stack.embedded_redis:
        return ""
    return shlex.join(tied_to_circusd(stack, [stack.programs.redis_server, str(stack.redis_conf)]))


def autoreload_command(stack: Stack) -> str:
    if not stack.profile.wsgi.autoreload:
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
        wsgi_socket=stack.wsgi_socket,
        ws_socket=stack.ws_socket,
        backlog=stack.profile.wsgi.backlog,
        socket_umask=SOCKET_UMASK,  # Circus reads it as a decimal number
        run_as=run_as(stack),
        redis_cmd=redis_command(stack),
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
        workers=stack.workers,
        graceful_timeout=stack.profile.wsgi.graceful_timeout,
        worker_env=stack.worker_env(),
        ws_env=stack.shared_env(),
    )
    logs = stack.profile.logs
    return [
        File(stack.circus_ini.name, content),
        File(LIMITS_FILE, limits_json(logs.max_mb * MIB, logs.keep)),
    ]
