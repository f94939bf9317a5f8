"""stackctl runs a Python web app the production way: NGiNX in front of a pool of uWSGI
workers, a websocket worker and Redis, all supervised by Circus."""

from __future__ import annotations

import argparse
import configparser
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stackctl import background, drain, generation, profile, realtime, service, supervisor, users
from stackctl.errors import EXIT_STACK_ERROR, StackError
from stackctl.follow import Follower
from stackctl.settings import BY_KEY, SETTINGS
from stackctl.stack import NO_PROGRAMS, Stack, check_port_allowed, plan
from stackctl.watchers import LOGS, WATCHERS

STATE_FILE = "state.json"
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command ended by SIGPIPE
EXIT_INTERRUPTED = 128 + 2  # and for one ended by Ctrl-C (SIGINT)
EXIT_UNHEALTHY = 1  # `stackctl status`: every process may run, and the site not work


# --- from arguments to a Stack -----------------------------------------------------------------


def overrides_from(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """``--set`` pairs and the flags derived from SETTINGS, later ones winning."""
    return [profile.parse_override(text) for text in override_texts(args)]


def override_texts(args: argparse.Namespace) -> list[str]:
    """The same as ``KEY=VALUE`` texts, as ``--set`` takes them."""
    texts = list(args.set or ())
    for setting in SETTINGS:
        if setting.flag:
            value = getattr(args, flag_dest(setting.flag), None)
            if value is not None:
                texts.append(f"{setting.key}={value}")
    return texts


def flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def load_stack(args: argparse.Namespace, *, programs: bool, writes: bool = True) -> Stack:
    chosen = profile.load(args.stack, args.profile, overrides_from(args))
    stack = plan(chosen, None if programs else NO_PROGRAMS, writes=writes)
    check_run_dir_owner(stack)
    return stack


def run_dir_owner(stack: Stack) -> Path | None:
    """The stack directory of the stack running from ``stack.run_dir``, if one is: as its
    state file records it, or (a state file from an older stackctl) its circus.ini."""
    if supervisor.running_pid(stack) is None:
        return None
    try:
        owner = json.loads((stack.run_dir / STATE_FILE).read_text()).get("stack_dir")
        if owner:
            return Path(owner)
    except (OSError, ValueError):
        pass
    ini = configparser.RawConfigParser()
    try:
        ini.read_string(stack.circus_ini.read_text())
        return Path(ini.get("watcher:wsgi", "working_dir"))
    except (OSError, configparser.Error):
        return None


def check_run_dir_owner(stack: Stack) -> None:
    """Two stacks sharing a run directory overwrite each other's configs and sockets, and
    `down` in one stops the other: refuse a run directory that another running stack uses."""
    owner = run_dir_owner(stack)
    if owner is None or owner.resolve() == stack.stack_dir:
        return
    raise StackError(
        f"{stack.profile.source('paths.run_dir')}: paths.run_dir: "
        f"{stack.profile.paths.run_dir!r} resolves to {stack.run_dir}, which the stack running "
        f"in {owner} uses (circusd pid {supervisor.running_pid(stack)}); this stack would "
        "overwrite its configs. Give each stack its own run directory (the default, "
        '".stackctl/run", is inside the stack directory)'
    )


def load_running_stack(
    args: argparse.Namespace, *, writes: bool = True, as_saved: bool = False
) -> Stack:
    """The stack as ``up`` started it (its recorded profile and command-line overrides), to
    find its files and sockets; the programs are not looked up.

    ``as_saved``: for what only stops or looks at the running stack (down, status, logs), a
    profile edited into something invalid since is said, and the settings the stack was
    started with are used instead: a typo in stack.toml must not keep a stack from stopping.
    """
    try:
        return load_as_started(args, writes)
    except StackError as problem:
        saved = saved_stack(args, writes) if as_saved else None
        if saved is None:
            raise
        print(f"stackctl: {problem}\n(using {profile.SAVED})", file=sys.stderr)
        return saved


def load_as_started(args: argparse.Namespace, writes: bool) -> Stack:
    guess = load_stack(args, programs=False, writes=writes)
    state_path = guess.run_dir / STATE_FILE
    try:
        if not state_path.is_file():
            return guess
        state = json.loads(state_path.read_text())
    except PermissionError:  # another user's stack
        raise StackError(f"{state_path}: not readable by this user; run stackctl as the "
                         "user who started the stack (or root)") from None  # fmt: skip
    chosen = profile.load(args.stack, state["profile"], [tuple(p) for p in state["overrides"]])
    return plan(chosen, NO_PROGRAMS, writes=writes)


def saved_stack(args: argparse.Namespace, writes: bool) -> Stack | None:
    """The running stack from the settings ``up`` saved, when its run directory is the
    default one (the profile that would say otherwise cannot be read)."""
    stack_dir = Path(args.stack).resolve()
    state_path = stack_dir / BY_KEY["paths.run_dir"].default / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
        values = state["settings"]
    except (OSError, ValueError, KeyError):
        return None
    if state.get("stack_dir") != str(stack_dir):
        return None  # another stack's run directory: its settings are not this stack's
    try:
        saved = profile.from_saved_values(stack_dir, state["profile"], values)
        return plan(saved, NO_PROGRAMS, writes=writes)
    except StackError:  # saved by an older stackctl, whose checks were not as strict
        return None


def save_state(stack: Stack, overrides: list[tuple[str, Any]]) -> None:
    state = {
        "profile": stack.profile.name,
        "overrides": overrides,
        "stack_dir": str(stack.stack_dir),  # whose run directory this is
        "settings": profile.saved_values(stack.profile),
    }
    with (stack.run_dir / STATE_FILE).open("w") as f:
        # The service user's group may read it, as it may the configs (`stackctl status`).
        realtime.share(f.fileno(), stack.file_mode, stack.shared_gid)
        f.write(json.dumps(state))


# --- commands ------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from stackctl.init import init

    directory = Path(args.directory or args.stack).resolve()
    facts = init(directory, demo=args.demo, app=args.app, force=args.force)
    print(f"wrote {directory / profile.STACK_FILE} (app {facts.wsgi})")
    for note in facts.notes:
        print(f"note: {note}")
    if os.geteuid() == 0 and directory.stat().st_uid == 0:
        print(
            "note: root owns this directory, and stackctl does not run an app as root unless "
            'told: set server.user = "myapp" (a user of its own) in a profile only root can '
            "change, or on the command line (see the README's \"Running as root\")"
        )
    print(f"next: cd {shlex.quote(str(directory))} && stackctl up")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    stack = load_stack(args, programs=True)
    files = generation.render_all(stack)
    target = Path(args.out).resolve() if args.out else stack.run_dir
    generation.write(stack, files, target)
    print(f"profile {stack.profile.name} ({stack.profile.reason})")
    for file in files:
        print(f"wrote {target / file.name}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    notify_socket = service.take_notify_socket()
    stack = load_stack(args, programs=True)
    print(f"profile {stack.profile.name} ({stack.profile.reason})")
    running_pid = supervisor.running_pid(stack)
    if running_pid:
        raise StackError(
            f"a stack is already running in {stack.stack_dir} (circusd pid {running_pid}); "
            "use `stackctl reload` or `stackctl down`"
        )
    users.check_stack_dir_kept(stack)  # before root removes or writes anything there
    stale = supervisor.clean_stale(stack) if stack.run_dir.is_dir() else []
    if stale:
        print(f"cleaned up after a stack that died: stopped pids {stale}")
    check_port_allowed(stack)
    supervisor.check_port_free(stack)
    # Everything the stack creates from here on (logs, pid files, sockets) is the stack
    # user's alone; the processes circusd starts inherit this.
    os.umask(0o077)
    show_deploy_checks(stack)
    for line in background.missing_programs(stack):
        print(f"note: {line}")
    generation.write(stack, generation.render_all(stack))
    supervisor.check_redis_password(stack)
    print_compression(stack)
    save_state(stack, overrides_from(args))
    # SIGTERM while the stack starts (systemd stopping a unit still starting, a `kill`) stops
    # what has started, as Ctrl-C does; left to Python's default, it would end this process
    # alone and leave the stack running without it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    since = time.time()
    try:
        running = supervisor.start(stack, timeout=args.timeout)
    except KeyboardInterrupt:
        # Ctrl-C while the stack starts: what had started must not outlive this command.
        supervisor.stop(stack)
        print("interrupted while starting; stack stopped")
        return EXIT_INTERRUPTED
    for line in what_runs(stack):
        print(line)
    warn_background_not_started(stack, since)
    print(f"logs in {stack.log_dir}")
    if stack.profile.metrics.listen is not None:
        print(f"metrics on http://{stack.profile.metrics.listen}/metrics (`stackctl top`)")
    if args.detach:
        print(f'circusd pid {running.process.pid}; `eval "$(stackctl env)"` then circusctl works')
        return 0
    stop_requested = supervisor.catch_stop_signals()
    print("Ctrl-C stops the stack", flush=True)
    problem = service.notify(notify_socket, "READY=1")  # under systemd (Type=notify)
    if problem:
        print(f"stackctl: {problem}", file=sys.stderr, flush=True)
    status = supervisor.wait_foreground(running, stop_requested)
    if stop_requested:
        print("stack stopped")
    elif running.process.returncode == 0:  # `stackctl down`, e.g. a systemd unit's ExecStop
        print("circusd was stopped; stack stopped")
    else:
        print(f"circusd exited by itself (status {running.process.returncode}); stack stopped")
    return status


def warn_background_not_started(stack: Stack, since: float) -> None:
    """The site serves without its background workers, so `up` stands; but one that cannot
    start (a typo in its cmd) is said now, not left for a later `stackctl status`."""
    from stackctl import reload

    try:
        reload.check_background_started(stack, {w.name for w in background.on_this_host(stack)},
                                        since)  # fmt: skip
    except StackError as e:
        print(f"warning: {e}", file=sys.stderr, flush=True)


def what_runs(stack: Stack) -> list[str]:
    """What `up` started, in a line per part this host runs."""
    lines = []
    if "nginx" in stack.watchers:
        lines.append(f"stack up: {stack.url()}  (websockets: "
                     f"{stack.url().replace('http', 'ws', 1)}"
                     f"{stack.profile.ws.prefix.lstrip('/')}<channel>)")  # fmt: skip
    if "wsgi" in stack.watchers:
        lines.append(f"{stack.workers} wsgi workers on {stack.wsgi_address}")
    if "ws" in stack.watchers:
        lines.append(f"websocket worker on {stack.ws_address}")
    own = background.on_this_host(stack)
    if own:
        lines.append("background: " + ", ".join(f"{w.name} ({w.numprocesses} process"
                                                f"{'es' if w.numprocesses > 1 else ''})"
                                                for w in own))  # fmt: skip
    if stack.redis_listen:
        sentinel = f", Sentinel on {stack.sentinel_listen}" if stack.sentinel_listen else ""
        lines.append(f"Redis on {stack.redis_listen}{sentinel}")
    return lines


def show_deploy_checks(stack: Stack) -> None:
    from stackctl.deploy_checks import deploy_checks

    if "wsgi" not in stack.watchers:
        return  # the app runs on the app hosts; a front or redis host may not even have it

    for line in deploy_checks(stack):
        print(line, flush=True)


def cmd_down(args: argparse.Namespace) -> int:
    stack = load_running_stack(args, as_saved=True)
    pid = supervisor.running_pid(stack)
    killed = supervisor.stop(stack, pid, drain_first=True)
    if pid is None and not killed:
        print(f"no stack running in {stack.stack_dir}")
        return 0
    print("stack stopped" + (f"; killed leftover pids {killed}" if killed else ""))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """Take this host out of its load balancers' rotation (or back in, with --off): the site
    keeps serving whoever comes, only its health check changes."""
    stack = load_running_stack(args, as_saved=True)
    require_running(stack)
    if "nginx" not in stack.watchers:
        raise StackError("this host runs no NGiNX, so load balancers do not check it: "
                         "drain the front hosts")  # fmt: skip
    if args.off:
        drain.stop(stack.run_dir)
        print(f"{stack.url()}_stackctl/health answers 200 again (while everything works)")
    else:
        drain.start(stack.run_dir)
        print(f"{stack.url()}_stackctl/health answers 503 until `stackctl drain --off` or "
              "the next `stackctl up`; the site keeps serving")  # fmt: skip
    return 0


def require_running(stack: Stack) -> None:
    if supervisor.running_pid(stack) is None:
        raise StackError(f"no stack running in {stack.stack_dir}; start it with `stackctl up`")


def cmd_status(args: argparse.Namespace) -> int:
    """Each watcher and its processes, then whether the site, Redis and realtime delivery
    work; exits 1 when one does not."""
    stack = load_running_stack(args, writes=False, as_saved=True)
    require_running(stack)
    where = stack.url() if "nginx" in stack.watchers else ", ".join(stack.profile.cluster.roles)
    print(f"{where}  profile {stack.profile.name}")
    watchers = supervisor.status(stack)
    for watcher in watchers:
        print(f"{watcher.name:<7} {watcher.state:<9} {len(watcher.processes)} process(es)")
        if watcher.failure:
            print("    " + watcher.failure.replace("\n", "\n    "))
        for p in watcher.processes:
            print(
                f"    pid {p.pid:<8} up {format_age(p.age):>8}  cpu {p.cpu:5.1f}%  "
                f"rss {p.mem_rss / 2**20:7.1f} MiB"
            )
    checks = supervisor.health(stack) + background.status_checks(stack, watchers)
    if "nginx" in stack.watchers and drain.under_way(stack.run_dir):
        print("draining: the health check answers 503 (`stackctl drain --off` ends it)")
    for check in checks:
        print(f"{check.name:<9} {'ok' if check.ok else 'FAILING':<8} {check.detail}")
    return 0 if all(check.ok for check in checks) else EXIT_UNHEALTHY


def cmd_top(args: argparse.Namespace) -> int:
    """The exporter's numbers (metrics.listen), redrawn every second until q or Ctrl-C."""
    from stackctl import top

    stack = load_running_stack(args, writes=False, as_saved=True)
    require_running(stack)
    listen = stack.profile.metrics.listen
    if listen is None:
        raise StackError(
            'metrics.listen is "" in this stack\'s profile, so no exporter runs for top to '
            'read; set it (e.g. "127.0.0.1:9108") and run `stackctl reload`'
        )
    title = f"stackctl top: {stack.stack_dir}  profile {stack.profile.name}"
    return top.run(listen, title, once=args.once)


def format_age(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def cmd_reload(args: argparse.Namespace) -> int:
    """Apply what changed in the profile; reload the named watcher, or, when nothing changed
    and none is named, the app's code (the wsgi workers)."""
    from stackctl import reload

    running = load_running_stack(args)
    require_running(running)
    with reload.one_at_a_time(running):
        return reload_running(args, running)


def reload_running(args: argparse.Namespace, running: Stack) -> int:
    from stackctl import reload

    state = json.loads((running.run_dir / STATE_FILE).read_text())
    overrides = [tuple(p) for p in state["overrides"]] + overrides_from(args)
    chosen = profile.load(args.stack, args.profile or state["profile"], overrides)
    stack = plan(chosen)
    check_run_dir_owner(stack)
    users.check_stack_dir_kept(stack)
    # Before anything is touched: the workers a reload starts (Circus's own, and those a
    # `circusctl reload` would start from the same files) load these settings.
    show_deploy_checks(stack)
    # As saved by `up`: the profile file may have been edited since, roles included.
    started = state.get("settings", {}).get("cluster.roles", running.profile.cluster.roles)
    reload.refuse_changed_roles(tuple(started), stack)
    reload.refuse_moved_shared_redis(state.get("settings", {}), stack)
    # The rest of what `up` checks runs on the new generation in apply_config; the port, only
    # when NGiNX does not hold it already (the files it was read from may have changed since).
    unheld = reload.unheld_listens(stack)
    if unheld:
        check_port_allowed(stack, unheld)
        supervisor.check_port_free(stack, unheld)
    metrics = stack.profile.metrics.listen
    if metrics is not None and metrics != running.profile.metrics.listen:
        supervisor.check_port_free(stack, ["metrics.listen"])  # the exporter's new address
    # Before NGiNX serves the new generation: a changed file's stale .gz goes as soon as can be.
    print_compression(stack)
    since, old_circus_ini = time.time(), running.circus_ini.read_text()
    done = reload.apply_config(stack)
    save_state(stack, overrides)
    for line in done:
        print(line)
    watcher = args.watcher or ("wsgi" if not done and "wsgi" in stack.watchers else None)
    if watcher is not None:
        if watcher not in stack.watchers:
            raise StackError(f"this host runs no {watcher} (cluster.roles: "
                             f"{', '.join(stack.profile.cluster.roles)}); it runs "
                             f"{', '.join(stack.watchers)}")  # fmt: skip
        print(reload.reload_watcher(stack, watcher, sequential=args.sequential))
    elif not done:
        print("nothing changed")
    touched = reload.touched_background(stack, old_circus_ini, watcher)
    reload.check_background_started(stack, touched, since)
    return 0


def cmd_secrets(args: argparse.Namespace) -> int:
    """Make the files every host of a cluster shares, once, on one host."""
    stack = load_stack(args, programs=False)
    # Both, whichever profile this host runs: the others may need the password.
    for path in (stack.secret_file, stack.redis_password_file):
        existed = path.exists()
        realtime.ensure_secret(path)
        print(f"{'kept' if existed else 'made'} {path}")
    print("copy them to the same place in the stack directory of every other host of the "
          "cluster (readable by the user who runs stackctl only), then `stackctl up` there")
    return 0


def print_compression(stack: Stack) -> None:
    from stackctl.compress import compress_static

    outcome = compress_static(stack)
    if outcome is not None:
        print(outcome.summary())


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress the static files that changed, without a reload: after collectstatic, say."""
    stack = load_running_stack(args)
    if stack.static_dir is None:
        print("static.dir is empty: this stack serves no static files")
    elif not stack.profile.static.compress:
        print(f"static.compress is off in profile {stack.profile.name}: NGiNX compresses static "
              "files on each request, and would not send a .gz file")  # fmt: skip
    else:
        print_compression(stack)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    stack = load_running_stack(args, writes=False, as_saved=True)
    runs = ("circusd", *stack.watchers)
    watcher = "nginx" if args.watcher == "nginx-access" else args.watcher
    if watcher is not None and watcher not in runs:
        raise StackError(f"this host runs no {watcher}, so it has no log of it; it runs "
                         f"{', '.join(runs)} (cluster.roles)")  # fmt: skip
    names = [args.watcher] if args.watcher else [n for n in (*LOGS, *runs) if n in runs]
    names = list(dict.fromkeys(names))
    followers = [Follower(stack.log_dir / f"{n}.log") for n in names]
    prefix = len(followers) > 1
    try:
        for follower in followers:
            show(follower.path, follower.tail(args.lines), prefix)
        if args.follow:
            follow(followers, prefix)
    finally:
        for follower in followers:
            follower.close()
    return 0


def show(path: Path, lines: list[bytes], prefix: bool) -> None:
    for raw in lines:
        line = raw.decode(errors="replace")
        print(f"{path.stem}: {line}" if prefix else line, flush=True)


def follow(followers: list[Follower], prefix: bool) -> None:
    """Until Ctrl-C, across rotations (stackctl.follow)."""
    try:
        while True:
            for follower in followers:
                show(follower.path, follower.poll(), prefix)
            time.sleep(0.25)
    except KeyboardInterrupt:
        pass


def cmd_env(args: argparse.Namespace) -> int:
    stack = load_running_stack(args, writes=False)
    print(f"export CIRCUSCTL_ENDPOINT={shlex.quote(stack.circus_endpoint)}")
    for name, value in stack.worker_env().items():
        if name.startswith("STACKCTL_") and name != "STACKCTL_RUN_DIR":
            print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    import redis

    stack = load_running_stack(args, writes=False)
    if stack.embedded_redis:
        require_running(stack)  # its Redis runs only while the stack does
    ws = stack.profile.ws
    data = args.message if args.json else json.dumps(args.message)
    try:
        json.loads(data)
    except ValueError as e:
        raise StackError(f"--json: the message is not JSON ({e})") from None
    connection = realtime.connect(stack.redis_url, **supervisor.redis_password_option(stack),
                                  socket_timeout=5, socket_connect_timeout=2)  # fmt: skip
    try:
        receivers = realtime.publish_json(connection, realtime.check_channel(args.channel),
                                          data, (ws.history, ws.history_seconds))  # fmt: skip
    except redis.ConnectionError as e:
        where = "the stack's Redis" if stack.embedded_redis else "the Redis of redis.url"
        raise StackError(f"cannot reach {where} to publish: {e}") from None
    print(f"published to {args.channel!r} ({receivers} worker(s) listening)")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from stackctl import cache

    stack = load_running_stack(args, writes=False)
    target = cache.load_target(stack.run_dir)
    if args.action == "refresh":
        status = cache.refresh_at(target, args.path, args.host)
        print(f"refreshed {args.path}: the app answered {status}" + (
            "" if status < 400 else " (an error answer is kept only if the app marks it)"))
    elif cache.purge_at(target, args.path, args.host):
        print(f"purged {args.path}: the next request for it goes to the app")
    else:
        print(f"{args.path} was not in the cache")
    return 0


def cmd_service_install(args: argparse.Namespace) -> int:
    stack = load_stack(args, programs=True, writes=False)
    overrides = tuple(override_texts(args))
    unit_dir = Path(os.path.abspath(args.unit_dir))
    for line in service.install(stack, unit_dir, args.name, args.user, overrides):
        print(line)
    return 0


def cmd_service_uninstall(args: argparse.Namespace) -> int:
    unit_dir = Path(os.path.abspath(args.unit_dir))
    for line in service.uninstall(args.stack.resolve(), unit_dir, args.name):
        print(line)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from stackctl.settings import markdown_table

    print(markdown_table())
    return 0


# --- the parser ----------------------------------------------------------------------------------


def add_profile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", help="profile name (default: chosen for this host)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any profile key, e.g. --set wsgi.threads=4 (repeatable)",
    )
    for setting in SETTINGS:
        if setting.flag:
            parser.add_argument(
                setting.flag,
                dest=flag_dest(setting.flag),
                help=f"{setting.help} (same as --set {setting.key}=...)",
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stackctl", description=__doc__)
    stack_help = "the stack directory, where stack.toml is (default: .)"
    parser.add_argument("-C", "--stack", type=Path, default=Path("."), help=stack_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help: str, profiled: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        # -C also after the command (`stackctl render -C DIR`); SUPPRESS keeps one given before.
        sub.add_argument("-C", "--stack", type=Path, default=argparse.SUPPRESS, help=stack_help)
        if profiled:
            add_profile_options(sub)
        return sub

    init = command(
        "init",
        cmd_init,
        "write stack.toml for an app, a Django project or the demo",
        profiled=False,
    )
    init.add_argument("directory", nargs="?", help="the stack directory (default: --stack)")
    init.add_argument("--demo", action="store_true", help="set up the bundled demo app")
    init.add_argument("--app", help="the WSGI app as module:callable (not needed for Django)")
    init.add_argument("--force", action="store_true", help="replace an existing stack.toml")

    render = command("render", cmd_render, "render and validate the configs")
    render.add_argument("--out", help="write them here instead of the run directory")

    up = command("up", cmd_up, "start the stack; returns with --detach once it answers")
    up.add_argument("--detach", "-d", action="store_true", help="return once the stack answers")
    up.add_argument("--timeout", type=float, default=supervisor.START_TIMEOUT,
                    help="seconds to wait for the stack")  # fmt: skip

    command("down", cmd_down, "stop the stack, leaving no process behind")
    draining = command("drain", cmd_drain, "have the health check (GET /_stackctl/health) "
                       "answer 503: load balancers send this host no new visitors")  # fmt: skip
    draining.add_argument("--off", action="store_true", help="answer 200 again")
    command("status", cmd_status, "show each watcher and its processes, and whether the site, "
            "Redis and realtime delivery work (exit status 1 if one does not)")  # fmt: skip
    top = command("top", cmd_top, "watch the stack live: processes, requests, uWSGI workers, "
                  "Redis and realtime clients and messages, every second")  # fmt: skip
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    command("env", cmd_env, "print the exports that point circusctl and publish at this stack")

    reload = command(
        "reload", cmd_reload, "apply profile changes, then gracefully replace the workers"
    )
    # Not choices: a profile's [watchers.NAME] are reloaded and shown by name too.
    reload.add_argument("watcher", nargs="?", help=f"one of {', '.join(WATCHERS)}, or a name "
                        "of the profile's [watchers.NAME]")  # fmt: skip
    reload.add_argument("--sequential", action="store_true", help="one process at a time")

    command("secrets", cmd_secrets, "make the token key and the Redis password that every "
            "host of a cluster shares, for copying to the others")  # fmt: skip

    command("compress", cmd_compress, "compress the static files that changed (file.gz beside "
            "each), which `up` and `reload` also do")  # fmt: skip

    logs = command("logs", cmd_logs, "show the watchers' logs")
    logs.add_argument("watcher", nargs="?", help=f"one of {', '.join([*LOGS, 'nginx-access'])}, "
                      "or a name of the profile's [watchers.NAME]")  # fmt: skip
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=int, default=40)

    cached = command("cache", cmd_cache, "fetch a fresh copy of a page into NGiNX's cache "
                     "now (refresh), or drop it (purge); see cache.enabled")  # fmt: skip
    cached.add_argument("action", choices=("refresh", "purge"))
    cached.add_argument("path", help='the page\'s path and query, e.g. "/news/?page=2"')
    cached.add_argument("--host", help="the site's name the page is kept under (default: the "
                        "first of server.names)")  # fmt: skip

    add_service_commands(commands, stack_help)

    command("keys", cmd_keys, "list every profile key with its default (Markdown)", profiled=False)

    publish = command("publish", cmd_publish, "send a message to a channel's websocket clients")
    publish.add_argument("channel")
    publish.add_argument("message")
    publish.add_argument("--json", action="store_true", help="the message is JSON, sent as is")
    return parser


def add_service_commands(commands: Any, stack_help: str) -> None:
    parent = commands.add_parser(
        "service", help="start the stack at boot: write or remove its systemd unit"
    )
    actions = parent.add_subparsers(dest="action", required=True)
    about = {
        "install": (cmd_service_install, "write a systemd unit that runs `stackctl up` for "
                    "this stack (then: systemctl enable --now UNIT)"),
        "uninstall": (cmd_service_uninstall, "stop and disable the stack's unit, and remove it"),
    }  # fmt: skip
    for action, (handler, help) in about.items():
        sub = actions.add_parser(action, help=help, description=help)
        sub.set_defaults(handler=handler)
        sub.add_argument("-C", "--stack", type=Path, default=argparse.SUPPRESS, help=stack_help)
        sub.add_argument("--name", help="the unit's name (default: stackctl-DIRECTORY)")
        sub.add_argument("--unit-dir", type=Path, default=service.UNIT_DIR,
                         help=f"where the unit goes (default: {service.UNIT_DIR})")  # fmt: skip
    install = actions.choices["install"]
    install.add_argument("--user", help="run the stack as this user, on a port it may bind "
                         "(default: root, which runs the app as server.user)")  # fmt: skip
    add_profile_options(install)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stackctl")
    except PackageNotFoundError:  # run from a checkout that was never installed
        from stackctl import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = int(args.handler(args))
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return status
    except StackError as e:
        print(f"stackctl: {e}", file=sys.stderr)
        return EXIT_STACK_ERROR
    except KeyboardInterrupt:
        print("stackctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `stackctl status | head -1`: the reader has all it wants. Point stdout at /dev/null
        # so that Python's final flush does not complain a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
