"""The systemd unit that starts a stack at boot: ``stackctl up`` in the foreground.

systemd parses each line of a unit itself, with its own quoting and its own expansions (``%``
specifiers everywhere, ``$VARIABLE`` in command lines), so every value is escaped here for
that syntax, and what cannot be written safely is refused. Writing the file, and asking
systemd to read it, is :mod:`stackctl.service`'s job.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from stackctl import reload
from stackctl.errors import StackError
from stackctl.render import File, render_template
from stackctl.stack import Stack, open_files_wanted
from stackctl.supervisor import START_TIMEOUT, longest_stop

TEMPLATE = "stackctl.service.j2"
RESTART_SECONDS = 5
"""Between a crash and the next start: long enough not to spin, short enough to matter little."""
COMMAND_SLACK = 15
"""Seconds for a stackctl command to start Python and load the profile, on top of its own wait."""

# ProtectSystem=full makes these read-only; a stack there could not write its run directory.
READ_ONLY_SYSTEM = ("/usr", "/boot", "/efi", "/etc")
# ProtectHome=read-only makes these read-only, PrivateTmp=yes hides these: each is left out
# for a stack that lives there, and says so in the unit.
HOMES = ("/home", "/root", "/run/user")
TEMPS = ("/tmp", "/var/tmp")
ALWAYS_HARDENING = (
    # Circus and NGiNX drop privileges (setuid to the service user) and never gain any: no
    # setuid program runs in the stack.
    "NoNewPrivileges=yes",
    "ProtectSystem=full",
    "PrivateDevices=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictSUIDSGID=yes",
    "RestrictRealtime=yes",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    # What `stackctl up` sets for itself anyway: reload and down, too, then create what only
    # their owner reads.
    "UMask=0077",
    # NETLINK: the C library asks the kernel for the host's addresses through it.
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./$-]+")


@dataclass(frozen=True)
class Service:
    """What the unit is for, beyond the stack: its name and who runs it."""

    name: str
    """The unit's name without ``.service``, already validated."""
    user: str | None
    """Run the stack as this user (it then listens on a high port); None: as root."""
    overrides: tuple[str, ...] = ()
    """``--set KEY=VALUE`` texts that ``up`` is given, as the install command got them."""


def _refuse_control(what: str, value: str) -> None:
    if _CONTROL.search(value):
        raise StackError(
            f"{what}: {value!r} cannot be written into a systemd unit: it contains a control "
            "character (a line break, a tab...)"
        )


def unit_word(value: str) -> str:
    """One word of a systemd command line, read back by systemd as exactly ``value``."""
    _refuse_control("a command-line word", value)
    # %% is a literal % (specifiers); $$ a literal $ (environment variables).
    text = value.replace("%", "%%").replace("$", "$$")
    if _PLAIN_WORD.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_command(args: list[str]) -> str:
    return " ".join(unit_word(arg) for arg in args)


def unit_path(what: str, path: Path) -> str:
    """A path as the value of a setting such as WorkingDirectory=, which systemd takes as it is
    written (no quotes), after expanding ``%`` specifiers."""
    text = str(path)
    _refuse_control(what, text)
    if "\\" in text or text != text.strip():
        raise StackError(
            f"{what}: {text!r} cannot be written into a systemd unit: systemd would read a "
            "backslash, or a space at either end, differently; rename the directory"
        )
    return text.replace("%", "%%")


def unit_text(what: str, text: str) -> str:
    """Free text (a Description=): ``%`` specifiers escaped."""
    _refuse_control(what, text)
    return text.replace("%", "%%")


def is_under(path: Path, roots: tuple[str, ...]) -> bool:
    return any(path == Path(root) or Path(root) in path.parents for root in roots)


def stackctl_command(stack: Stack, *args: str) -> list[str]:
    # The interpreter as it was started, not resolved: in a venv, the symlink is what finds
    # the venv's packages.
    if not Path(sys.executable).is_absolute():
        raise StackError(
            f"cannot tell which Python runs this stackctl ({sys.executable!r}); run it by an "
            "absolute path, e.g. /opt/stackctl/bin/stackctl service install"
        )
    # -P: `python -m` would put the working directory, the stack directory, first on
    # sys.path, and root's stackctl would import the app's secrets.py or types.py in place of
    # the standard library's.
    return [sys.executable, "-P", "-m", "stackctl", "-C", str(stack.stack_dir), *args]


def hardening(stack: Stack) -> list[str]:
    if is_under(stack.stack_dir, READ_ONLY_SYSTEM):
        raise StackError(
            f"the stack directory {stack.stack_dir} is under {', '.join(READ_ONLY_SYSTEM)}, "
            "which the unit keeps read-only (ProtectSystem=full), so the stack could not write "
            "its run directory; move the stack, e.g. to /srv"
        )
    lines = list(ALWAYS_HARDENING)
    for option, roots in (("ProtectHome=read-only", HOMES), ("PrivateTmp=yes", TEMPS)):
        if is_under(stack.stack_dir, roots):
            lines.append(f"# {option} is left out: the stack lives in {stack.stack_dir}")
        else:
            lines.append(option)
    return lines


def render(stack: Stack, service: Service) -> File:
    profile = f"--profile={stack.profile.name}"
    up = [profile, *(f"--set={text}" for text in service.overrides)]
    # A start that fails stops what it started before it exits; a stop runs every stage.
    stop_seconds = math.ceil(longest_stop(stack.profile)) + COMMAND_SLACK
    # systemd gives ExecReload the start timeout too: it must cover the longest reload.
    start_seconds = max(math.ceil(START_TIMEOUT) + stop_seconds,
                        math.ceil(reload.longest(stack)) + COMMAND_SLACK)  # fmt: skip
    content = render_template(
        TEMPLATE,
        description=unit_text("the stack directory", f"stackctl stack in {stack.stack_dir}"),
        stack_dir=unit_path("the stack directory", stack.stack_dir),
        exec_start=unit_command(stackctl_command(stack, "up", *up)),
        exec_reload=unit_command(stackctl_command(stack, "reload", profile)),
        exec_stop=unit_command(stackctl_command(stack, "down", profile)),
        timeout_start=start_seconds,
        timeout_stop=stop_seconds,
        restart_seconds=RESTART_SECONDS,
        open_files=open_files_wanted(stack.profile),
        user=service.user or "root",
        hardening=hardening(stack),
    )
    return File(f"{service.name}.service", content)
