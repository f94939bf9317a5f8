"""`stackctl service`: the unit it writes passes `systemd-analyze verify`, and its command
lines, run exactly as written, start, reload and stop a real stack."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import urllib.request
from pathlib import Path

import psutil
import pytest

from stackctl import processes
from tests.conftest import APP_AS_ROOT, free_port, stackctl
from tests.unit.test_systemd import settings, unit_args

pytestmark = pytest.mark.e2e

READY_PATIENCE = 120.0


def make_demo(root: Path) -> Path:
    stackctl("init", str(root / "shop"), "--demo", cwd=root)
    return root / "shop"


def verify(unit: Path) -> list[str]:
    """What `systemd-analyze verify` says about this unit.

    It loads the units ours names too (network-online.target, multi-user.target) and may
    report what it finds wrong with the machine's own: only lines that name ours count."""
    result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = (result.stdout + result.stderr).splitlines()
    ours = [line for line in lines if unit.name in line]
    assert result.returncode == 0 or lines, "verify failed without a word"
    return ours


def test_installed_unit_passes_systemd_analyze_verify_and_uninstall_removes_it(
    short_tmp: Path,
) -> None:
    stack_dir = make_demo(short_tmp)
    units = short_tmp / "units"
    units.mkdir()
    out = stackctl("service", "install", "--unit-dir", str(units), "--profile", "dev",
                   cwd=stack_dir).stdout  # fmt: skip
    unit = units / "stackctl-shop.service"
    assert f"wrote {unit}" in out
    assert "systemctl enable --now stackctl-shop.service" in out
    assert verify(unit) == []
    values = settings(unit.read_text())
    assert unit_args(values["ExecStart"][0])[-2:] == ["up", "--profile=dev"]

    # verify is no rubber stamp here: a relative ExecStart is what it exists to catch.
    broken = units / "broken.service"
    broken.write_text(unit.read_text().replace(values["ExecStart"][0], "python -m stackctl up"))
    assert any("broken.service" in line for line in verify(broken)), "verify saw nothing"
    broken.unlink()

    out = stackctl("service", "uninstall", "--unit-dir", str(units), cwd=stack_dir).stdout
    assert f"removed {unit}" in out and not unit.exists()
    assert "systemctl disable --now stackctl-shop.service" in out  # what to run where it ran
    again = stackctl("service", "uninstall", "--unit-dir", str(units), cwd=stack_dir).stdout
    assert "nothing to do" in again


@pytest.mark.parametrize(
    "option",
    [
        ("--name", "x\nExecStartPre=/bin/sh -c id"),
        ("--name", "../../../etc/passwd"),
        ("--name", "a b"),
        ("--user", "root\nUser=root"),
        ("--user", "nosuch-user-9"),
        ("--user", "$(id)"),
    ],  # fmt: skip
)
def test_hostile_names_and_users_are_refused(short_tmp: Path, option: tuple[str, str]) -> None:
    stack_dir = make_demo(short_tmp)
    units = short_tmp / "units"
    units.mkdir()
    result = stackctl("service", "install", "--unit-dir", str(units), *option,
                      cwd=stack_dir, check=False)  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"stackctl: {option[0]}: " in result.stderr
    assert os.listdir(units) == []


def receive_ready(listener: socket.socket, timeout: float) -> tuple[bytes, int]:
    """The next notification and the pid of the process that sent it (the kernel's word)."""
    listener.settimeout(timeout)
    creds = array.array("i", [0, 0, 0])  # struct ucred: pid, uid, gid
    message, ancillary, _, _ = listener.recvmsg(4096, socket.CMSG_SPACE(creds.itemsize * 3))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            creds = array.array("i", data[: creds.itemsize * 3])
    return message, creds[0]


def get_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(response.status)


# What the unit's sandbox does to the file system, as far as this machine lets a test do it, in
# a mount namespace of the service's own: ProtectSystem=full and ProtectHome=read-only bind the
# system's directories read-only; PrivateDevices=yes leaves a /dev of pseudo devices only.
# NoNewPrivileges=yes is setpriv's --no-new-privs.
SANDBOX = """
for d in /usr /boot /efi /etc /home /root; do
    if [ -d $d ]; then mount --bind -o ro $d $d; fi
done
mkdir "$OLD_DEV" && mount --rbind /dev "$OLD_DEV" && mount -t tmpfs -o mode=755 tmpfs /dev
for n in null zero full random urandom tty ptmx; do
    touch /dev/$n && mount --bind "$OLD_DEV/$n" /dev/$n
done
mkdir /dev/shm /dev/pts && mount --rbind "$OLD_DEV/shm" /dev/shm
mount --rbind "$OLD_DEV/pts" /dev/pts
ln -s /proc/self/fd /dev/fd && ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout && ln -s /proc/self/fd/2 /dev/stderr
umount -l "$OLD_DEV"
exec setpriv --no-new-privs "$@"
"""


UMASK = 0o077  # the unit's UMask=


def sandboxed(command: list[str]) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", SANDBOX, "sh",
            *command]  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace, as the unit has: needs root")
def test_unit_command_lines_start_reload_and_stop_a_real_stack(short_tmp: Path, no_leaks) -> None:
    stack_dir = make_demo(short_tmp)
    no_leaks(stack_dir)
    units = short_tmp / "units"
    units.mkdir()
    port = free_port()
    stackctl("service", "install", "--unit-dir", str(units), "--profile", "dev",
             "--set", f"server.listen=127.0.0.1:{port}", "--set", "wsgi.workers=2",
             *APP_AS_ROOT, cwd=stack_dir)  # fmt: skip
    values = settings((units / "stackctl-shop.service").read_text())
    assert values["WorkingDirectory"] == [str(stack_dir)]
    assert values["NoNewPrivileges"] == ["yes"] and values["ProtectSystem"] == ["full"]
    assert values["UMask"] == [f"{UMASK:04o}"] and values["PrivateDevices"] == ["yes"]
    start, reload, stop = (
        unit_args(values[key][0]) for key in ("ExecStart", "ExecReload", "ExecStop")
    )

    notify_path = str(short_tmp / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(notify_path)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        env = {**os.environ, "NOTIFY_SOCKET": notify_path, "OLD_DEV": str(short_tmp / "dev")}
        main = subprocess.Popen(sandboxed(start), cwd=stack_dir, env=env, text=True, umask=UMASK,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            message, sender = receive_ready(listener, READY_PATIENCE)
            # Type=notify with NotifyAccess=main: the main process itself says it is ready,
            # and only once the site answers.
            assert message == b"READY=1" and sender == main.pid
            assert get_status(f"http://127.0.0.1:{port}/") == 200
            found = processes.find((stack_dir / ".stackctl" / "run").resolve())
            assert found, "no process of the stack found"
            for proc in found:
                assert "NoNewPrivs:\t1" in Path(f"/proc/{proc.pid}/status").read_text()
                assert not os.path.samefile(f"/proc/{proc.pid}/root/dev", "/dev")  # its own

            reloaded = subprocess.run(reload, cwd=stack_dir, capture_output=True, text=True,
                                      umask=UMASK,
                                      timeout=int(values["TimeoutStartSec"][0]))  # fmt: skip
            assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
            assert "replaced" in reloaded.stdout
            assert get_status(f"http://127.0.0.1:{port}/") == 200

            stop_timeout = int(values["TimeoutStopSec"][0])
            stopped = subprocess.run(stop, cwd=stack_dir, capture_output=True, text=True,
                                     umask=UMASK,
                                     timeout=stop_timeout)  # fmt: skip
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            assert "stack stopped" in stopped.stdout
            # The main process ends by itself, with success: systemd records a clean stop,
            # and Restart=on-failure does not start it again.
            output, _ = main.communicate(timeout=stop_timeout)
            assert main.returncode == 0, output
            assert "circusd was stopped; stack stopped" in output
        finally:
            if main.poll() is None:
                main.terminate()  # `up` stops the stack in order on SIGTERM
                main.communicate(timeout=120)
    assert not psutil.pid_exists(main.pid) or psutil.Process(main.pid).status() == "zombie"


def test_main_process_fails_when_circusd_dies_so_systemd_restarts_it(
    short_tmp: Path, no_leaks
) -> None:
    stack_dir = make_demo(short_tmp)
    no_leaks(stack_dir)
    units = short_tmp / "units"
    units.mkdir()
    stackctl("service", "install", "--unit-dir", str(units),
             "--set", f"server.listen=127.0.0.1:{free_port()}", "--set", "wsgi.workers=1",
             *APP_AS_ROOT, cwd=stack_dir)  # fmt: skip
    values = settings((units / "stackctl-shop.service").read_text())
    assert values["Restart"] == ["on-failure"]
    notify_path = str(short_tmp / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(notify_path)
        env = {**os.environ, "NOTIFY_SOCKET": notify_path}
        start = unit_args(values["ExecStart"][0])
        main = subprocess.Popen(start, cwd=stack_dir, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            listener.settimeout(READY_PATIENCE)
            assert listener.recv(100) == b"READY=1"
            circusd = processes.circusd((stack_dir / ".stackctl" / "run").resolve())
            assert circusd is not None
            circusd.kill()
            output, _ = main.communicate(timeout=int(values["TimeoutStopSec"][0]))
            # A failure for systemd (Restart=on-failure starts the stack again), after `up`
            # cleaned up what circusd left.
            assert main.returncode != 0, output
            assert "circusd exited by itself" in output
        finally:
            if main.poll() is None:
                main.terminate()
                main.communicate(timeout=120)
