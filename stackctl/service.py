"""``stackctl service``: install and remove the systemd unit that starts a stack at boot, and
the one message such a unit waits for (``READY=1``, sent by ``stackctl up``).

The unit file is written atomically (a new file beside it, then a rename): systemd, or a reboot,
never reads half of it, and a link planted where the unit goes is replaced, never followed.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import socket
import subprocess
from pathlib import Path

from stackctl.errors import StackError
from stackctl.render import File
from stackctl.stack import Stack, first_unprivileged_port

UNIT_DIR = Path("/etc/systemd/system")
"""Where an administrator's own units go (those of packages live in /usr/lib/systemd)."""
UNIT_PREFIX = "stackctl-"
WRITTEN_BY = "# Written by `stackctl service install`."
"""The first line of every unit stackctl writes: uninstall removes no other file."""
UNIT_MODE = 0o644

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_NAME_FORM = 'letters, digits, "-" and "_", starting with a letter or digit (e.g. "stackctl-shop")'
# The portable form of a user name (POSIX, and what Debian's useradd accepts by default).
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


# --- names ---------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """A unit name given with --name, without or with ``.service``."""
    bare = name.removesuffix(".service")
    if not _NAME.fullmatch(bare):
        raise StackError(
            f"--name: {name!r} is not a unit name stackctl writes; expected {_NAME_FORM}"
        )
    return bare


def default_name(stack_dir: Path) -> str:
    """``stackctl-`` and the stack directory's name, reduced to what a unit name allows."""
    slug = re.sub(r"[^a-z0-9]+", "-", stack_dir.name.lower()).strip("-")[:90]
    if not slug:
        raise StackError(
            f"cannot make a unit name from the directory name {stack_dir.name!r}; "
            "give one with --name NAME"
        )
    return UNIT_PREFIX + slug


def check_user(name: str, stack: Stack) -> str:
    """--user: an existing user who owns the stack directory, and a port they may bind."""
    if not _USER.fullmatch(name):
        raise StackError(
            f"--user: {name!r} is not a user name; expected lower-case letters, digits, "
            '"-" and "_", starting with a letter or "_", at most 32 characters'
        )
    try:
        info = pwd.getpwnam(name)
    except KeyError:
        raise StackError(
            f"--user: there is no user {name!r} on this machine; create it first, e.g. "
            f"`useradd --system --create-home --home-dir /srv/{name} {name}`"
        ) from None
    owner = stack.stack_dir.stat().st_uid
    if info.pw_uid != 0 and owner != info.pw_uid:
        raise StackError(
            f"--user: the stack directory {stack.stack_dir} belongs to uid {owner}, not to "
            f"{name} (uid {info.pw_uid}); a stack started as {name} keeps its files in its "
            f"own directories. Run `chown -R {name}: {stack.stack_dir}`, or leave out --user"
        )
    listen = stack.profile.server.listen
    first = first_unprivileged_port()
    if info.pw_uid != 0 and listen.port < first:
        raise StackError(
            f"{stack.profile.source('server.listen')}: server.listen: {listen} is a privileged "
            f"port (below {first}), which {name} may not listen on. Leave out --user (the "
            "stack then starts as root and runs the app as server.user), or pick a port "
            f"from {first} up (--set server.listen=0.0.0.0:8080)"
        )
    return name


# --- writing and removing the unit ---------------------------------------------------------


def open_unit_dir(unit_dir: Path) -> int:
    """The unit directory, opened without following a symbolic link at its end."""
    try:
        return os.open(unit_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise StackError(f"--unit-dir: cannot use {unit_dir}: {e.strerror}") from None


def existing_unit(dir_fd: int, name: str) -> str | None:
    """What a file named ``name`` holds, if there is one; refused if it is not a unit that
    stackctl wrote."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StackError(
            f"{name}: there is a symbolic link or an unreadable file by that name ({e.strerror}); "
            "stackctl replaces or removes only units it wrote itself. Remove it yourself, or "
            "choose another name with --name"
        ) from None
    with os.fdopen(fd) as existing:
        content = existing.read()
    if not content.startswith(WRITTEN_BY):
        raise StackError(
            f"{name}: a unit by that name exists and stackctl did not write it; "
            "choose another name with --name, or remove it yourself"
        )
    return content


def write_unit(unit_dir: Path, unit: File) -> bool:
    """Write the unit atomically; an existing file by that name must be one stackctl wrote.
    True when it replaced one."""
    dir_fd = open_unit_dir(unit_dir)
    temp = f".{unit.name}.{secrets.token_hex(6)}.tmp"
    try:
        replaced = existing_unit(dir_fd, unit.name) is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, UNIT_MODE, dir_fd=dir_fd)
        except OSError as e:
            raise StackError(f"cannot write in {unit_dir}: {e.strerror}{root_hint()}") from None
        try:
            with os.fdopen(fd, "w") as out:
                os.fchmod(out.fileno(), UNIT_MODE)  # whatever the umask
                out.write(unit.content)
                out.flush()
                os.fsync(out.fileno())
            # rename() replaces a link planted at the name, it never writes through it.
            os.replace(temp, unit.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.unlink(temp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return replaced


def remove_unit(unit_dir: Path, file_name: str) -> bool:
    """Remove the unit stackctl wrote; False when there is none."""
    dir_fd = open_unit_dir(unit_dir)
    try:
        if existing_unit(dir_fd, file_name) is None:
            return False
        try:
            os.unlink(file_name, dir_fd=dir_fd)
        except OSError as e:
            raise StackError(
                f"cannot remove {unit_dir / file_name}: {e.strerror}{root_hint()}"
            ) from None
    finally:
        os.close(dir_fd)
    return True


def root_hint() -> str:
    return "" if os.geteuid() == 0 else " (run it as root, e.g. with sudo)"


# --- systemd -------------------------------------------------------------------------------


def systemd_running() -> bool:
    """Whether systemd is this machine's init (what sd_booted(3) checks)."""
    return os.path.isdir("/run/systemd/system")


def systemctl(*args: str) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise StackError(
            f"`systemctl {' '.join(args)}` failed (status {result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )


def take_notify_socket() -> str | None:
    """Where systemd listens for this service's notifications, when it started this process
    as a Type=notify unit; removed from the environment, so that no program of the stack
    inherits it (uWSGI would tell systemd it is ready on its own)."""
    return os.environ.pop("NOTIFY_SOCKET", None)


def notify(address: str | None, state: str) -> str | None:
    """Tell systemd about the service (``READY=1``), if it listens; what went wrong, if
    something did. Not an error: the stack runs either way, and stays under `stackctl up`."""
    if not address:
        return None
    if address.startswith("@"):  # an abstract socket: Linux names it with a leading NUL
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as e:
            return f"could not tell systemd {state!r} through {address!r}: {e.strerror}"
    return None


# --- the commands --------------------------------------------------------------------------


def install(stack: Stack, unit_dir: Path, name: str | None, user: str | None,
            overrides: tuple[str, ...]) -> list[str]:  # fmt: skip
    """Write the stack's unit; what was done, and what to run next, as lines to print."""
    from stackctl.render import systemd

    service = systemd.Service(
        name=check_name(name) if name else default_name(stack.stack_dir),
        user=check_user(user, stack) if user else None,
        overrides=overrides,
    )
    unit = systemd.render(stack, service)
    replaced = write_unit(unit_dir, unit)
    lines = [
        f"{'replaced' if replaced else 'wrote'} {unit_dir / unit.name} "
        f"(profile {stack.profile.name}, as {service.user or 'root'})"
    ]
    if systemd_running() and unit_dir == UNIT_DIR:
        systemctl("daemon-reload")
        lines.append("systemd has read it")
        if replaced:
            lines.append(f"a running stack keeps the old unit until: systemctl restart {unit.name}")
        lines.append(f"next: systemctl enable --now {unit.name}")
    else:
        lines.append(not_read(unit_dir))
        lines.append(f"then: systemctl enable --now {unit.name}")
    return lines


def not_read(unit_dir: Path) -> str:
    if not systemd_running():
        return "systemd is not running on this machine: nothing else was done. Where it runs: " \
            "systemctl daemon-reload"  # fmt: skip
    return f"systemd does not read {unit_dir}: link the unit with `systemctl link FILE`"


def uninstall(stack_dir: Path, unit_dir: Path, name: str | None) -> list[str]:
    """Stop, disable and remove the stack's unit; what was done, as lines to print."""
    file_name = (check_name(name) if name else default_name(stack_dir)) + ".service"
    dir_fd = open_unit_dir(unit_dir)
    try:
        exists = existing_unit(dir_fd, file_name) is not None
    finally:
        os.close(dir_fd)
    if not exists:
        return [f"no unit {file_name} in {unit_dir}; nothing to do"]
    managed = systemd_running() and unit_dir == UNIT_DIR
    lines = []
    if managed:
        # The unit's ExecStop stops the stack gracefully, as `stackctl down` would.
        systemctl("disable", "--now", file_name)
        lines.append(f"stopped and disabled {file_name}")
    remove_unit(unit_dir, file_name)
    lines.append(f"removed {unit_dir / file_name}")
    if managed:
        systemctl("daemon-reload")
    else:
        lines.append(
            ("systemd is not running on this machine, so nothing was stopped or disabled. "
             if not systemd_running() else f"systemd does not read {unit_dir}. ")
            + f"Where the unit ran: `systemctl disable --now {file_name}` before removing it, "
            f"`systemctl daemon-reload` after; `stackctl -C {stack_dir} down` stops the stack"
        )  # fmt: skip
    return lines
