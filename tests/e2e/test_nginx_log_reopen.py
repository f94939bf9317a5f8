"""NGiNX's access log rotated under requests when its workers run as another user, in the
directory model of a stack that root starts for a service user: the log directory belongs to
root, group of the service user, mode 0750 (the workers can reach it, not write in it)."""

from __future__ import annotations

import grp
import http.client
import os
import pwd
import shutil
import stat
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from stackctl.logfile import Limits, backups
from stackctl.logrotate import Rotator, open_files, process_tree
from tests.conftest import free_port, short_dir, wait_for

pytestmark = pytest.mark.e2e

WORKER_USER = "nobody"
CONFIG = """
daemon off;
master_process on;
worker_processes 2;
pid {root}/nginx.pid;
error_log stderr warn;
user {user} {group};
events {{ worker_connections 64; }}
http {{
    log_format tagged '$uri $status';
    access_log {log} tagged;
    client_body_temp_path {root}/temp;
    proxy_temp_path {root}/temp;
    fastcgi_temp_path {root}/temp;
    uwsgi_temp_path {root}/temp;
    scgi_temp_path {root}/temp;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok"; }}
    }}
}}
"""


@pytest.fixture
def nginx_as_another_user() -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    if os.geteuid() != 0:
        pytest.skip("NGiNX workers run as another user only when its master is root")
    worker = pwd.getpwnam(WORKER_USER)
    root = short_dir()
    root.chmod(0o755)  # the workers reach the log directory through it
    log_dir = root / "log"
    log_dir.mkdir(mode=0o750)
    os.chown(log_dir, 0, worker.pw_gid)
    port = free_port()
    conf = root / "nginx.conf"
    group = grp.getgrgid(worker.pw_gid).gr_name
    conf.write_text(CONFIG.format(root=root, user=WORKER_USER, group=group,
                                  log=log_dir / "nginx-access.log", port=port))  # fmt: skip
    nginx = shutil.which("nginx", path=f"{os.environ['PATH']}:/usr/sbin")
    assert nginx
    process = subprocess.Popen([nginx, "-p", str(root), "-c", str(conf), "-e", "/dev/null"])
    try:
        wait_for(lambda: answers(port), 15, "NGiNX")
        yield process, log_dir / "nginx-access.log", port
    finally:
        process.terminate()  # NGiNX's fast stop: the master takes its workers with it
        process.wait(timeout=15)
        shutil.rmtree(root, ignore_errors=True)


def answers(port: int, path: str = "/") -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.read() == b"ok" and response.status == 200
    except OSError:
        return False
    finally:
        conn.close()


def test_rotated_access_log_is_reopened_by_workers_of_another_user_losing_nothing(
    nginx_as_another_user: tuple[subprocess.Popen[bytes], Path, int],
) -> None:
    process, access, port = nginx_as_another_user
    rotator = Rotator(Limits(None, max_bytes=1, keep=10), reopened_by_itself=[],
                      reopened_on_signal=[access], master=lambda: process.pid)  # fmt: skip
    sent, failed = Counter[int](), []
    stop = threading.Event()

    def load() -> None:
        n = 0
        while not stop.is_set() and n < 20_000:
            if not answers(port, f"/r/{n}"):
                failed.append(n)
            sent[n] += 1
            n += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        for rotation in range(1, 4):
            wait_for(lambda: rotator.due(access), 15, "requests in the new log")
            rotator.check()
            assert len(backups(access)) == rotation
            # The master made the new file for the workers' user, and each worker reopened it.
            wait_for(lambda: access.exists() and access.stat().st_uid != 0, 15, "the new log")
            workers = process_tree(process.pid)[1:]
            now = (access.stat().st_dev, access.stat().st_ino)
            wait_for(lambda: all(now in open_files([w]) for w in workers), 15, "the reopen")  # noqa: B023
            wait_for(lambda: rotator.released(process.pid), 15, "NGiNX to let go of the old log")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failed
    owner = access.stat()
    assert owner.st_uid == pwd.getpwnam(WORKER_USER).pw_uid
    assert stat.S_IMODE(owner.st_mode) & 0o600 == 0o600
    # NGiNX logs a request once it has answered it.
    wait_for(lambda: set(logged(access)) >= set(sent), 15, "every request in the log")
    assert logged(access) == sent


def logged(access: Path) -> Counter[int]:
    found = Counter[int]()
    for path in [access, *backups(access)]:
        data = path.read_text()
        assert not data or data.endswith("\n")
        found.update(
            int(line.split()[0][3:]) for line in data.splitlines() if line.startswith("/r/")
        )
    return found
