"""Writing a generation of configs: render, stage, validate, then swap into place.

A generation is staged in ``<run_dir>/.next/`` and checked there (``nginx -t``, Circus's own
config reader, an import of the app) before any file of the running generation is touched.
Each file then replaces its predecessor with ``os.replace``, so no reader ever sees a
half-written config, and a rejected generation leaves the running one exactly as it was.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path, PurePosixPath

from stackctl import cluster, realtime
from stackctl.errors import StackError
from stackctl.render import File, circus, nginx, redis, uwsgi
from stackctl.stack import Stack, checked_tls, private_dirs
from stackctl.users import (
    app_python_paths,
    as_service_user,
    check_key_private,
    check_service_user,
    check_service_user_reaches,
    check_stack_dir_kept,
)

STAGING = ".next"


def render_all(stack: Stack) -> list[File]:
    """Every config of a generation. The certificate is read (and made, when self-signed)
    here, so that what renders checks it and what only stops or reads a stack does not."""
    check_stack_dir_kept(stack)  # before the key of a self-signed certificate is written
    stack = checked_tls(stack)
    return [*circus.render(stack), *nginx.render(stack), *uwsgi.render(stack), *redis.render(stack)]


def make_dirs(stack: Stack) -> None:
    """Create the run, log and .stackctl directories, owned by the user running stackctl: the
    run directory holds the Circus control sockets, the logs show who asked for what.

    Only that user may write in them. When root runs the app as another user, that user's
    group may read them (configs, logs, the key that signs tokens; mode 2750, the setgid bit
    giving the sockets circusd binds there the group too), and the one directory its
    processes write in, the service directory, is theirs (0700). Stack.plan refused symbolic
    links and other users' directories on the way; os.mkdir never follows a link that appears
    since, and a directory that already exists has its mode changed only when it is the
    user's own."""
    for key, relative in private_dirs(stack).items():
        try:
            make_private_dir(stack, stack.stack_dir, relative)
        except OSError as e:  # Stack.plan checked; this is what changed since
            raise StackError(
                f"{key}: cannot create or make private {e.filename}: {e.strerror}"
            ) from None
    make_private_dir(stack, stack.run_dir, stack.nginx_temp_dir.name)
    if "nginx" in stack.watchers:  # the health check's answer is kept there too
        make_cache_dir(stack)
    make_service_dir(stack)
    make_logs_private(stack.log_dir, stack.runner_uid)
    make_secrets(stack)


def make_cache_dir(stack: Stack) -> None:
    """The directories NGiNX keeps pages and the health check's answer in are made by
    NGiNX's master in this one, which is stackctl's (root's, when root starts the stack):
    the service user, who writes the pages, cannot put a link in place of a cache directory
    for the master to chown."""
    try:
        make_private_dir(stack, stack.run_dir, stack.nginx_cache_dir.name)
    except OSError as e:
        raise StackError(
            f"{stack.nginx_cache_dir} cannot be made NGiNX's cache directory "
            f"({e.strerror}): it must be a directory of yours, not a symbolic link; remove "
            "it, stackctl creates it again"
        ) from None


SHARED_SECRETS_ADVICE = (
    "the hosts of a cluster share it: run `stackctl secrets` once, on one host, then copy "
    "{files} from its stack directory to the same place on every other host"
)


def shared_secrets(stack: Stack) -> list[Path]:
    """The files every host of a cluster must hold alike: the key that signs tokens (a token
    made on one app host is checked on another) and, with redis hosts, the Redis password."""
    found = [stack.secret_file]
    if stack.profile.cluster.redis_hosts:
        found.append(stack.redis_password_file)
    return found


def make_secrets(stack: Stack) -> None:
    """The key that signs tokens, made on first use on a single host; in a cluster, each file
    every host must share is required, not made (one made here would differ from the
    others'), and given the mode and group the service user reads it with."""
    shared = shared_secrets(stack)
    if cluster.is_cluster(stack.profile):
        missing = [path for path in shared if not path.exists()]
        if missing:
            names = " and ".join(str(path.relative_to(stack.stack_dir)) for path in shared)
            raise StackError(
                f"{missing[0]}: missing; " + SHARED_SECRETS_ADVICE.format(files=names)
            )
    for path in shared:
        realtime.ensure_secret(path, stack.file_mode, stack.shared_gid)
    if stack.profile.cluster.redis_hosts:
        check_redis_password(stack.redis_password_file)


REDIS_PASSWORD = re.compile(r"[!#-&(-~]{16,}")
"""What Redis and Sentinel's config files take unquoted: printable ASCII but space and quotes;
long enough not to be guessed (`stackctl secrets` makes 43 characters)."""


def check_redis_password(path: Path) -> None:
    """The first line of the shared Redis password file is a password Redis takes as written:
    an empty one would be no password at all, one with spaces or quotes a config Redis refuses
    (echoing the line, password included, to its log). Never says what the file holds."""
    lines = path.read_text(errors="replace").splitlines()
    first = lines[0] if lines else ""
    if not REDIS_PASSWORD.fullmatch(first):
        raise StackError(
            f"{path}: its first line must be the Redis password: at least 16 printable "
            "characters without spaces or quotes (`stackctl secrets` makes one in a new "
            "file); " + SHARED_SECRETS_ADVICE.format(files=path.name)
        )


def make_private_dir(stack: Stack, base: Path, relative: str) -> Path:
    """Each directory of ``relative`` under ``base``, created if missing; the last one, and
    those created on the way, made private (one that was there may be the app's own)."""
    directory = base
    parts = PurePosixPath(relative).parts
    for index, part in enumerate(parts):
        directory = directory / part
        try:
            os.mkdir(directory, 0o700)
            created = True
        except FileExistsError:
            created = False
        if created or index == len(parts) - 1:
            make_private(stack, directory)
    return directory


def make_private(stack: Stack, directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if os.fstat(descriptor).st_uid == stack.runner_uid:
            if stack.shared_gid is not None:
                os.fchown(descriptor, -1, stack.shared_gid)
            os.fchmod(descriptor, stack.dir_mode)
    finally:
        os.close(descriptor)


def make_service_dir(stack: Stack) -> None:
    """The service user's own directory in the run directory: root creates it (in its own
    directory, where nobody could have planted a link) and hands it over."""
    directory = stack.service_dir
    with suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        owner = os.fstat(descriptor).st_uid
        if owner != stack.user.uid:
            if stack.runner_uid != 0:  # only root can give it away, or take it back
                raise StackError(f"{directory} belongs to uid {owner}, not to you; remove "
                                 "it (as root), stackctl creates it again")  # fmt: skip
            os.fchown(descriptor, stack.user.uid, stack.user.gid)
        os.fchmod(descriptor, 0o700)
    finally:
        os.close(descriptor)


def make_logs_private(log_dir: Path, owner: int) -> None:
    """Older stacks left their logs readable by all (NGiNX's access log was 0644 in a 0755
    directory): fixed here, for the user's own files (not links to others')."""
    for path in log_dir.iterdir():
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == owner:
            os.chmod(path, 0o600)


def stage(stack: Stack, files: list[File], directory: Path) -> None:
    """Write ``files`` into ``directory``, readable by the service user's processes (uWSGI
    and Redis read their configs) when root runs them as that user."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    for file in files:
        path = directory / file.name
        with path.open("w") as f:
            realtime.share(f.fileno(), stack.file_mode, stack.shared_gid)
            f.write(file.content)
            f.flush()
            os.fsync(f.fileno())


def check_nginx(stack: Stack, conf: Path) -> None:
    result = subprocess.run(
        [
            stack.programs.nginx,
            "-t",
            "-q",
            "-p",
            str(stack.run_dir),
            "-c",
            str(conf),
            "-e",
            str(stack.nginx_error_log),
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise StackError(
            f"the rendered NGiNX config was rejected by `nginx -t`:\n{result.stderr.strip()}"
            + certificate_hint(stack, result.stderr)
        )


def certificate_hint(stack: Stack, said: str) -> str:
    """NGiNX names the file, not the setting: say which setting gave it, and that nothing
    changed for the site."""
    if stack.tls is None or not {str(stack.tls.certificate), str(stack.tls.key)} & set(
        said.replace('"', " ").split()
    ):
        return ""
    return (
        f"\nNGiNX cannot use the certificate of tls.certificate ({stack.tls.certificate}) with "
        f"the key of tls.key ({stack.tls.key}); the running site keeps the certificate it has. "
        "Check that the files are a certificate (then its chain) and its key, RSA keys of at "
        "least 2048 bits"
    )


def check_circus(conf: Path) -> None:
    from circus.config import get_config

    try:
        get_config(str(conf))
    except Exception as e:  # Circus raises assorted types for a config it cannot read.
        raise StackError(f"the rendered Circus config was rejected by Circus: {e}") from None


APP_TIMEOUT = 120
"""Seconds a check that loads the app in a separate interpreter may take."""


def run_app_python(stack: Stack, code: str, what: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a separate interpreter, the way a worker runs: as the service user (the
    app's code never runs as root unless the profile says so), with its environment, in the
    stack directory. ``what`` says what took too long, if it does."""
    try:
        return subprocess.run(
            [stack.programs.python, "-c", code],
            cwd=stack.stack_dir,
            env={**os.environ, **stack.worker_env()},
            capture_output=True,
            text=True,
            timeout=APP_TIMEOUT,
            **as_service_user(stack),
        )
    except subprocess.TimeoutExpired:
        raise StackError(f"{what} took over {APP_TIMEOUT} s") from None
    except OSError as e:
        # Django's checks run before `up` makes the directories whose reach it checks: the
        # service user may not even reach the interpreter (a virtualenv under /root).
        # Names what that user cannot reach, and what to do, when that is the reason.
        check_service_user_reaches(stack, app_python_paths(stack))
        raise StackError(f"{what}: cannot start {stack.programs.python}: {e.strerror}") from None


def import_failure(stack: Stack, result: subprocess.CompletedProcess[str]) -> StackError:
    """The error for an app that load_or_explain could not load: its traceback's tail."""
    tail = "\n".join(result.stderr.strip().splitlines()[-30:])
    return StackError(
        f"app.wsgi: {stack.profile.app.wsgi!r} cannot be imported from {stack.stack_dir}:\n{tail}"
    )


def check_app(stack: Stack) -> None:
    """Import the WSGI callable the way a worker will, in a separate interpreter, as the
    service user (the app's code never runs as root unless the profile says so)."""
    code = (
        "from stackctl.readiness import load_or_explain; "
        f"load_or_explain({stack.profile.app.wsgi!r})"
    )
    result = run_app_python(stack, code, f"app.wsgi: importing {stack.profile.app.wsgi!r}")
    if result.returncode != 0:
        raise import_failure(stack, result)


def check_static(stack: Stack) -> None:
    if stack.static_dir is not None and not stack.static_dir.is_dir():
        raise StackError(
            f"static.dir: {stack.profile.static.dir!r} resolves to {stack.static_dir}, which is "
            'not a directory; create it, or set static.dir = "" for a stack without static files'
        )
    # A missing media directory is a site without uploads yet: Django creates MEDIA_ROOT.
    if stack.media_dir is not None and stack.media_dir.exists() and not stack.media_dir.is_dir():
        raise StackError(
            f"media.dir: {stack.profile.media.dir!r} resolves to {stack.media_dir}, which is "
            'not a directory; set media.dir to the directory of uploaded files, or "" for none'
        )


def write(
    stack: Stack,
    files: list[File],
    target: Path | None = None,
    trial: Callable[[Path], None] | None = None,
) -> None:
    """Validate ``files`` as a whole generation, then put each in ``target`` atomically.

    ``target`` is the run directory unless ``stackctl render --out DIR`` names another.
    ``trial``, given the staging directory, may run what the configs there start (a reload's
    canary worker) and raise StackError to refuse them.
    """
    target = target or stack.run_dir
    check_service_user(stack)
    if "nginx" in stack.watchers:
        check_static(stack)
    make_dirs(stack)
    check_service_user_reaches(stack)  # the directories made for it, too
    check_key_private(stack)
    if "wsgi" in stack.watchers:
        check_app(stack)
    target.mkdir(parents=True, exist_ok=True)
    staging = target / STAGING
    try:
        stage(stack, files, staging)
        check_circus(staging / stack.circus_ini.name)
        if "nginx" in stack.watchers:
            check_nginx(stack, staging / stack.nginx_conf.name)
        if trial is not None:
            trial(staging)
        for file in files:
            os.replace(staging / file.name, target / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
