"""Bad input gets one clear message, a non-zero exit, and nothing left running."""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from stackctl import processes
from stackctl.errors import EXIT_STACK_ERROR
from tests.conftest import APP_AS_ROOT, free_port, stackctl, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def site(short_tmp: Path) -> Path:
    stackctl("init", str(short_tmp / "site"), "--demo", cwd=short_tmp)
    return short_tmp / "site"


def up_fails(site: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = stackctl(
        "up",
        "--detach",
        "--listen",
        f"127.0.0.1:{free_port()}",
        *args,
        cwd=site,
        env=env,
        check=False,
    )
    # A stack that starts when it should not is stopped before the test fails.
    left = processes.find((site / ".stackctl" / "run").resolve())
    processes.kill_all(left)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert "Traceback" not in result.stderr.split("\n", 1)[0]
    assert not left, "something was left running"
    return result.stderr


def test_unknown_key(site: Path) -> None:
    (site / "profiles").mkdir()
    (site / "profiles" / "dev.toml").write_text('extends = "dev"\n[wsgi]\nworker = 4\n')
    assert up_fails(site).strip() == (
        f"stackctl: {site / 'profiles' / 'dev.toml'}: "
        "wsgi.worker: unknown key; did you mean wsgi.workers?"
    )


def test_wrong_type(site: Path) -> None:
    with (site / "stack.toml").open("a") as f:
        f.write('\n[wsgi]\nthreads = "four"\n')
    assert up_fails(site).strip() == (
        f"stackctl: {site / 'stack.toml'}: wsgi.threads: expected a positive integer up to 256, "
        "got 'four'"
    )


def test_negative_worker_count(site: Path) -> None:
    assert up_fails(site, "--workers", "-2").strip() == (
        "stackctl: command line: wsgi.workers: expected a positive integer up to 512, "
        'or "auto", got -2'
    )


def test_port_in_use(site: Path) -> None:
    with closing(socket.socket()) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = stackctl("up", "--detach", "--listen", f"127.0.0.1:{port}", cwd=site, check=False)
    assert result.returncode == EXIT_STACK_ERROR
    assert (
        f"server.listen: 127.0.0.1:{port} is not available (Address already in use)"
        in result.stderr
    )
    assert not processes.find((site / ".stackctl" / "run").resolve())


def test_app_that_cannot_be_imported(site: Path) -> None:
    (site / "demo_app.py").write_text("import no_such_module\n")
    message = up_fails(site)
    assert message == (
        f"stackctl: app.wsgi: 'demo_app:application' cannot be imported from {site}:\n"
        "Traceback (most recent call last):\n"
        f'  File "{site / "demo_app.py"}", line 1, in <module>\n'
        "    import no_such_module\n"
        "ModuleNotFoundError: No module named 'no_such_module'\n"
    )  # the app's frames and the error: none of stackctl's or importlib's


def test_app_attribute_missing(site: Path) -> None:
    message = up_fails(site, "--app", "demo_app:nothing_here")
    assert "app.wsgi: 'demo_app:nothing_here' cannot be imported" in message
    assert "AttributeError" in message


def test_missing_static_directory(site: Path) -> None:
    shutil.rmtree(site / "static")
    message = up_fails(site)
    assert (
        f"static.dir: 'static' resolves to {site / 'static'}, which is not a directory" in message
    )


def test_app_crashing_at_start_is_reported_and_nothing_is_left(site: Path) -> None:
    # Imports fine in the check, crashes inside uWSGI: the flapping plugin stops the pool
    # after 5 crashes in a row, long before the timeout, and its error is in the report.
    (site / "demo_app.py").write_text(
        "try:\n    import uwsgi  # importable only inside a uWSGI worker\n"
        "except ImportError:\n    pass\nelse:\n    raise RuntimeError('boom at start')\n"
        "def application(environ, start_response):\n    return []\n"
    )
    message = up_fails(site, "--timeout", "60")
    assert "the stack did not start; nothing is left running" in message
    assert "wsgi: stopped after 5 crashes in a row at start" in message
    assert "RuntimeError: boom at start" in message


def test_a_profile_broken_while_running_refuses_reload_but_not_status_or_down(
    site: Path, no_leaks: Callable[[Path], None]
) -> None:
    no_leaks(site)
    port = free_port()
    stackctl("up", "--detach", "--listen", f"127.0.0.1:{port}", "--workers", "1", cwd=site)
    with (site / "stack.toml").open("a") as stack_file:
        stack_file.write('\n[ws]\nping_interval = "often"\n')  # a typo, since `up`
    refused = stackctl("reload", cwd=site, check=False)
    assert refused.returncode == EXIT_STACK_ERROR
    assert "ws.ping_interval: expected a positive integer" in refused.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
        assert page.status == 200  # still the running generation
    status = stackctl("status", cwd=site)  # it is healthy: exit 0
    assert "ws.ping_interval" in status.stderr
    assert "using the settings the running stack was started with" in status.stderr
    assert "wsgi" in status.stdout
    down = stackctl("down", cwd=site)
    assert "stack stopped" in down.stdout and "ws.ping_interval" in down.stderr
    assert not processes.find((site / ".stackctl" / "run").resolve())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()


def test_reload_refuses_a_listen_address_that_injects_nginx_config(
    site: Path, no_leaks: Callable[[Path], None]
) -> None:
    no_leaks(site)
    port, other = free_port(), free_port()
    stackctl("up", "--detach", "--listen", f"127.0.0.1:{port}", cwd=site)
    before = (site / ".stackctl" / "run" / "nginx.conf").read_text()
    hostile = f"{other}; location /x {{ alias /etc/; }} listen 127.0.0.1:{port}"
    result = stackctl("reload", "--listen", hostile, cwd=site, check=False)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert result.stderr.startswith(
        "stackctl: command line: server.listen: expected HOST:PORT, where HOST is a host name"
    )
    assert "Traceback" not in result.stderr
    assert (site / ".stackctl" / "run" / "nginx.conf").read_text() == before
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/x/hostname", timeout=10)
    answer.value.close()
    assert answer.value.code == 404  # the app's answer: no alias of /etc/
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", other), timeout=10).close()


def test_backlog_above_the_kernel_limit_is_refused_before_anything_starts(site: Path) -> None:
    limit = int(Path("/proc/sys/net/core/somaxconn").read_text())
    message = up_fails(site, "--set", "wsgi.backlog=99999999999")
    assert message.strip() == (
        f"stackctl: command line: wsgi.backlog: expected a positive integer up to {limit} "
        "(this kernel's limit, from /proc/sys/net/core/somaxconn; raise it with sysctl "
        "net.core.somaxconn first), got 99999999999"
    )


@pytest.mark.parametrize("static_dir", [".", "..", ".stackctl", ".stackctl/run"])
def test_static_dir_may_not_expose_the_stack(site: Path, static_dir: str) -> None:
    text = (site / "stack.toml").read_text()
    assert 'dir = "static"' in text
    (site / "stack.toml").write_text(text.replace('dir = "static"', f'dir = "{static_dir}"'))
    message = up_fails(site)
    assert message.startswith(
        f"stackctl: {site / 'stack.toml'}: static.dir: {static_dir!r} resolves to "
        f"{(site / static_dir).resolve()}, which "
    )
    assert "NGiNX would serve the stack's configs, logs or the key that signs tokens" in message
    assert 'Allowed: a directory of static files only, such as "static"' in message


@pytest.mark.parametrize("how", ["absolute", "relative", "symlink"])
def test_static_dir_outside_the_stack_is_refused(site: Path, how: str) -> None:
    # NGiNX's workers run as root for a root-owned stack: /etc would serve /etc/shadow.
    args: list[str] = []
    if how == "absolute":
        args, value, resolved = ["--set", "static.dir=/etc"], "/etc", Path("/etc")
    elif how == "relative":
        (site.parent / "elsewhere").mkdir()
        args, value = ["--set", "static.dir=../elsewhere"], "../elsewhere"
        resolved = site.parent / "elsewhere"
    else:
        shutil.rmtree(site / "static")
        (site / "static").symlink_to("/etc", target_is_directory=True)
        value, resolved = "static", Path("/etc")
    source = "command line" if args else str(site / "stack.toml")
    message = up_fails(site, *args)
    assert message == (
        f"stackctl: {source}: static.dir: {value!r} resolves to {resolved}, outside the stack "
        f"directory {site}: NGiNX serves static files only from inside the stack; collect the "
        "static files into a directory inside the stack, e.g. Django's STATIC_ROOT = BASE_DIR "
        '/ "staticfiles" with `manage.py collectstatic`, and set static.dir to it '
        '("staticfiles")\n'
    )


OWN_PREFIX = "; each URL prefix needs its own, and none may start with another: change one of them"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "1.2.3.4.5:80"], "server.listen: expected HOST:PORT, where HOST is a host "
         "name, an IP address ([::1] for IPv6) or *, and PORT is from 1 to 65535, e.g. "
         '"127.0.0.1:8000", got \'1.2.3.4.5:80\''),
        (["--set", "static.url=/ws/"],
         "static.url: '/ws/' is the same as ws.prefix ('/ws/', from defaults)" + OWN_PREFIX),
        (["--set", "static.url=/_stackctl/"], "static.url: '/_stackctl/' overlaps /_stackctl/, "
         "where stackctl serves its browser client; choose another prefix"),
        (["--set", "ws.sse_prefix=/ws/"],
         "ws.sse_prefix: '/ws/' is the same as ws.prefix ('/ws/', from defaults)" + OWN_PREFIX),
        (["--set", "ws.poll_prefix=/events/old/"], "ws.poll_prefix: '/events/old/' lies inside "
         "ws.sse_prefix ('/events/', from defaults)" + OWN_PREFIX),
    ],
)  # fmt: skip
def test_what_nginx_would_refuse_is_refused_first_naming_the_key(
    site: Path, args: list[str], message: str
) -> None:
    # -C after the command, as for every command: from elsewhere, naming the stack.
    result = stackctl("render", "-C", str(site), *args, cwd=site.parent, check=False)
    assert (result.returncode, result.stderr) == (
        EXIT_STACK_ERROR, f"stackctl: command line: {message}\n"
    ), result.stdout  # fmt: skip
    assert not (site / ".stackctl").exists()


def test_the_stack_directory_may_be_named_before_or_after_the_command(site: Path) -> None:
    after = stackctl("render", "-C", str(site), cwd=site.parent)
    assert f"wrote {site / '.stackctl' / 'run' / 'nginx.conf'}" in after.stdout
    before = stackctl("-C", str(site), "render", cwd=site.parent)
    assert before.stdout == after.stdout
    # Given twice, the one after the command wins, as with any option.
    both = stackctl("-C", str(site.parent), "render", "--stack", str(site), cwd=site.parent)
    assert both.stdout == after.stdout


def test_profile_that_only_extends_base_starts(
    site: Path, no_leaks: Callable[[Path], None]
) -> None:
    # Nothing sets server.listen, so its default (127.0.0.1:8000) is used: it crashed `up`
    # with an AttributeError before defaults went through their parsers. Port 8000 may be
    # taken on a shared machine; then the answer must be the clear one.
    (site / "profiles").mkdir()
    (site / "profiles" / "bare.toml").write_text('extends = "base"\n')
    no_leaks(site)
    result = stackctl("up", "--detach", "--profile", "bare", cwd=site, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 0:
        assert "stack up: http://127.0.0.1:8000/" in result.stdout
    else:
        assert result.returncode == EXIT_STACK_ERROR, result.stderr
        assert "server.listen: 127.0.0.1:8000 is not available" in result.stderr


def test_publish_with_the_stack_down_says_so_in_one_line(site: Path) -> None:
    result = stackctl("publish", "news", "hello", cwd=site, check=False)
    assert result.returncode == EXIT_STACK_ERROR
    assert result.stderr == f"stackctl: no stack running in {site}; start it with `stackctl up`\n"


def test_version_comes_from_the_package_metadata(site: Path) -> None:
    result = stackctl("--version", cwd=site)
    assert result.stdout == f"stackctl {importlib.metadata.version('stackctl')}\n"


NORMAL_USER = "stackctl-test"


@pytest.fixture
def normal_user() -> Iterator[tuple[int, int]]:
    """A user without privileges (created here if absent), as ``(uid, gid)``."""
    if os.geteuid() != 0:
        pytest.skip("creating a user and switching to it needs root; this run is not root")
    created = False
    try:
        info = pwd.getpwnam(NORMAL_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", NORMAL_USER], check=True)  # fmt: skip
        created = True
        info = pwd.getpwnam(NORMAL_USER)
    yield info.pw_uid, info.pw_gid
    if created:
        subprocess.run(["userdel", NORMAL_USER], check=False)


def as_user(user: tuple[int, int], site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``stackctl ARGS`` as ``user``, with a PATH that lacks /usr/sbin (a normal user's).

    The interpreter of this test run may live under /root (0700), so the user keeps one
    capability, to read and search directories; it gives no right to bind a port.
    """
    uid, gid = user
    path = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
    env = {"PATH": path, "HOME": str(site), "LANG": "C.UTF-8"}
    command = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
               sys.executable, "-m", "stackctl", *args]  # fmt: skip
    return subprocess.run(command, cwd=site, env=env, capture_output=True, text=True, timeout=120)


def test_a_normal_user_finds_nginx_in_sbin_and_is_told_about_privileged_ports(
    site: Path, normal_user: tuple[int, int]
) -> None:
    assert shutil.which("nginx", path="/usr/local/bin:/usr/bin:/bin") is None
    assert Path("/usr/sbin/nginx").is_file()
    for path in [site, *site.rglob("*")]:
        os.chown(path, *normal_user, follow_symlinks=False)
    rendered = as_user(normal_user, site, "render")
    assert rendered.returncode == 0, rendered.stderr  # nginx found in /usr/sbin, nginx -t ran
    assert (site / ".stackctl" / "run" / "nginx.conf").is_file()
    refused = as_user(normal_user, site, "up", "--detach", "--listen", "127.0.0.1:80")
    assert refused.returncode == EXIT_STACK_ERROR, refused.stdout + refused.stderr
    first = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    assert refused.stderr == (
        f"stackctl: command line: server.listen: 127.0.0.1:80 is a privileged port (below "
        f"{first}), which only root may listen on. Pick a port from {first} up, e.g. "
        "--listen 127.0.0.1:8080, and forward port 80 to it; or start the stack as root "
        "(the app's processes then run as server.user)\n"
    )
    assert not processes.find((site / ".stackctl" / "run").resolve())


@pytest.mark.parametrize("whose", ["root's stack", "the user's stack"])
def test_an_unwritable_run_dir_is_one_line_naming_the_key(
    site: Path, normal_user: tuple[int, int], whose: str
) -> None:
    uid = normal_user[0]
    if whose == "root's stack":
        unwritable, fix = site, "; make it writable for you, or run stackctl as the owner of "
        fix += "the stack directory (uid 0)"
    else:
        for path in [site, *site.rglob("*")]:
            os.chown(path, *normal_user, follow_symlinks=False)
        unwritable, fix = site / "locked", "; make it writable for you"
        unwritable.mkdir(mode=0o500)
        os.chown(unwritable, *normal_user)
    value = str(unwritable.relative_to(site) / "run").removeprefix("./")
    args = ["--set", f"paths.run_dir={value}"]
    for command in (["render", *args], ["up", "--detach", "--listen", "127.0.0.1:18999", *args]):
        result = as_user(normal_user, site, *command)
        assert (result.returncode, result.stderr) == (EXIT_STACK_ERROR, (
            f"stackctl: command line: paths.run_dir: {value!r}: {unwritable} is not writable "
            f"by you (uid {uid}){fix}\n"
        )), result.stdout  # fmt: skip
    assert not (site / ".stackctl").exists()


def test_a_run_dir_that_another_running_stack_owns_is_refused(
    short_tmp: Path, no_leaks: Callable[[Path], None]
) -> None:
    # A run directory stays inside its stack directory; a stack nested in another can still
    # be given the same one.
    first = short_tmp / "one"
    second = first / "inner"
    for site in (first, second):
        stackctl("init", str(site), "--demo", cwd=short_tmp)
        no_leaks(site)
    with (first / "stack.toml").open("a") as f:
        f.write('\n[paths]\nrun_dir = "inner/.stackctl/run"\n')
    port = free_port()
    stackctl("up", "--detach", "--listen", f"127.0.0.1:{port}", cwd=first)
    run_dir = second / ".stackctl" / "run"
    configs = {p.name: p.read_text() for p in run_dir.glob("*.ini")}
    assert configs
    expected = (
        f"stackctl: defaults: paths.run_dir: '.stackctl/run' resolves to {run_dir}, "
        f"which the stack running in {first} uses (circusd pid "
    )
    for command in (["up", "--detach", "--listen", f"127.0.0.1:{free_port()}"], ["render"],
                    ["down"], ["reload"]):  # fmt: skip
        result = stackctl(*command, cwd=second, check=False)
        assert result.returncode == EXIT_STACK_ERROR, (command, result.stdout, result.stderr)
        assert result.stderr.startswith(expected), (command, result.stderr)
        assert "this stack would overwrite its configs" in result.stderr
    assert {p.name: p.read_text() for p in run_dir.glob("*.ini")} == configs
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        assert response.status == 200  # the first stack still runs, untouched
    stackctl("status", cwd=first)  # and its owner still drives it


def modes(directory: Path) -> dict[str, int]:
    """The mode of a directory and of everything in it, by path: what stackctl may not touch."""
    return {str(p): p.lstat().st_mode for p in [directory, *directory.rglob("*")]}


@pytest.fixture
def shared(short_tmp: Path) -> Path:
    """A directory outside the stack that every user may write in, like /tmp."""
    directory = short_tmp / "shared"
    directory.mkdir()
    directory.chmod(0o1777)
    (directory / "someone-elses").write_text("x")
    return directory


REFUSED_OUTSIDE = "expected a directory inside the stack directory, relative to it"


@pytest.mark.parametrize("key", ["paths.run_dir", "paths.log_dir"])
@pytest.mark.parametrize("value", ["{shared}", "../shared", "sub/../../shared", "."])
def test_run_and_log_dirs_outside_the_stack_are_refused(
    site: Path, shared: Path, key: str, value: str
) -> None:
    before = modes(shared), modes(site)
    value = value.format(shared=shared)
    expected = (
        f"{key}: {REFUSED_OUTSIDE} (such as \".stackctl/run\"), without a leading \"/\" or "
        f"any \"..\" part, got {value!r}\n"
    )
    result = stackctl("render", "--set", f"{key}={value}", cwd=site, check=False)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert result.stderr == f"stackctl: command line: {expected}"
    # The same value in a stack file, rendered by someone else (root) from elsewhere.
    with (site / "stack.toml").open("a") as f:
        f.write(f'\n[paths]\n{key.split(".")[1]} = "{value}"\n')
    before = before[0], modes(site)
    result = stackctl("-C", str(site), "render", cwd=shared.parent, check=False)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert result.stderr == f"stackctl: {site / 'stack.toml'}: {expected}"
    assert (modes(shared), modes(site)) == before  # nothing written, nothing chmodded


@pytest.mark.parametrize(
    ("link", "key", "value"),
    [
        (".stackctl", "paths.run_dir", ".stackctl/run"),
        (".stackctl/run", "paths.run_dir", ".stackctl/run"),
        (".stackctl/log", "paths.log_dir", ".stackctl/log"),
        ("var", "paths.log_dir", "var/log"),
    ],
)
def test_a_symlink_on_the_way_to_the_run_or_log_dir_is_refused(
    site: Path, shared: Path, link: str, key: str, value: str
) -> None:
    (site / link).parent.mkdir(exist_ok=True)
    (site / link).symlink_to(shared, target_is_directory=True)
    before = modes(shared)
    args = ["--set", f"{key}={value}"] if link == "var" else []
    for command in ("render", "up"):
        result = stackctl(command, *args, cwd=site, check=False)
        assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
        source = "command line" if args else "defaults"
        assert result.stderr.startswith(
            f"stackctl: {source}: {key}: {value!r}: {site / link} is a symbolic link; stackctl "
            "keeps its files only in real directories of its own user inside the stack "
            "directory. Remove it"
        ), result.stderr
    assert modes(shared) == before  # nothing written there, its mode unchanged (1777)
    assert not processes.find(shared)


@pytest.mark.parametrize("whose", ["root's stack", "the user's stack"])
def test_a_run_dir_parent_of_another_user_is_refused(
    site: Path, normal_user: tuple[int, int], whose: str
) -> None:
    # A user who may write in the stack directory (theirs, or root's) makes .stackctl theirs:
    # root's stackctl may not write configs, or change modes, in it; nor open its logs where
    # that user could have left links.
    if whose == "the user's stack":
        os.chown(site, *normal_user)
    private = site / ".stackctl"
    private.mkdir(mode=0o755)
    (private / "log").mkdir(mode=0o755)
    os.chown(private, *normal_user)
    before = modes(private)
    result = stackctl("render", cwd=site, check=False)
    assert result.returncode == EXIT_STACK_ERROR, result.stdout + result.stderr
    assert result.stderr.startswith(
        f"stackctl: defaults: paths.run_dir: '.stackctl/run': {private} belongs to uid "
        f"{normal_user[0]}, not to you (uid 0); stackctl keeps its files only in real "
        "directories of its own user inside the stack directory. Remove it"
    ), result.stderr
    assert modes(private) == before


def test_an_existing_run_dir_of_the_stack_owner_is_made_private(site: Path) -> None:
    run_dir = site / ".stackctl" / "run"
    run_dir.mkdir(parents=True, mode=0o755)
    run_dir.chmod(0o755)
    stackctl("render", cwd=site)
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert (site / ".stackctl" / "log").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_while_the_stack_starts_stops_it(
    site: Path, no_leaks: Callable[[Path], None], signum: signal.Signals
) -> None:
    """Ctrl-C, or systemd stopping a unit that is still starting (SIGTERM): the stack goes
    too (on SIGTERM, it used to keep running, with nobody to stop it)."""
    no_leaks(site)
    up = subprocess.Popen(
        [sys.executable, "-m", "stackctl", "up", "--listen", f"127.0.0.1:{free_port()}",
         *APP_AS_ROOT],  # fmt: skip
        cwd=site,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # state.json is written just before circusd is started and waited for.
        state = site / ".stackctl" / "run" / "state.json"
        wait_for(lambda: state.exists() or up.poll() is not None, timeout=60,
                 what="up to start circusd")  # fmt: skip
        up.send_signal(signum)
        out, err = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
    assert up.returncode == 130, out + err
    assert "stack stopped" in out and "Traceback" not in err, out + err
    assert not processes.find((site / ".stackctl" / "run").resolve())
