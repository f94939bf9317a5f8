"""The service user: how server.user is read, resolved and checked, and what root makes for it.

What the processes run as, against the real stack, is in tests/e2e/test_service_user.py.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from stackctl import generation, profile, realtime
from stackctl.errors import StackError
from stackctl.readiness import forget_dead_marks, ready_dir
from stackctl.settings import Invalid, user_name
from stackctl.stack import Stack, plan
from stackctl.users import (
    ServiceUser,
    check_key_private,
    check_service_user,
    service_user,
    unreachable,
)
from tests.unit.test_render import PROGRAMS, files, make_stack

SERVICE = ServiceUser("svc", 4242, 4343, "svcgroup")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners takes root")


@pytest.mark.parametrize("name", ["", "www-data", "_svc", "app.1", "a" * 32])
def test_user_names_that_parse(name: str) -> None:
    assert user_name(name) == name


@pytest.mark.parametrize("value", ["bad name", "1abc", "-x", ".x", "a$b", "a;b", "a" * 33, 42])
def test_user_names_that_do_not(value: object) -> None:
    with pytest.raises(Invalid, match='or "" for the owner of the stack directory'):
        user_name(value)


def load(tmp_path: Path, extra: str = "", overrides=()) -> profile.Profile:
    (tmp_path / "stack.toml").write_text('[app]\nwsgi = "hello:application"\n' + extra)
    return profile.load(tmp_path, "dev", overrides, hostnames=["h"])


def test_a_user_that_does_not_exist_is_named_with_its_file_and_key(tmp_path: Path) -> None:
    loaded = load(tmp_path, '[server]\nuser = "no-such-user-here"\n')
    with pytest.raises(StackError) as e:
        plan(loaded, PROGRAMS)
    assert str(e.value).startswith(
        f"{tmp_path / 'stack.toml'}: server.user: 'no-such-user-here': no such user on this "
        "machine; create it (useradd --system"
    )


def test_unset_means_the_stack_directory_owner_for_root_and_oneself_for_others(
    tmp_path: Path,
) -> None:
    loaded = load(tmp_path)
    owner = pwd.getpwuid(tmp_path.stat().st_uid).pw_name
    assert service_user(loaded, 0).name == owner
    assert service_user(loaded, 65534).uid == 65534  # nobody, whoever owns the directory


def stack_for(tmp_path: Path, runner: int, user: ServiceUser, extra: str = "",
              overrides=()) -> Stack:  # fmt: skip
    loaded = load(tmp_path, extra, overrides)
    return dataclasses.replace(make_stack(tmp_path), profile=loaded, runner_uid=runner,
                               user=user)  # fmt: skip


ROOT = ServiceUser("root", 0, 0, "root")


def test_root_as_the_app_is_refused_unless_written(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"^server.user is not set, and root owns the stack "):
        check_service_user(stack_for(tmp_path, 0, ROOT))
    check_service_user(stack_for(tmp_path, 0, ROOT, overrides=[("server.user", "root")]))


def test_a_normal_user_cannot_name_another_user(tmp_path: Path) -> None:
    me = pwd.getpwuid(65534).pw_name  # nobody, not root: whoever runs this test
    with pytest.raises(StackError) as e:
        check_service_user(stack_for(tmp_path, 65534, SERVICE,
                                     overrides=[("server.user", "svc")]))  # fmt: skip
    assert str(e.value) == (
        f"command line: server.user: 'svc': you run stackctl as {me!r}, and only root can "
        f'start processes as another user; start the stack as root, or set server.user to "" '
        f"or {me!r} to run it as yourself"
    )


def test_a_service_user_in_roots_group_is_refused(tmp_path: Path) -> None:
    """uid 0 was refused, gid 0 was not: the app then ran with root's group."""
    in_root_group = ServiceUser("svc", 4242, 0, "root")
    with pytest.raises(StackError) as e:
        check_service_user(stack_for(tmp_path, 0, in_root_group,
                                     overrides=[("server.user", "svc")]))  # fmt: skip
    assert str(e.value).startswith(
        "command line: server.user: 'svc': 'svc' is in root's group (gid 0): the app's "
        "processes would get it too"
    )
    check_service_user(stack_for(tmp_path, 0, SERVICE, overrides=[("server.user", "svc")]))


@as_root
def test_root_takes_the_user_only_from_a_file_only_root_can_change(tmp_path: Path) -> None:
    stack = stack_for(tmp_path, 0, SERVICE, '[server]\nuser = "svc"\n')
    check_service_user(stack)  # root's file, in root's directory
    os.chown(tmp_path / "stack.toml", 4242, 4242)
    with pytest.raises(StackError, match="can be changed by a user other than root"):
        check_service_user(stack)
    os.chown(tmp_path / "stack.toml", 0, 0)
    (tmp_path / "stack.toml").chmod(0o664)
    with pytest.raises(StackError, match=r"\(owner uid 0, mode 664\)"):
        check_service_user(stack)


def test_the_watchers_that_run_the_app_get_the_users_uid_and_gid(tmp_path: Path) -> None:
    def watchers(stack: Stack) -> dict[str, tuple[str | None, str | None]]:
        ini = configparser.RawConfigParser()
        ini.read_string(files(stack)["circus.ini"])
        return {s: (ini[s].get("uid"), ini[s].get("gid")) for s in ini if s.startswith("watcher")}

    split = stack_for(tmp_path, 0, SERVICE, "[wsgi]\nautoreload = true\n")
    assert watchers(split) == {
        "watcher:redis": ("4242", "4343"),
        "watcher:wsgi": ("4242", "4343"),
        "watcher:ws": ("4242", "4343"),
        "watcher:nginx": (None, None),  # the master binds the port; its workers: `user`
        "watcher:autoreload": (None, None),  # talks to circusd's control socket
        "watcher:metrics": (None, None),  # so does the exporter
    }
    assert "\nuser svc svcgroup;\n" in files(split)["nginx.conf"]
    alone = dataclasses.replace(split, runner_uid=4242)
    assert set(watchers(alone).values()) == {(None, None)}


def test_the_pools_sockets_are_for_their_owner_and_group_only(tmp_path: Path) -> None:
    ini = configparser.RawConfigParser()
    ini.read_string(files(make_stack(tmp_path))["circus.ini"])
    for name in ("socket:wsgi", "socket:ws"):
        # Circus reads the umask as a decimal number.
        assert 0o777 & ~int(ini[name]["umask"]) == 0o660


@as_root
def test_root_makes_the_directories_for_the_service_user_to_read_and_one_to_write(
    tmp_path: Path,
) -> None:
    stack = dataclasses.replace(plan(load(tmp_path), PROGRAMS), runner_uid=0, user=SERVICE)
    generation.make_dirs(stack)

    def owner_and_mode(path: Path) -> tuple[int, int, int]:
        info = os.lstat(path)
        return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)

    for directory in (stack.private_dir, stack.run_dir, stack.log_dir, stack.nginx_temp_dir):
        assert owner_and_mode(directory) == (0, 4343, 0o2750), directory
    assert owner_and_mode(stack.service_dir) == (4242, 4343, 0o700)
    assert owner_and_mode(stack.secret_file) == (0, 4343, 0o640)
    # The same stack as root's own: back to private.
    alone = dataclasses.replace(stack, user=ROOT)
    generation.make_dirs(alone)
    assert owner_and_mode(stack.run_dir)[2] == 0o700
    assert owner_and_mode(stack.secret_file)[2] == 0o600
    assert owner_and_mode(stack.service_dir) == (0, 0, 0o700)


def test_an_existing_secret_gets_the_mode_and_group_and_a_linked_directory_is_refused(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "private" / "secret"
    realtime.ensure_secret(secret)
    key = secret.read_text()
    realtime.ensure_secret(secret, 0o640, os.getegid())
    assert secret.read_text() == key and stat.S_IMODE(secret.stat().st_mode) == 0o640
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StackError, match="is a symbolic link or not a directory"):
        realtime.ensure_secret(tmp_path / "linked" / "secret")
    assert not list((tmp_path / "elsewhere").iterdir())


def test_stale_marks_are_never_deleted_through_a_link(tmp_path: Path) -> None:
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "4194304").write_text("precious")  # named like a pid that no process has
    ready_dir(tmp_path).parent.mkdir()
    ready_dir(tmp_path).symlink_to(decoy)
    forget_dead_marks(tmp_path)
    assert (decoy / "4194304").read_text() == "precious"
    ready_dir(tmp_path).unlink()
    ready_dir(tmp_path).mkdir()
    (ready_dir(tmp_path) / "4194304").touch()
    (ready_dir(tmp_path) / str(os.getpid())).touch()
    forget_dead_marks(tmp_path)
    assert [p.name for p in ready_dir(tmp_path).iterdir()] == [str(os.getpid())]


@as_root
def test_what_the_user_cannot_reach_is_asked_of_the_kernel_as_that_user() -> None:
    nobody = pwd.getpwnam("nobody")
    user = ServiceUser("nobody", nobody.pw_uid, nobody.pw_gid, "")
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        closed, shared = base / "closed", base / "shared"
        closed.mkdir(mode=0o700)
        (closed / "app.py").write_text("")
        shared.mkdir(mode=0o755)
        (shared / "app.py").write_text("")
        asked = {Path("/bin/sh"): "run", closed: "read", closed / "app.py": "read",
                 shared: "read", shared / "app.py": "read", shared / "x": "write"}  # fmt: skip
        assert unreachable(user, asked) == [
            f"read:{closed}",
            f"read:{closed / 'app.py'}",
            f"write:{shared / 'x'}",
        ]
    finally:
        shutil.rmtree(base)


def test_init_writes_through_no_link_planted_in_the_stack_directory(tmp_path: Path) -> None:
    """Root may run init in a directory the app's user owns, who may have planted links."""
    from stackctl.init import init

    decoy, elsewhere, site = tmp_path / "shadow", tmp_path / "elsewhere", tmp_path / "site"
    decoy.write_text("precious")
    elsewhere.mkdir()
    site.mkdir()
    (site / ".stack.toml.tmp").symlink_to(decoy)
    init(site, demo=True, app=None, force=False)
    assert not (site / "stack.toml").is_symlink() and "[app]" in (site / "stack.toml").read_text()
    (site / "demo_app.py").unlink()
    (site / "demo_app.py").symlink_to(decoy)
    with pytest.raises(StackError, match=r"demo_app.py: cannot write it \("):
        init(site, demo=True, app=None, force=True)
    (site / "demo_app.py").unlink()
    shutil.rmtree(site / "static")
    (site / "static").symlink_to(elsewhere)
    with pytest.raises(StackError, match=r"static: cannot write in it \("):
        init(site, demo=True, app=None, force=True)
    assert decoy.read_text() == "precious" and not list(elsewhere.iterdir())


@as_root
@pytest.mark.parametrize(
    ("site_owner", "site_mode", "parent_owner", "parent_mode", "problem"),
    [
        (4242, 0o755, 0, 0o755, "owns or can write in the stack directory"),
        (0, 0o775, 0, 0o755, None),  # group root: not the user's
        (0, 0o757, 0, 0o755, "owns or can write in the stack directory"),
        (0, 0o755, 4242, 0o755, "can rename"),  # the user's parent: .../site renamed
        (0, 0o755, 0, 0o777, "can rename"),
        (0, 0o755, 0, 0o1777, None),  # like /tmp: only an entry's owner renames it
        (4242, 0o555, 0, 0o1777, "owns or can write in the stack directory"),  # chmod is theirs
        (0, 0o755, 0, 0o755, None),
    ],
)
def test_root_refuses_a_stack_directory_the_service_user_could_replace_parts_of(
    site_owner: int, site_mode: int, parent_owner: int, parent_mode: int, problem: str | None
) -> None:
    """A user who can rename .stackctl (or the stack directory) could have root's circusd and
    NGiNX follow links planted in a directory of its own put in its place."""
    top = Path(tempfile.mkdtemp(prefix="screname", dir="/tmp"))
    try:
        parent, site = top / "parent", top / "parent" / "site"
        site.mkdir(parents=True)
        for path, owner, mode in ((parent, parent_owner, parent_mode), (site, site_owner,
                                                                        site_mode)):  # fmt: skip
            os.chown(path, owner, 0)
            path.chmod(mode)
        stack = stack_for(site, 0, SERVICE, overrides=[("server.user", "svc")])
        if problem is None:
            check_service_user(stack)
        else:
            with pytest.raises(StackError) as e:
                check_service_user(stack)
            assert str(e.value).startswith(f"command line: server.user: 'svc': the app's "
                                           f"processes run as 'svc', who {problem}")
            assert f"in place of {site / '.stackctl'}" in str(e.value)
    finally:
        shutil.rmtree(top)


@as_root
def test_a_private_key_the_service_user_can_read_is_refused(tmp_path: Path) -> None:
    """NGiNX's master reads the key as root: nothing told that the app's user could too."""
    from stackctl.tls import Tls

    entry = pwd.getpwnam("nobody")
    nobody = ServiceUser("nobody", entry.pw_uid, entry.pw_gid, "nogroup")
    top = Path(tempfile.mkdtemp(prefix="sckey", dir="/tmp"))
    try:
        top.chmod(0o755)
        key = top / "site.key"
        key.write_text("-----BEGIN PRIVATE KEY-----\n")
        key.chmod(0o644)
        stack = dataclasses.replace(
            stack_for(tmp_path, 0, nobody, overrides=[("tls.certificate", "site.pem"),
                                                      ("tls.key", str(key))]),
            tls=Tls(top / "site.pem", key, digest="", ocsp=False),
        )  # fmt: skip
        with pytest.raises(StackError) as e:
            check_key_private(stack)
        assert str(e.value).startswith(
            f"command line: tls.key: {str(key)!r}: {key} can be read by 'nobody', who runs "
            "the app: a flaw in the app would give away the private key"
        )
        key.chmod(0o600)
        check_key_private(stack)
    finally:
        shutil.rmtree(top)
