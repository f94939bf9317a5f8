"""Background workers: a profile's ``[watchers.NAME]`` sections, each a long-running program
(a Celery or RQ worker, a scheduler) that Circus runs beside the pool.

The names are the user's, so this table has a parser of its own; its keys are declared once,
in :class:`WatcherConfig`, as every other profile key is, and the README's table shows them as
``watchers.NAME.KEY``. In a layer of settings (and on the command line, ``--set``) each value
is a flat key ``watchers.NAME.KEY``, so that a profile may change one key of a watcher that
the stack file declares (``watchers.celery.numprocesses = 4`` for production).

Everything here reaches circus.ini, where a value runs to the end of its line and Circus
expands ``$(circus.…)``, ``((circus.…))`` and ``$NAME``: each value is checked so that it can
only ever be the one option it is meant to be.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackctl.errors import StackError
from stackctl.settings import (
    REQUIRED,
    ROLES,
    Invalid,
    Setting,
    _expect,
    int_range,
    one_of,
    optional_stack_subdir,
    setting,
)
from stackctl.watchers import WATCHERS

if TYPE_CHECKING:
    from stackctl.stack import Stack
    from stackctl.supervisor import Check, WatcherInfo

SECTION = "watchers"
MAX_WATCHERS = 32
NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
RESERVED = (*WATCHERS, "autoreload", "circusd", "nginx-access", "nginx-error")
"""The stack's own programs, and the other names of files in the log directory."""
STOP_SIGNALS = ("TERM", "INT", "QUIT", "HUP", "USR1", "USR2")
"""What a program may take as its request to stop (Celery: TERM finishes the running tasks
first, QUIT does not); never KILL, which leaves no time to finish anything."""
MAX_COMMAND = 4096
MAX_VALUE = 4096
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
STACK_VARIABLES = ("PYTHONPATH", "PYTHONUNBUFFERED", "DJANGO_SETTINGS_MODULE")
"""Set by the stack for every worker (with the STACKCTL_ ones): a watcher's env keeps them."""
RESERVED_PREFIX = "STACKCTL_"

_CIRCUS_EXPANDS = ("$", "((")
"""Circus replaces $(circus.…), ((circus.…)) and $NAME in what it reads."""
_INI_BREAKS = ";"
"""A ";" after a space starts a comment in Circus's ini: whatever follows would be lost."""


def _config_safe(value: str) -> bool:
    return (
        value.isprintable()
        and not any(part in value for part in _CIRCUS_EXPANDS)
        and _INI_BREAKS not in value
    )


_SAFE_RULE = 'printable, without "$", "((" or ";" (Circus would read them as its own syntax)'


def command_line(value: Any) -> str:
    """A command line, split as a shell would split it (quotes, backslashes) but never run
    by one: no pipes, no variables, no globbing."""
    form = (
        f'a command line such as "celery -A tasks worker --loglevel=INFO", {_SAFE_RULE}, '
        f"at most {MAX_COMMAND} characters"
    )
    if not isinstance(value, str) or len(value) > MAX_COMMAND or not _config_safe(value):
        raise _expect(form, value)
    try:
        words = shlex.split(value)
    except ValueError as e:
        raise Invalid(f"{value!r} does not split into words ({e}); expected {form}") from None
    # ("" and "dir/" name no program: Circus would only fail to start it, five times.)
    if not words or not words[0] or words[0].startswith("-") or words[0].endswith("/"):
        raise _expect(form + ", starting with the program to run", value)
    return value


def environment(value: Any) -> tuple[tuple[str, str], ...]:
    form = (
        'a table of environment variables such as { CELERY_CONCURRENCY = "2" }: names of '
        'letters, digits and "_" (not starting with a digit), string values '
        f"{_SAFE_RULE}, at most {MAX_VALUE} characters"
    )
    if not isinstance(value, Mapping | list | tuple):
        raise Invalid(f"expected {form}, got a {type(value).__name__}")
    pairs = list(value.items() if isinstance(value, Mapping) else value)
    for pair in pairs:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise Invalid(f"expected {form}")
        name, text = pair
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise Invalid(f"{name!r} is not a variable name; expected {form}")
        if name.startswith(RESERVED_PREFIX) or name in STACK_VARIABLES:
            raise Invalid(
                f"{name} is the stack's own (it gives every worker STACKCTL_* variables, "
                f"{', '.join(STACK_VARIABLES)}); expected another name"
            )
        # The value is not quoted back: it may well be a secret (an API key), and errors end
        # up in terminals and CI logs.
        if not isinstance(text, str) or len(text) > MAX_VALUE or not _config_safe(text):
            raise Invalid(f"the value of {name} cannot be given to the program; expected {form}")
        if text != text.strip() or text == '""':
            raise Invalid(f"the value of {name}: Circus would strip its spaces or quotes; "
                          "expected a value without leading or trailing spaces")  # fmt: skip
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise Invalid(f"expected {form}, each name once, got {', '.join(names)}")
    return tuple((str(name), str(text)) for name, text in pairs)


@dataclass(frozen=True)
class WatcherConfig:
    """One ``[watchers.NAME]`` section. (``name`` is the section's, not a key.)"""

    name: str
    cmd: str = setting(
        REQUIRED,
        command_line,
        "The program and its arguments, split as a shell would (quotes, backslashes) but "
        "never run through one. A program without a directory is looked for beside "
        "stackctl's Python first (a virtualenv's celery), then on PATH.",
    )
    numprocesses: int = setting(
        1, int_range(0, 64), "How many processes run it; 0: none on this host."
    )
    stop_signal: str = setting(
        "TERM",
        one_of(*STOP_SIGNALS),
        "The signal that asks it to stop (on `down`, or when a reload retires it). Celery "
        "finishes its running tasks on TERM.",
    )
    graceful_timeout: int = setting(
        30,
        int_range(1, 3600),
        "Seconds it may take to stop after that signal (a running task finishing); then it "
        "is killed.",
    )
    env: tuple[tuple[str, str], ...] = setting(
        {},
        environment,
        "Extra environment variables, a table; the stack's own (STACKCTL_REDIS_URL, "
        "STACKCTL_SECRET_FILE, DJANGO_SETTINGS_MODULE...) are given as to the wsgi workers.",
    )
    working_dir: str = setting(
        "",
        optional_stack_subdir,
        'Where it runs, inside the stack directory; "": the stack directory itself.',
    )
    role: str = setting(
        "wsgi",
        one_of(*ROLES),
        "Which hosts run it (cluster.roles): by default those of the wsgi pool.",
    )


WATCHER_SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f"{SECTION}.NAME.{f.name}", *f.metadata["setting"])
    for f in dataclasses.fields(WatcherConfig)
    if "setting" in f.metadata
)
BY_FIELD: dict[str, Setting] = {s.key.rsplit(".", 1)[1]: s for s in WATCHER_SETTINGS}


# --- from TOML to flat keys and back ------------------------------------------------------


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise Invalid(
            f"{name!r} is not a watcher name: expected 1 to 32 lowercase letters, digits, "
            '"_" or "-", starting with a letter, such as "celery"'
        )
    if name in RESERVED:
        raise Invalid(
            f"{name!r} is a name of the stack's own ({', '.join(RESERVED)}); "
            'choose another, such as "celery"'
        )
    return name


def flatten(source: str, table: Any) -> dict[str, Any]:
    """``{"celery": {"cmd": "..."}}`` → ``{"watchers.celery.cmd": "..."}``."""
    if not isinstance(table, dict):
        raise StackError(
            f"{source}: {SECTION}: expected tables such as [watchers.celery], got {table!r}"
        )
    flat: dict[str, Any] = {}
    for name, keys in table.items():
        if not isinstance(keys, dict):
            raise StackError(
                f"{source}: {SECTION}.{name}: expected a table of settings "
                f"([watchers.{name}] with cmd = ...), got {keys!r}"
            )
        for key, value in keys.items():
            flat[f"{SECTION}.{name}.{key}"] = value
    return flat


def is_key(key: str) -> bool:
    return key.startswith(f"{SECTION}.")


def parse(source: str, key: str, raw: Any) -> Any:
    """The value of a flat ``watchers.NAME.KEY``; the error names the source, key and rule."""
    parts = key.split(".")
    try:
        if len(parts) != 3:
            raise Invalid(f"expected {SECTION}.NAME.KEY, such as {SECTION}.celery.cmd")
        check_name(parts[1])
    except Invalid as e:
        raise StackError(f"{source}: {key}: {e}") from None
    declared = BY_FIELD.get(parts[2])
    if declared is None:
        close = difflib.get_close_matches(parts[2], list(BY_FIELD), n=1)
        hint = f"did you mean {close[0]}?" if close else f"allowed: {', '.join(BY_FIELD)}"
        raise StackError(f"{source}: {key}: unknown key; {hint}")
    try:
        return declared.parse(raw)
    except Invalid as e:
        raise StackError(f"{source}: {key}: {e}") from None


def build(values: Mapping[str, Any], sources: Mapping[str, str]) -> tuple[WatcherConfig, ...]:
    """Each watcher the merged layers declare, with its defaults, in the order of names."""
    names = sorted({key.split(".")[1] for key in values if is_key(key)})
    if len(names) > MAX_WATCHERS:
        raise StackError(
            f"{sources.get(f'{SECTION}.{names[-1]}.cmd', 'profile')}: {SECTION}: "
            f"{len(names)} watchers; at most {MAX_WATCHERS} are allowed"
        )
    found = []
    for name in names:
        own = {key.rsplit(".", 1)[1]: v for key, v in values.items()
               if key.startswith(f"{SECTION}.{name}.")}  # fmt: skip
        if "cmd" not in own:
            where = sources.get(f"{SECTION}.{name}.{next(iter(own))}", "profile")
            raise StackError(
                f"{where}: {SECTION}.{name}.cmd: required; [watchers.{name}] needs the "
                f"command to run ({BY_FIELD['cmd'].help})"
            )
        defaults = {field: s.parse(s.default) for field, s in BY_FIELD.items()
                    if s.default is not REQUIRED}  # fmt: skip
        found.append(WatcherConfig(name=name, **{**defaults, **own}))
    return tuple(found)


def saved_values(watchers: Iterable[WatcherConfig]) -> dict[str, Any]:
    """Every key of every watcher as a profile file would write it."""
    values: dict[str, Any] = {}
    for watcher in watchers:
        for field in BY_FIELD:
            value = getattr(watcher, field)
            values[f"{SECTION}.{watcher.name}.{field}"] = (
                dict(value) if field == "env" else value
            )
    return values


def value(watchers: Iterable[WatcherConfig], key: str) -> Any:
    _, name, field = key.split(".")
    for watcher in watchers:
        if watcher.name == name:
            return getattr(watcher, field)
    raise KeyError(key)


# --- what Circus runs -----------------------------------------------------------------------


def on_this_host(stack: Stack) -> tuple[WatcherConfig, ...]:
    return tuple(w for w in stack.profile.watchers if w.numprocesses and stack.runs(w.role))


def program_path(program: str, python: str) -> str:
    """A program named without a directory: the one beside stackctl's Python if there is
    one (circusd's PATH may not name the virtualenv), else the name, for PATH."""
    if "/" in program:
        return program
    beside = Path(python).parent / program
    return str(beside) if beside.is_file() else program


def check_working_dir(stack: Stack, watcher: WatcherConfig) -> Path:
    """Circus could not start the program in a directory that is not there (and would say so
    only in its own log): refuse it before anything starts."""
    directory = stack.stack_dir / watcher.working_dir
    if not directory.is_dir():
        key = f"{SECTION}.{watcher.name}.working_dir"
        raise StackError(f"{stack.profile.where(key)}: {directory} is not a directory; create "
                         'it, or leave working_dir out (or "") to run in the stack '
                         "directory")  # fmt: skip
    return directory


def missing_programs(stack: Stack) -> list[str]:
    """A line per watcher whose program is nowhere to be found: Circus would try to start it
    a few times, then give up. (Not an error: the rest of the stack may well serve without
    it, and the program may be installed later, then `stackctl reload NAME`.)"""
    import shutil

    lines = []
    for watcher in on_this_host(stack):
        program = program_path(shlex.split(watcher.cmd)[0], stack.programs.python)
        if not (Path(program).is_file() if "/" in program else shutil.which(program)):
            where = stack.profile.where(f"{SECTION}.{watcher.name}.cmd")
            lines.append(f"{where}: no program {program!r} here (beside {stack.programs.python} "
                         "or on PATH): this watcher will not start")  # fmt: skip
    return lines


def circus_sections(stack: Stack) -> list[dict[str, Any]]:
    """The values of each ``[watcher:NAME]`` and ``[env:NAME]`` section of this host's
    background watchers."""
    from stackctl.render.circus import tied_to_circusd

    sections = []
    for watcher in on_this_host(stack):
        working_dir = check_working_dir(stack, watcher)
        words = shlex.split(watcher.cmd)
        words[0] = program_path(words[0], stack.programs.python)
        sections.append({
            "name": watcher.name,
            "cmd": shlex.join(tied_to_circusd(stack, words)),
            "numprocesses": watcher.numprocesses,
            "stop_signal": watcher.stop_signal,
            "graceful_timeout": watcher.graceful_timeout,
            "working_dir": working_dir,
            "log": stack.log_dir / f"{watcher.name}.log",
            "env": {**stack.worker_env(), **dict(watcher.env)},
        })  # fmt: skip
    return sections


def status_checks(stack: Stack, infos: Iterable[WatcherInfo]) -> list[Check]:
    """The line of `stackctl status` about this host's background watchers: failing (and the
    exit status 1) when one is not running, since nothing then does its work."""
    from stackctl.supervisor import Check

    own = [w.name for w in on_this_host(stack)]
    if not own:
        return []
    states = {info.name: info for info in infos}
    stopped = [name for name in own if name not in states or states[name].state != "active"]
    if not stopped:
        return [Check("background", True, f"{', '.join(own)} running")]
    return [Check("background", False, "; ".join(not_running(n, states.get(n)) for n in stopped))]


def not_running(name: str, info: WatcherInfo | None) -> str:
    if info is not None and info.failure:
        return f"{name} stopped after crashing (fixed, `stackctl reload {name}` starts it again)"
    return f"{name} {info.state if info is not None else 'is not in circusd'}"


def longest_graceful(profile_watchers: Iterable[WatcherConfig]) -> int:
    return max((w.graceful_timeout for w in profile_watchers), default=0)


def markdown_rows() -> list[str]:
    from stackctl.settings import describe_default

    return [f"| `{s.key}` | `{describe_default(s)}` |  | {s.help} |" for s in WATCHER_SETTINGS]
