"""Writing a generation of configs: render, stage, validate, then swap into place.

A generation is staged in ``<run_dir>/.next/`` and checked there (``nginx -t``, Circus's own
config reader, an import of the app) before any file of the running generation is touched.
Each file then replaces its predecessor with ``os.replace``, so no reader ever sees a
half-written config, and a rejected generation leaves the running one exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path, PurePosixPath

from stackctl.errors import StackError
from stackctl.render import File, circus, nginx, redis, uwsgi
from stackctl.stack import Stack, checked_tls, stack_owner

STAGING = ".next"


def render_all(stack: Stack) -> list[File]:
    """Every config of a generation. The certificate is read (and made, when self-signed)
    here, so that what renders checks it and what only stops or reads a stack does not."""
    stack = checked_tls(stack)
    return [*circus.render(stack), *nginx.render(stack), *uwsgi.render(stack), *redis.render(stack)]


def make_dirs(stack: Stack) -> None:
    """Create the run and log directories, mode 0700: the run directory holds the Circus
    control sockets, the logs show who asked for what; only the stack's user may reach them.

    Stack.plan refused symbolic links and other users' directories on the way; os.mkdir
    never follows a link that appears since, and a directory that already exists has its
    mode changed only when it is the stack owner's own."""
    owner = stack_owner(stack.stack_dir)
    for key in ("paths.run_dir", "paths.log_dir"):
        relative = getattr(stack.profile.paths, key.split(".")[1])
        try:
            make_private(make_private_dir(stack.stack_dir, relative), owner)
        except OSError as e:  # Stack.plan checked; this is what changed since
            raise StackError(
                f"{stack.profile.source(key)}: {key}: {relative!r}: cannot create or make "
                f"private {e.filename}: {e.strerror}"
            ) from None
    make_private_dir(stack.run_dir, "nginx-temp")
    make_logs_private(stack.log_dir, owner)


def make_private_dir(base: Path, relative: str) -> Path:
    directory = base
    for part in PurePosixPath(relative).parts:
        directory = directory / part
        with suppress(FileExistsError):
            os.mkdir(directory, 0o700)
    return directory


def make_private(directory: Path, owner: int) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if os.fstat(descriptor).st_uid == owner:
            os.fchmod(descriptor, 0o700)
    finally:
        os.close(descriptor)


def make_logs_private(log_dir: Path, owner: int) -> None:
    """Older stacks left their logs readable by all (NGiNX's access log was 0644 in a 0755
    directory): fixed here, for the stack owner's own files (not links to others')."""
    for path in log_dir.iterdir():
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == owner:
            os.chmod(path, 0o600)


def stage(files: list[File], directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    for file in files:
        path = directory / file.name
        with path.open("w") as f:
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


def check_app(stack: Stack) -> None:
    """Import the WSGI callable the way a worker will, in a separate interpreter."""
    code = (
        "from stackctl.readiness import load_or_explain; "
        f"load_or_explain({stack.profile.app.wsgi!r})"
    )
    env = {**os.environ, **stack.worker_env()}
    try:
        result = subprocess.run(
            [stack.programs.python, "-c", code],
            cwd=stack.stack_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        raise StackError(
            f"app.wsgi: importing {stack.profile.app.wsgi!r} took over 120 s"
        ) from None
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-30:])
        raise StackError(
            f"app.wsgi: {stack.profile.app.wsgi!r} cannot be imported from "
            f"{stack.stack_dir}:\n{tail}"
        )


def check_static(stack: Stack) -> None:
    if stack.static_dir is not None and not stack.static_dir.is_dir():
        raise StackError(
            f"static.dir: {stack.profile.static.dir!r} resolves to {stack.static_dir}, which is "
            'not a directory; create it, or set static.dir = "" for a stack without static files'
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
    check_static(stack)
    check_app(stack)
    make_dirs(stack)
    target.mkdir(parents=True, exist_ok=True)
    staging = target / STAGING
    try:
        stage(files, staging)
        check_circus(staging / stack.circus_ini.name)
        check_nginx(stack, staging / stack.nginx_conf.name)
        if trial is not None:
            trial(staging)
        for file in files:
            os.replace(staging / file.name, target / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
