"""The systemd unit of `stackctl service install`: its rendering, escaping and safe writing."""

from __future__ import annotations

import dataclasses
import os
import pwd
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stackctl import reload, service
from stackctl.errors import StackError
from stackctl.render import systemd
from stackctl.settings import Listen
from stackctl.stack import SPARE_FDS, Stack
from stackctl.supervisor import START_TIMEOUT, longest_stop
from tests.unit.test_render import make_stack


def at(stack: Stack, stack_dir: str) -> Stack:
    """The same stack, as if its directory were ``stack_dir`` (rendering reads no file there)."""
    return dataclasses.replace(
        stack, profile=dataclasses.replace(stack.profile, stack_dir=Path(stack_dir))
    )


def settings(content: str) -> dict[str, list[str]]:
    """Each setting of a unit file and its values, in order (comments and sections left out)."""
    found: dict[str, list[str]] = {}
    for line in content.splitlines():
        if line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def unit_args(line: str) -> list[str]:
    """A command line as systemd reads it, for the words unit_word writes."""
    return [word.replace("%%", "%").replace("$$", "$") for word in shlex.split(line)]


def test_unit_runs_up_in_the_foreground_with_reload_and_down(tmp_path: Path) -> None:
    stack = at(make_stack(tmp_path), "/srv/shop")
    unit = systemd.render(stack, systemd.Service("stackctl-shop", None, ("wsgi.workers=2",)))
    assert unit.name == "stackctl-shop.service"
    assert unit.content.startswith(service.WRITTEN_BY)
    values = settings(unit.content)
    python = sys.executable
    base = [python, "-P", "-m", "stackctl", "-C", "/srv/shop"]
    assert unit_args(values["ExecStart"][0]) == [
        *base,
        "up",
        "--profile=dev",
        "--set=wsgi.workers=2",
    ]
    assert unit_args(values["ExecReload"][0]) == [*base, "reload", "--profile=dev"]
    assert unit_args(values["ExecStop"][0]) == [*base, "down", "--profile=dev"]
    assert values["Type"] == ["notify"] and values["NotifyAccess"] == ["main"]
    assert values["KillMode"] == ["mixed"]
    assert values["Restart"] == ["on-failure"] and values["RestartSec"] == ["5"]
    assert values["WorkingDirectory"] == ["/srv/shop"]
    assert values["User"] == ["root"]
    stop = int(values["TimeoutStopSec"][0])
    assert stop >= longest_stop(stack.profile) + 10
    assert int(values["TimeoutStartSec"][0]) >= START_TIMEOUT + stop
    assert int(values["TimeoutStartSec"][0]) >= reload.longest(stack)  # ExecReload's limit too
    for option in ("NoNewPrivileges=yes", "ProtectSystem=full", "PrivateTmp=yes",
                   "ProtectHome=read-only"):  # fmt: skip
        key, value = option.split("=")
        assert values[key] == [value]
    assert values["WantedBy"] == ["multi-user.target"]


def on_port(stack: Stack, port: int) -> Stack:
    server = dataclasses.replace(stack.profile.server, listen=Listen("0.0.0.0", port))
    return dataclasses.replace(stack, profile=dataclasses.replace(stack.profile, server=server))


def limit_of(stack: Stack) -> int:
    return int(
        settings(systemd.render(stack, systemd.Service("x", None)).content)["LimitNOFILE"][0]
    )


def test_open_files_limit_follows_ws_max_connections(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert limit_of(make_stack(tmp_path / "a")) == 65536  # never below what a stack asks today
    many = make_stack(tmp_path / "b", "[ws]\nmax_connections = 100000\n")
    # NGiNX proxies each websocket with two descriptors, and keeps some for itself.
    assert limit_of(many) - SPARE_FDS >= 2 * 100000


def test_user_is_written_when_given(tmp_path: Path) -> None:
    unit = systemd.render(make_stack(tmp_path), systemd.Service("x", "shop"))
    assert settings(unit.content)["User"] == ["shop"]


def test_hardening_leaves_out_what_would_hide_the_stack(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    in_tmp = settings(systemd.render(at(stack, "/tmp/shop"), systemd.Service("x", None)).content)
    assert "PrivateTmp" not in in_tmp and in_tmp["ProtectHome"] == ["read-only"]
    at_home = settings(systemd.render(at(stack, "/home/ann/shop"), systemd.Service("x", None))
                       .content)  # fmt: skip
    assert "ProtectHome" not in at_home and at_home["PrivateTmp"] == ["yes"]
    with pytest.raises(StackError, match="read-only"):
        systemd.render(at(stack, "/usr/local/shop"), systemd.Service("x", None))


@pytest.mark.parametrize(
    ("word", "written"),
    [
        ("/srv/shop", "/srv/shop"),
        ("/srv/my shop", '"/srv/my shop"'),
        ("100%", "100%%"),
        ("$HOME", "$$HOME"),
        ('say "hi"', '"say \\"hi\\""'),
        ("a\\b", '"a\\\\b"'),
        (";", '";"'),
        ("", '""'),
    ],
)
def test_command_words_are_escaped_for_systemd(word: str, written: str) -> None:
    assert systemd.unit_word(word) == written
    assert unit_args(written) == [word]


@pytest.mark.parametrize("word", ["a\nExecStartPre=/bin/sh", "tab\there", "nul\0"])
def test_control_characters_are_refused(word: str) -> None:
    with pytest.raises(StackError, match="control character"):
        systemd.unit_word(word)


def test_working_directory_escapes_specifiers_and_refuses_backslashes() -> None:
    assert systemd.unit_path("dir", Path("/srv/50% off")) == "/srv/50%% off"
    with pytest.raises(StackError, match="backslash"):
        systemd.unit_path("dir", Path("/srv/a\\b"))
    with pytest.raises(StackError, match="control character"):
        systemd.unit_path("dir", Path("/srv/a\nUser=root"))


# --- names and users -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shop", "stackctl-shop", "shop_2.service"])
def test_good_unit_names(name: str) -> None:
    assert service.check_name(name) == name.removesuffix(".service")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../../etc/shadow",
        "a/b",
        "shop\nUser=root",
        "-shop",
        "shop@",
        "sh op",
        "a.b",
        ".service",
        "x" * 101,
        "shop.service.service",
    ],  # fmt: skip
)
def test_hostile_unit_names_are_refused(name: str) -> None:
    with pytest.raises(StackError, match="--name"):
        service.check_name(name)


def test_default_name_comes_from_the_stack_directory() -> None:
    assert service.default_name(Path("/srv/My Shop!")) == "stackctl-my-shop"
    with pytest.raises(StackError, match="--name"):
        service.default_name(Path("/srv/___"))


@pytest.mark.parametrize(
    "user",
    ["root\nExecStartPre=/bin/sh", "Root", "a b", "../x", "-rf", "x" * 33, "ann%h", ""],
)
def test_hostile_user_names_are_refused(tmp_path: Path, user: str) -> None:
    with pytest.raises(StackError, match="--user: .* is not a user name"):
        service.check_user(user, make_stack(tmp_path))


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a directory to another user: needs root")
def test_user_must_exist_own_the_stack_and_bind_its_port(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="no user 'nosuchuser9'"):
        service.check_user("nosuchuser9", make_stack(tmp_path))
    with pytest.raises(StackError, match="chown -R nobody"):
        service.check_user("nobody", make_stack(tmp_path))
    os.chown(tmp_path, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(StackError, match="privileged port"):
        service.check_user("nobody", on_port(make_stack(tmp_path), 80))
    assert service.check_user("nobody", make_stack(tmp_path)) == "nobody"


# --- writing and removing --------------------------------------------------------------------


def unit_file(content: str = "") -> systemd.File:
    return systemd.File("stackctl-shop.service", service.WRITTEN_BY + "\n" + content)


def test_unit_is_written_atomically_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stackctl-shop.service"
    assert service.write_unit(tmp_path, unit_file("one")) is False
    assert path.read_text().endswith("one") and (path.stat().st_mode & 0o777) == 0o644
    assert service.write_unit(tmp_path, unit_file("two")) is True
    assert path.read_text().endswith("two")
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left


def test_a_link_where_the_unit_goes_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "shadow"
    victim.write_text("secret")
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "stackctl-shop.service").symlink_to(victim)
    with pytest.raises(StackError, match="symbolic link"):
        service.write_unit(tmp_path / "units", unit_file())
    with pytest.raises(StackError, match="symbolic link"):
        service.uninstall(tmp_path, tmp_path / "units", "stackctl-shop")
    assert victim.read_text() == "secret"
    (tmp_path / "linked").symlink_to(tmp_path / "units")
    with pytest.raises(StackError, match="--unit-dir"):
        service.write_unit(tmp_path / "linked", unit_file())


def test_a_unit_stackctl_did_not_write_is_left_alone(tmp_path: Path) -> None:
    foreign = tmp_path / "stackctl-shop.service"
    foreign.write_text("[Service]\nExecStart=/bin/true\n")
    with pytest.raises(StackError, match="did not write it"):
        service.write_unit(tmp_path, unit_file())
    with pytest.raises(StackError, match="did not write it"):
        service.uninstall(Path("/srv/shop"), tmp_path, None)
    assert foreign.read_text() == "[Service]\nExecStart=/bin/true\n"


def test_notify_sends_to_systemds_socket_which_no_child_inherits(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = str(short_tmp / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        taken = service.take_notify_socket()
        assert taken == address and "NOTIFY_SOCKET" not in os.environ
        assert service.notify(taken, "READY=1") is None
        assert listener.recv(100) == b"READY=1"
    assert service.notify(None, "READY=1") is None  # not started by systemd: nothing to tell
    # Gone: said, not raised (the stack is up and stays up under `stackctl up`).
    assert "could not tell systemd" in str(service.notify(address, "READY=1"))


def test_with_systemd_running_install_reloads_it_and_uninstall_stops_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of the systemctl calls, seen by a stand-in for systemctl that records each
    call and whether the unit file existed at that moment."""
    units = tmp_path / "units"
    units.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "systemctl"
    unit = units / "stackctl-shop.service"
    fake.write_text(
        f'#!/bin/sh\necho "$* $([ -e {unit} ] && echo present || echo absent)" >> {calls}\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(service, "UNIT_DIR", units)
    monkeypatch.setattr(service, "systemd_running", lambda: True)
    stack = at(make_stack(tmp_path), "/srv/shop")

    lines = service.install(stack, units, None, None, ())
    assert calls.read_text().splitlines() == ["daemon-reload present"]
    assert "systemctl enable --now stackctl-shop.service" in lines[-1]
    lines = service.install(stack, units, None, None, ())
    assert lines[0].startswith(f"replaced {unit}")
    assert "systemctl restart stackctl-shop.service" in "\n".join(lines)
    calls.unlink()
    lines = service.uninstall(Path("/srv/shop"), units, None)
    assert calls.read_text().splitlines() == [
        "disable --now stackctl-shop.service present",  # stopped while its unit still exists
        "daemon-reload absent",
    ]
    assert lines == ["stopped and disabled stackctl-shop.service", f"removed {unit}"]


def test_the_units_stackctl_imports_nothing_from_the_stack_directory(tmp_path: Path) -> None:
    """systemd starts it as root in the stack directory (WorkingDirectory): with a plain
    `python -m`, the app's own secrets.py was imported in place of the standard library's."""
    marker = tmp_path / "imported"
    (tmp_path / "secrets.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    command = systemd.stackctl_command(at(make_stack(tmp_path), str(tmp_path)), "--version")
    ran = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert not marker.exists()


def test_systemd_waits_for_the_drain_before_it_kills(tmp_path: Path) -> None:
    quick = longest_stop(make_stack(tmp_path).profile)
    draining = make_stack(tmp_path, "[server]\ndrain_seconds = 120\n").profile
    assert longest_stop(draining) == quick + 120
