"""The service user, for real: root starts the stack, and only circusd and the NGiNX master
stay root; the app's processes run as a system user made for the test, who can neither change
what root acts on nor make root write through a link. And a normal user runs the whole stack
as themselves.

This run's interpreter may live under /root (0700), where no other user reaches: the stacks
here run from a virtualenv of the system's Python in /tmp, with uWSGI compiled against it, and
stackctl installed from this checkout (editable), so the code under test is this tree's.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from websockets.sync.client import connect

from stackctl import processes
from stackctl.errors import EXIT_STACK_ERROR
from stackctl.stack import Stack
from stackctl.supervisor import call
from stackctl.users import ServiceUser
from tests.conftest import data_of, free_port, stackctl
from tests.service_users import loaded, new_site, run, running_site, stopped_at_exit

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def split(python: Path, service_user: ServiceUser) -> Iterator[Stack]:
    """The demo, in a directory root keeps, started by root with server.user naming the
    service user on the command line."""
    site = new_site(python, None)
    user = f"server.user={service_user.name}"
    with running_site(
        python, site, "--listen", f"127.0.0.1:{free_port()}", "--workers", "2", "--set", user
    ) as stack:
        yield stack


def ids(pid: int) -> tuple[int, int]:
    """A process's effective uid and gid (its real ones too must match: checked by equality)."""
    proc = psutil.Process(pid)
    uids, gids = proc.uids(), proc.gids()
    assert uids.real == uids.effective and gids.real == gids.effective, (pid, uids, gids)
    return uids.effective, gids.effective


def test_only_circusd_and_the_nginx_master_run_as_root(
    split: Stack, service_user: ServiceUser
) -> None:
    circusd = processes.circusd(split.run_dir)
    assert circusd is not None and ids(circusd.pid) == (0, 0)
    pids = {name: [int(p) for p in call(split, "list", name=name)["pids"]]
            for name in ("nginx", "wsgi", "ws", "redis", "celery")}  # fmt: skip
    (master,) = pids["nginx"]
    assert ids(master) == (0, 0)
    workers = [child.pid for child in psutil.Process(master).children()]
    assert workers
    # The demo's Celery worker ([watchers.celery]) too runs as the service user.
    app = [*workers, *pids["wsgi"], *pids["ws"], *pids["redis"], *pids["celery"]]
    assert len(pids["wsgi"]) == 2 and len(pids["ws"]) == len(pids["redis"]) == 1
    assert len(pids["celery"]) == 1
    assert {pid: ids(pid) for pid in app} == {
        pid: (service_user.uid, service_user.gid) for pid in app
    }
    # And as `ps` shows them (user name, then the command's name).
    shown = subprocess.run(["ps", "-o", "user=", "-p", ",".join(map(str, app))],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert set(shown) == {service_user.name}


def test_the_exporter_runs_as_root_and_reads_what_the_app_processes_keep(split: Stack) -> None:
    (exporter,) = [int(p) for p in call(split, "list", name="metrics")["pids"]]
    assert ids(exporter) == (0, 0)  # it talks to circusd's control socket
    assert split.profile.metrics.listen is not None
    url = f"http://{split.profile.metrics.listen}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        page = answer.read().decode()
    # The uWSGI workers' files and the websocket worker's socket are the service user's.
    wanted = ("stackctl_wsgi_workers 2", "stackctl_ws_up 1", "stackctl_redis_up 1",
              "stackctl_circus_up 1", 'stackctl_watcher_processes{watcher="wsgi"} 2')  # fmt: skip
    for line in wanted:
        assert line in page.splitlines(), line


def test_the_site_answers_and_a_message_reaches_a_websocket(split: Stack) -> None:
    with urllib.request.urlopen(split.url(), timeout=10) as page:
        assert page.status == 200
    with connect(split.url().replace("http://", "ws://") + "ws/board", open_timeout=5) as ws:
        post = urllib.request.Request(split.url() + "post", data=b"message=from+the+app",
                                      headers={"Accept": "application/json"})  # fmt: skip
        with urllib.request.urlopen(post, timeout=10) as answer:
            assert answer.status == 200
        assert data_of(ws.recv(timeout=5)) == {"text": "from the app"}
        # The Celery worker, as the service user, reaches the same Redis and publishes.
        job = urllib.request.Request(split.url() + "job", data=b"",
                                     headers={"Accept": "application/json"})  # fmt: skip
        with urllib.request.urlopen(job, timeout=10) as answer:
            assert answer.status == 202
        assert data_of(ws.recv(timeout=30))["progress"] == 0  # type: ignore[index]


def mode_of(path: Path) -> tuple[int, int, str]:
    info = os.lstat(path)
    return info.st_uid, info.st_gid, oct(stat.S_IMODE(info.st_mode))


def test_root_keeps_the_directories_and_the_service_user_owns_only_its_own(
    split: Stack, service_user: ServiceUser
) -> None:
    u, g = service_user.uid, service_user.gid
    for directory in (split.run_dir, split.log_dir, split.private_dir):
        assert mode_of(directory) == (0, g, "0o2750"), directory
    assert mode_of(split.service_dir) == (u, g, "0o700")
    assert mode_of(split.secret_file) == (0, g, "0o640")
    for socket in (split.wsgi_socket, split.ws_socket):
        assert mode_of(socket) == (0, g, "0o660"), socket
    assert mode_of(split.redis_socket)[:2] == (u, g)
    assert mode_of(split.uwsgi_ini) == (0, g, "0o640")
    assert {p.name for p in split.service_dir.iterdir()} >= {"redis.sock", "ready"}


# What the service user tries against root's files; each line prints what happened.
ATTACKS = """
import json, os, socket, sys
run, log, private, decoy = sys.argv[1:5]
def attempt(what, action):
    try:
        action()
        results[what] = "done"
    except OSError as e:
        results[what] = type(e).__name__
def connect(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
results = {}
attempt("write a config", lambda: open(os.path.join(run, "circus.ini"), "a").close())
attempt("add a config", lambda: open(os.path.join(run, "extra.conf"), "w").close())
attempt("control circusd", lambda: connect(os.path.join(run, "circus.ctl")))
attempt("link the secret", lambda: os.symlink(decoy, os.path.join(private, "secret.new")))
attempt("link a log", lambda: os.symlink(decoy, os.path.join(log, "wsgi.log.1")))
attempt("replace a log", lambda: os.rename(os.path.join(log, "wsgi.log"), os.path.join(log, "x")))
attempt("reach the app", lambda: connect(os.path.join(run, "wsgi.sock")))
attempt("read the secret", lambda: open(os.path.join(private, "secret")).read())
print(json.dumps(results))
"""


def test_the_service_user_cannot_change_what_root_acts_on(
    split: Stack, service_user: ServiceUser, python: Path
) -> None:
    decoy_dir = Path(tempfile.mkdtemp(prefix="scdecoy", dir="/tmp"))  # 0700, root's
    try:
        decoy = decoy_dir / "shadow"
        decoy.write_text("precious\n")
        decoy.chmod(0o600)
        as_user = ["setpriv", f"--reuid={service_user.uid}", f"--regid={service_user.gid}",
                   "--init-groups", "--", str(python), "-c", ATTACKS, str(split.run_dir),
                   str(split.log_dir), str(split.private_dir), str(decoy)]  # fmt: skip
        tried = subprocess.run(as_user, capture_output=True, text=True, check=True, cwd="/")
        assert json.loads(tried.stdout) == {
            "write a config": "PermissionError",
            "add a config": "PermissionError",
            "control circusd": "PermissionError",
            "link the secret": "PermissionError",
            "link a log": "PermissionError",
            "replace a log": "PermissionError",
            "reach the app": "done",  # NGiNX's workers must, and they run as this user
            "read the secret": "done",  # the websocket worker checks tokens with it
        }
        run(python, "reload", cwd=split.stack_dir)  # root renders, replaces the workers
        assert decoy.read_text() == "precious\n"
        assert not (split.private_dir / "secret.new").exists()
    finally:
        shutil.rmtree(decoy_dir, ignore_errors=True)


def test_a_user_who_owns_the_stack_directory_cannot_make_root_act_as_they_wish(
    python: Path, service_user: ServiceUser
) -> None:
    site = new_site(python, service_user)  # the service user may edit stack.toml
    decoy_dir = Path(tempfile.mkdtemp(prefix="scdecoy", dir="/tmp"))
    try:
        with (site / "stack.toml").open("a") as f:
            f.write('\n[server]\nuser = "root"\n')
        listen = f"127.0.0.1:{free_port()}"
        refused = run(python, "up", "--detach", "--listen", listen, cwd=site, check=False)
        assert refused.returncode == EXIT_STACK_ERROR, refused.stdout + refused.stderr
        assert (
            f"{site / 'stack.toml'}: server.user: 'root': {site / 'stack.toml'} can be changed "
            f"by a user other than root (owner uid {service_user.uid}, mode 644)"
        ) in refused.stderr
        # Root's private directory, replaced by a link before root's first start.
        (decoy_dir / "secret").write_text("precious\n")
        os.symlink(decoy_dir, site / ".stackctl")
        refused = run(python, "up", "--detach", "--listen", listen, "--set", "server.user=",
                      cwd=site, check=False)  # fmt: skip
        assert refused.returncode == EXIT_STACK_ERROR
        assert f"{site / '.stackctl'} is a symbolic link" in refused.stderr
        assert sorted(p.name for p in decoy_dir.iterdir()) == ["secret"]
        assert (decoy_dir / "secret").read_text() == "precious\n"
        assert not processes.find(site / ".stackctl" / "run")
    finally:
        shutil.rmtree(site.parent, ignore_errors=True)
        shutil.rmtree(decoy_dir, ignore_errors=True)


def test_a_stack_directory_the_service_user_may_write_or_rename_is_refused(
    python: Path, service_user: ServiceUser
) -> None:
    """Such a user could rename .stackctl and put a directory of its own in its place while
    the stack runs: NGiNX's master (root) would reopen its access log there and give it to
    the user through a link planted at its name (it made a root-owned decoy the user's)."""
    site = new_site(python, service_user)  # the service user's own directory
    try:
        with stopped_at_exit(site / ".stackctl" / "run"):
            listen = f"127.0.0.1:{free_port()}"
            refused = run(python, "up", "--detach", "--listen", listen, cwd=site, check=False)
            assert refused.returncode == EXIT_STACK_ERROR, refused.stdout + refused.stderr
            assert refused.stderr.startswith(
                f"stackctl: defaults: server.user: '': the app's processes run as "
                f"{service_user.name!r}, who owns or can write in the stack directory {site}: "
                f"they could put a directory of their own in place of {site / '.stackctl'}"
            ), refused.stderr
            assert f"chown root: {site}" in refused.stderr
            assert not (site / ".stackctl").exists()
            # Root's directory, in one the user owns: renamed as easily.
            for path in [site, *site.rglob("*")]:
                os.chown(path, 0, 0, follow_symlinks=False)
            os.chown(site.parent, service_user.uid, service_user.gid)
            refused = run(python, "up", "--detach", "--listen", listen, "--set",
                          f"server.user={service_user.name}", cwd=site, check=False)  # fmt: skip
            assert refused.returncode == EXIT_STACK_ERROR, refused.stdout + refused.stderr
            assert f"who can rename {site} (in {site.parent}, which they own" in refused.stderr
            assert not (site / ".stackctl").exists()
    finally:
        shutil.rmtree(site.parent, ignore_errors=True)


def test_root_as_the_app_is_refused_unless_written_then_runs_as_root(python: Path) -> None:
    site = new_site(python, None)  # root's own stack directory
    try:
        with stopped_at_exit(site / ".stackctl" / "run"):
            listen = f"127.0.0.1:{free_port()}"
            refused = run(python, "up", "--detach", "--listen", listen, cwd=site, check=False)
            assert refused.returncode == EXIT_STACK_ERROR
            assert refused.stderr.startswith(
                f"stackctl: server.user is not set, and root owns the stack directory {site}: "
                "the app's workers, the websocket worker and Redis would run as root"
            ), refused.stderr
            assert "useradd --system" in refused.stderr and "chown" not in refused.stderr
            assert not (site / ".stackctl" / "run" / "circus.ini").exists()
            run(python, "up", "--detach", "--listen", listen, "--set", "server.user=root",
                cwd=site)  # fmt: skip
            stack = loaded(site)
            (wsgi, *_) = call(stack, "list", name="wsgi")["pids"]
            assert ids(int(wsgi)) == (0, 0)
            assert stat.S_IMODE(stack.run_dir.stat().st_mode) == 0o700
            run(python, "down", cwd=site)
    finally:
        shutil.rmtree(site.parent, ignore_errors=True)


def test_a_service_user_who_cannot_read_the_app_is_told_before_anything_starts(
    python: Path, service_user: ServiceUser
) -> None:
    site = new_site(python, None)
    site.parent.chmod(0o700)  # like an app under /root
    try:
        listen, user = f"127.0.0.1:{free_port()}", f"server.user={service_user.name}"
        refused = run(python, "up", "--detach", "--listen", listen, "--set", user, cwd=site,
                      check=False)  # fmt: skip
        assert refused.returncode == EXIT_STACK_ERROR
        assert refused.stderr == (
            f"stackctl: command line: server.user: {service_user.name!r}: the app's processes "
            f"run as {service_user.name!r}, who cannot reach what they need:\n"
            f"  cannot read {site}\n"
            f"  cannot read {site / '.stackctl' / 'run'}\n"
            f"  cannot write {site / '.stackctl' / 'run' / 'service'}\n"
            f"  cannot read {site / '.stackctl' / 'secret'}\n"
            f"  cannot read {site / 'static'}\n"  # NGiNX's workers serve it, as that user
            "Install stackctl and the app where that user can read them (e.g. python3 -m venv "
            "/opt/stackctl, and the app under /srv), not under /root, which is private to "
            "root; or give the user access (chmod o+rx, or chgrp "
            f"{service_user.group} and chmod g+rx, on every directory on the way)\n"
        )
        assert not processes.find(site / ".stackctl" / "run")
        assert not (site / ".stackctl" / "run" / "circus.ini").exists()
    finally:
        shutil.rmtree(site.parent, ignore_errors=True)


def test_a_normal_user_runs_the_whole_stack_as_themselves(
    python: Path, service_user: ServiceUser
) -> None:
    site = new_site(python, service_user)
    me = service_user
    try:
        with stopped_at_exit(site / ".stackctl" / "run"):
            port = free_port()
            run(python, "up", "--detach", "--listen", f"127.0.0.1:{port}", "--workers", "1",
                user=me, cwd=site)  # fmt: skip
            stack = loaded(site)
            with urllib.request.urlopen(stack.url(), timeout=10) as page:
                assert page.status == 200
            everything = processes.find(stack.run_dir)
            assert everything and {ids(p.pid) for p in everything} == {(me.uid, me.gid)}
            assert mode_of(stack.run_dir) == (me.uid, me.gid, "0o700")
            assert mode_of(stack.service_dir) == (me.uid, me.gid, "0o700")
            reloaded = run(python, "reload", user=me, cwd=site)
            assert "workers replaced" in reloaded.stdout
            with urllib.request.urlopen(stack.url(), timeout=10) as page:
                assert page.status == 200
            run(python, "down", user=me, cwd=site)
            assert not processes.find(stack.run_dir)
            other = run(python, "up", "--detach", "--listen", f"127.0.0.1:{port}",
                        "--set", "server.user=root", user=me, cwd=site, check=False)  # fmt: skip
            assert other.returncode == EXIT_STACK_ERROR
            assert "only root can start processes as another user" in other.stderr
    finally:
        shutil.rmtree(site.parent, ignore_errors=True)


def test_init_as_root_in_roots_directory_says_the_app_needs_a_user(short_tmp: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the note is for root")
    out = stackctl("init", str(short_tmp / "site"), "--demo", cwd=short_tmp).stdout
    assert "note: root owns this directory, and stackctl does not run an app as root" in out
