"""``stackctl init``: write a stack file for an app, a Django project or the bundled demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from stackctl import resources
from stackctl.errors import StackError
from stackctl.profile import STACK_FILE
from stackctl.settings import Invalid, wsgi_callable
from stackctl.stack import MEDIA_INSIDE_ADVICE, STATIC_INSIDE_ADVICE

DEMO_APP = "demo_app:application"
DEMO_WORKER = (
    "celery -A demo_tasks worker --pool threads --concurrency 4 --without-mingle --without-gossip "
    "--loglevel INFO"
)
"""The demo's Celery worker ([watchers.celery]): threads, so one process runs 4 slow jobs."""


@dataclass(frozen=True)
class AppFacts:
    """What init found out about the app; each becomes a line of stack.toml."""

    wsgi: str
    static_url: str = "/static/"
    static_dir: str = ""
    django_settings: str = ""
    media_url: str = "/media/"
    media_dir: str = ""
    notes: tuple[str, ...] = ()
    worker: str = ""
    """The command of a Celery worker to run beside the pool, or ""."""


def settings_module_of(manage_py: Path) -> str:
    match = re.search(
        r"""DJANGO_SETTINGS_MODULE["']\s*,\s*["']([\w.]+)["']""", manage_py.read_text()
    )
    if not match:
        raise StackError(
            f"{manage_py}: cannot find DJANGO_SETTINGS_MODULE in it; pass --app module:callable"
        )
    return match.group(1)


def django_facts(stack_dir: Path) -> AppFacts:
    """Ask Django itself (in a separate interpreter) for the WSGI app and the static settings."""
    settings = settings_module_of(stack_dir / "manage.py")
    code = (
        "import json\n"
        "from django.conf import settings\n"
        "print(json.dumps({'wsgi': settings.WSGI_APPLICATION, "
        "'static_url': str(settings.STATIC_URL or ''), "
        "'static_root': str(settings.STATIC_ROOT or ''), "
        "'media_url': str(settings.MEDIA_URL or ''), "
        "'media_root': str(settings.MEDIA_ROOT or '')}))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings, "PYTHONPATH": str(stack_dir)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=stack_dir, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise StackError(f"{stack_dir}: Django settings {settings!r} cannot be loaded:\n{tail}")
    found = json.loads(result.stdout.strip().splitlines()[-1])
    module, _, attr = str(found["wsgi"]).rpartition(".")
    static_root = found["static_root"]
    static_note = static_root_problem(stack_dir, static_root)
    media_url, media_root = found["media_url"], found["media_root"]
    media_note = media_root_problem(stack_dir, media_url, media_root)
    return AppFacts(
        wsgi=f"{module}:{attr}",
        static_url=url_prefix_of(found["static_url"], "/static/"),
        static_dir="" if static_note else os.path.relpath(static_root, stack_dir),
        django_settings=settings,
        media_url=url_prefix_of(media_url, "/media/"),
        media_dir="" if media_note or not media_root else os.path.relpath(media_root, stack_dir),
        notes=tuple(note for note in (static_note, media_note) if note),
    )


def url_prefix_of(django_url: str, default: str) -> str:
    """Django's STATIC_URL or MEDIA_URL as a profile's URL prefix; Django makes an unset one
    "/" (the script prefix), which names no prefix of its own."""
    path = django_url.strip("/")
    return f"/{path}/" if path else default


def static_root_problem(stack_dir: Path, static_root: str) -> str:
    """Why STATIC_ROOT cannot be the stack's static.dir, or "" when it can."""
    if not static_root:
        return (
            "STATIC_ROOT is not set: static files are not served until you set it, run "
            "`manage.py collectstatic` and set static.dir in stack.toml"
        )
    return root_problem(
        stack_dir, "STATIC_ROOT", static_root, "static files", STATIC_INSIDE_ADVICE,
        how='(e.g. BASE_DIR / "collected"), run `manage.py collectstatic` and set static.dir '
        "in stack.toml",
    )  # fmt: skip


def media_root_problem(stack_dir: Path, media_url: str, media_root: str) -> str:
    """Why MEDIA_ROOT cannot be the stack's media.dir, or "" when it can (or is not set: a
    site without uploads needs none)."""
    if not media_root:
        return ""
    if media_url.startswith(("http://", "https://", "//")):
        return (
            f"MEDIA_URL is {media_url}, on another server: uploaded files are not served by "
            "this stack"
        )
    if not media_url.strip("/"):
        return (
            "MEDIA_URL is not set: uploaded files are not served until you set it (e.g. "
            '"/media/") and set media.url and media.dir in stack.toml'
        )
    return root_problem(
        stack_dir, "MEDIA_ROOT", media_root, "uploaded files", MEDIA_INSIDE_ADVICE,
        how='(e.g. BASE_DIR / "media") and set media.dir in stack.toml',
    )  # fmt: skip


def root_problem(
    stack_dir: Path, name: str, value: str, files: str, inside_advice: str, how: str
) -> str:
    """Why a directory that Django settings give cannot be served by NGiNX, or ""."""
    root = (stack_dir / value).resolve()
    if root == stack_dir.resolve() or root in stack_dir.resolve().parents:
        return (
            f"{name} is {root}, which holds the whole project: NGiNX would serve its "
            f"source and settings, so {files} are not served. Give {name} a directory "
            f"of its own {how}"
        )
    if stack_dir.resolve() not in root.parents:
        return (
            f"{name} is {root}, outside the project: stackctl serves {files} only "
            f"from inside the stack directory, so they are not served. To serve them, "
            f"{inside_advice}"
        )
    return ""


def app_facts(stack_dir: Path, app: str | None) -> AppFacts:
    if app:
        try:
            wsgi_callable(app)
        except Invalid as e:
            raise StackError(f"command line: --app: {e}") from None
        static = "static" if (stack_dir / "static").is_dir() else ""
        return AppFacts(wsgi=app, static_dir=static)
    if (stack_dir / "manage.py").is_file():
        return django_facts(stack_dir)
    raise StackError(
        f"{stack_dir}: no manage.py here, so this is not a Django project; name the WSGI app "
        "with --app module:callable (importable from this directory), or use --demo"
    )


def copy_demo(stack_dir: Path) -> AppFacts:
    directory = open_directory(stack_dir)
    try:
        copy_into(resources.demo_dir(), directory, stack_dir)
    finally:
        os.close(directory)
    notes = () if celery_installed() else (
        "the demo's slow job runs on Celery, which is not installed: pip install "
        "'stackctl[demo]' (the rest of the demo works without it)",
    )  # fmt: skip
    return AppFacts(wsgi=DEMO_APP, static_dir="static", worker=DEMO_WORKER, notes=notes)


def celery_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("celery") is not None


# init may run as root in a directory the app's user owns, who could have put a link where a
# file is written (stack.toml's temporary file pointing at /etc/shadow): every directory and
# file is opened relative to its parent's descriptor, and no link is followed.
NO_LINK = os.O_NOFOLLOW


def open_directory(path: Path, parent: int | None = None) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | NO_LINK, dir_fd=parent)
    except OSError as e:
        raise StackError(f"{path}: cannot write in it ({e.strerror}); a symbolic link? "
                         "Remove it, init writes it again") from None  # fmt: skip


def copy_into(source: Path, directory: int, where: Path) -> None:
    """Copy the files under ``source`` into the directory open as ``directory``."""
    for item in source.iterdir():
        if item.name == "__pycache__":
            continue
        if item.is_dir():
            with suppress(FileExistsError):
                os.mkdir(item.name, 0o755, dir_fd=directory)
            inner = open_directory(where / item.name, directory)
            try:
                copy_into(item, inner, where / item.name)
            finally:
                os.close(inner)
        else:
            write_file(directory, item.name, item.read_bytes(), where)


def write_file(directory: int, name: str, data: bytes, where: Path) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NO_LINK
    try:
        descriptor = os.open(name, flags, 0o644, dir_fd=directory)
    except OSError as e:
        raise StackError(f"{where / name}: cannot write it ({e.strerror}); a symbolic link? "
                         "Remove it, init writes it again") from None  # fmt: skip
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def stack_file_text(facts: AppFacts) -> str:
    lines = [
        "# The stack: what the app is. How a host runs it (workers, listen address...) comes",
        "# from a profile: profiles/<name>.toml here, or a shipped one (dev, prod).",
        "",
        "[app]",
        f"wsgi = {toml_string(facts.wsgi)}",
    ]
    if facts.django_settings:
        lines.append(f"django_settings = {toml_string(facts.django_settings)}")
    lines += [
        "",
        "[static]",
        f"url = {toml_string(facts.static_url)}",
        f"dir = {toml_string(facts.static_dir)}",
        "",
        '# Uploaded files (Django\'s MEDIA_ROOT), served by NGiNX as files only; "" for none.',
        "[media]",
        f"url = {toml_string(facts.media_url)}",
        f"dir = {toml_string(facts.media_dir)}",
        "",
    ]
    if facts.worker:
        lines += [
            "# A background worker that Circus runs beside the pool, with the same environment",
            "# (the demo's slow job); see the README's \"Background workers (Celery)\".",
            "[watchers.celery]",
            f"cmd = {toml_string(facts.worker)}",
            "",
        ]
    lines += [
        "# Which profile each host runs, first match wins; host-name patterns as in a shell.",
        "[hosts]",
        '# "web*.example.com" = "prod"',
        "",
    ]
    return "\n".join(lines) + "\n"


def init(stack_dir: Path, *, demo: bool, app: str | None, force: bool) -> AppFacts:
    stack_dir.mkdir(parents=True, exist_ok=True)
    path = stack_dir / STACK_FILE
    if path.exists() and not force:
        raise StackError(f"{path}: already exists; pass --force to write it again")
    facts = copy_demo(stack_dir) if demo else app_facts(stack_dir, app)
    temp = f".{STACK_FILE}.tmp"
    directory = open_directory(stack_dir)
    try:
        with suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=directory)  # a link planted here is removed, not followed
        write_file(directory, temp, stack_file_text(facts).encode(), stack_dir)
        os.replace(temp, STACK_FILE, src_dir_fd=directory, dst_dir_fd=directory)
    finally:
        os.close(directory)
    return facts
