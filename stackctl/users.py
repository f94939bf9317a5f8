"""The service user: who the app's processes run as (``server.user``), and what it may do.

Started as root, stackctl keeps circusd and the NGiNX master as root (they bind the ports) and
runs the app's workers, the websocket worker, Redis and NGiNX's workers as the service user.
Started as a normal user, everything runs as that user: nobody else can be switched to.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import stackctl
from stackctl.errors import StackError
from stackctl.profile import Profile

if TYPE_CHECKING:
    from stackctl.stack import Stack

ROOT_NAME = "root"
NEW_USER_HINT = "useradd --system --no-create-home --shell /usr/sbin/nologin myapp"


@dataclass(frozen=True)
class ServiceUser:
    """Who the app's processes run as: server.user, resolved on this machine."""

    name: str
    uid: int
    gid: int
    group: str


def where(profile: Profile) -> str:
    """How an error names the setting: the file that set it (or the defaults), key and value."""
    return profile.where("server.user")


def service_user(profile: Profile, runner_uid: int) -> ServiceUser:
    """server.user as a user of this machine. Empty means the owner of the stack directory
    for root, and the user running stackctl for anyone else (nobody else can be switched to)."""
    name = profile.server.user
    if name:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise StackError(
                f"{where(profile)}: no such user on this machine; create it ({NEW_USER_HINT}) "
                'or name an existing one (`getent passwd` lists them), or "" for the owner '
                "of the stack directory"
            ) from None
    else:
        uid = runner_uid if runner_uid != 0 else profile.stack_dir.stat().st_uid
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            raise StackError(
                f'{where(profile)}: "" means the owner of the stack directory '
                f"{profile.stack_dir}, uid {uid}, which has no name on this machine; set "
                "server.user to a user name"
            ) from None
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid, group)


def check_service_user(stack: Stack) -> None:
    """Before anything is rendered or started: a normal user runs the stack as themselves,
    and root runs the app as root only when the profile says so in as many words."""
    profile, user = stack.profile, stack.user
    if stack.runner_uid != 0:
        if user.uid != stack.runner_uid:
            me = pwd.getpwuid(stack.runner_uid).pw_name
            raise StackError(
                f"{where(profile)}: you run stackctl as {me!r}, and only root can start "
                f"processes as another user; start the stack as root, or set server.user to "
                f'"" or {me!r} to run it as yourself'
            )
        return
    check_trusted_source(profile)
    check_stack_dir_kept(stack)
    if user.uid != 0 and 0 in os.getgrouplist(user.name, user.gid):
        raise StackError(
            f"{where(profile)}: {user.name!r} is in root's group (gid 0): the app's processes "
            "would get it too, with whatever root's group may read or write on this machine. "
            f"Give the user a group of its own (usermod -g {user.name} -G '' {user.name}, "
            f'after groupadd {user.name}), or write server.user = "{ROOT_NAME}" to run the app '
            "as root outright"
        )
    if user.uid == 0 and profile.server.user != ROOT_NAME:
        why = (
            f"{where(profile)} names {user.name!r}, uid 0" if profile.server.user
            else f"server.user is not set, and root owns the stack directory {stack.stack_dir}"
        )  # fmt: skip
        raise StackError(
            f"{why}: the app's workers, the websocket worker and Redis would "
            "run as root, where a flaw in the app gives away the machine. Create a user for "
            f"the app ({NEW_USER_HINT}) and set server.user to it (in the profile, or --set "
            "server.user=myapp), keeping the stack directory root's (the user "
            "must not be able to write in it). To run them as root anyway, write server.user = "
            f'"{ROOT_NAME}"'
        )


def check_stack_dir_kept(stack: Stack) -> None:
    """Root acts on files under the stack directory by their paths (circusd opens, rotates
    and deletes logs; NGiNX's master reopens its access log and gives it, and its temporary
    directories, to the service user, following links). A service user who can rename
    ``.stackctl`` (by writing in the stack directory, or in a directory above it) could put a
    directory of its own in its place meanwhile, with links in it to /etc/shadow: root would
    then write, delete or hand over whatever they lead to. So when root runs the app as
    another user, that user may neither write in the stack directory nor rename it or a
    directory above it."""
    if not stack.switches_user:
        return
    user = stack.user
    groups = set(os.getgrouplist(user.name, user.gid))
    problem = rename_right(stack.stack_dir, user.uid, groups)
    if problem is None:
        return
    raise StackError(
        f"{where(stack.profile)}: the app's processes run as {user.name!r}, who {problem}: "
        f"they could put a directory of their own in place of {stack.private_dir} and have "
        "root's circusd and NGiNX write, delete or give away files through links planted "
        "there. Keep the stack directory and those above it root's and not writable by "
        f"{user.name!r} (chown root: {stack.stack_dir} && chmod 755 {stack.stack_dir}), give "
        f"{user.name!r} only the directories the app writes in (uploads: chown -R "
        f"{user.name}: {stack.stack_dir}/media), and name it with server.user on the command "
        "line or in a profile only root can change"
    )


def rename_right(stack_dir: Path, uid: int, groups: set[int]) -> str | None:
    """How ``uid`` could replace the stack directory's entries or one on the way to it, in an
    error's words; None if it cannot (by the mode bits: an ACL granting more is not seen)."""
    info = os.stat(stack_dir)
    if info.st_uid == uid or _may_write(info, uid, groups):
        return f"owns or can write in the stack directory {stack_dir}"
    child = stack_dir
    for parent in stack_dir.parents:
        above = os.stat(parent)
        sticky = above.st_mode & stat.S_ISVTX
        # In a sticky directory (/tmp) only the owner of an entry, or of the directory, may
        # rename it.
        if above.st_uid == uid or (
            _may_write(above, uid, groups) and (not sticky or os.lstat(child).st_uid == uid)
        ):
            return f"can rename {child} (in {parent}, which they own or can write in)"
        child = parent
    return None


def _may_write(info: os.stat_result, uid: int, groups: set[int]) -> bool:
    mode = info.st_mode
    if info.st_uid == uid:
        return bool(mode & stat.S_IWUSR)
    if info.st_gid in groups:
        return bool(mode & stat.S_IWGRP)
    return bool(mode & stat.S_IWOTH)


def check_trusted_source(profile: Profile) -> None:
    """Root takes server.user from the command line, or from a file only root can change: a
    service user who may edit stack.toml (the owner of the stack directory, say) would
    otherwise write server.user = "root" there and wait for the next reload."""
    source = profile.source("server.user")
    if not profile.server.user or source in ("defaults", "command line"):
        return
    path = Path(source)
    for what in (path, path.parent):
        info = what.stat()
        if info.st_uid != 0 or info.st_mode & 0o022:
            raise StackError(
                f"{where(profile)}: {what} can be changed by a user other than root (owner "
                f"uid {info.st_uid}, mode {info.st_mode & 0o7777:o}), who could name any user "
                "there, root included; root takes server.user only from a file that only "
                "root can change, in a directory that only root can change (say a profile in "
                "a root-owned profiles/ directory), or from the command line (--set "
                'server.user=...). Or leave it "" for the owner of the stack directory'
            )


def switch_to(user: ServiceUser) -> dict[str, Any]:
    """subprocess's arguments that start a program as ``user``, with all of its groups."""
    return {
        "user": user.uid,
        "group": user.gid,
        "extra_groups": os.getgrouplist(user.name, user.gid),
    }


def as_service_user(stack: Stack) -> dict[str, Any]:
    """subprocess's arguments that start what runs the app's code as the service user, when
    root hands the app to another user; none otherwise."""
    return switch_to(stack.user) if stack.switches_user else {}


def needed_paths(stack: Stack) -> dict[Path, str]:
    """What the service user's processes open, by what they must be able to do with it."""
    programs = stack.programs
    found: dict[Path, str] = {
        **app_python_paths(stack),
        stack.run_dir: "read",  # its configs; an existing directory on the way may be closed
        stack.service_dir: "write",
        stack.secret_file: "read",
    }
    if "wsgi" in stack.watchers:
        found[Path(programs.uwsgi)] = "run"
    if stack.redis_has_password:
        found[stack.redis_password_file] = "read"
    if programs.redis_server and stack.embedded_redis:
        found[Path(programs.redis_server)] = "run"
    if stack.static_dir is not None and stack.static_dir.is_dir():
        found[stack.static_dir] = "read"  # NGiNX's workers serve it
    for served in (stack.media_dir, stack.acme_dir):  # the same (who writes: their owner's call)
        if served is not None and served.is_dir():
            found[served] = "read"
    return found


# Each argument is "run:PATH", "read:PATH" or "write:PATH"; what the user cannot do is printed
# back. (A directory must also be searchable: -x.)
_PROBE = (
    'for item; do path="${item#*:}"; case "$item" in '
    'run:*) test -x "$path" ;; '
    'write:*) test -w "$path" -a -x "$path" ;; '
    '*) test -r "$path" -a \\( -f "$path" -o -x "$path" \\) ;; esac '
    '|| printf "%s\\n" "$item"; done'
)


def unreachable(user: ServiceUser, paths: dict[Path, str]) -> list[str]:
    """The ``paths`` that ``user`` cannot run or read, asked of the kernel as that user (a
    shell started as them runs `test`, which sees every directory on the way, ACLs too)."""
    items = [f"{how}:{path}" for path, how in paths.items()]
    result = subprocess.run(
        ["/bin/sh", "-c", _PROBE, "sh", *items],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        **switch_to(user),
    )
    return [line for line in result.stdout.splitlines() if line]


def app_python_paths(stack: Stack) -> dict[Path, str]:
    """What an interpreter started as the service user to load the app opens first."""
    return {
        Path(stack.programs.python): "run",
        Path(sys.prefix): "read",  # the virtualenv (uWSGI's `home`)
        Path(stackctl.__file__).parent: "read",
        stack.stack_dir: "read",
    }


def check_service_user_reaches(stack: Stack, paths: dict[Path, str] | None = None) -> None:
    """The service user must be able to run the programs and read the app (``paths``, by
    default all of needed_paths), or the workers die at start with nothing but "permission
    denied" in a log: say so first, and what to do."""
    if not stack.switches_user:
        return
    missing = unreachable(stack.user, needed_paths(stack) if paths is None else paths)
    if not missing:
        return
    lines = "\n".join(f"  cannot {item.replace(':', ' ', 1)}" for item in missing)
    raise StackError(
        f"{where(stack.profile)}: the app's processes run as {stack.user.name!r}, who cannot "
        f"reach what they need:\n{lines}\nInstall stackctl and the app where that user can "
        "read them (e.g. python3 -m venv /opt/stackctl, and the app under /srv), not under "
        "/root, which is private to root; or give the user access (chmod o+rx, or chgrp "
        f"{stack.user.group} and chmod g+rx, on every directory on the way)"
    )


def check_key_private(stack: Stack) -> None:
    """The app's processes must not be able to read the certificate's private key: a flaw
    in the app would give it away, and with it the site's identity until the certificate
    ends. (NGiNX's master, root, reads it before its workers take the service user.)"""
    if not stack.switches_user or stack.tls is None:
        return
    key = stack.tls.key
    if unreachable(stack.user, {key: "read"}):
        return
    profile = stack.profile
    raise StackError(
        f"{profile.where('tls.key')}: {key} can be read by "
        f"{stack.user.name!r}, who runs the app: a flaw in the app would give away the "
        f"private key. Make it readable by root only (chown root: {key} && chmod 600 {key}), "
        "in a directory the user cannot write in"
    )
