"""The renderers' real output, read back with the parsers of the programs that consume it."""

from __future__ import annotations

import configparser
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from stackctl import generation, profile
from stackctl.errors import StackError
from stackctl.logstream import QuerylessLogStream, without_queries
from stackctl.render import (
    ini_env,
    ini_value,
    nginx_quote,
    redis_value,
    render_template,
    uwsgi_value,
)
from stackctl.stack import Programs, Stack
from stackctl.users import ServiceUser

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

PROGRAMS = Programs(
    nginx="/usr/sbin/nginx",
    uwsgi="/opt/bin/uwsgi",
    python="/opt/bin/python",
    redis_server="/usr/bin/redis-server",
)


def make_stack(tmp_path: Path, stack_toml: str = "", **fields) -> Stack:
    (tmp_path / "stack.toml").write_text('[app]\nwsgi = "hello:application"\n' + stack_toml)
    p = profile.load(tmp_path, "dev", [], hostnames=["h"])
    values = dict(
        profile=p,
        programs=PROGRAMS,
        workers=4,
        run_dir=tmp_path / "run",
        log_dir=tmp_path / "log",
        static_dir=tmp_path / "static",
        open_files=20000,
        user=ServiceUser("alice", 1000, 1000, "alice"),
        runner_uid=1000,
    )
    values.update(fields)
    return Stack(**values)


def files(stack: Stack) -> dict[str, str]:
    return {f.name: f.content for f in generation.render_all(stack)}


def circus_ini(stack: Stack) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    parser.read_string(files(stack)["circus.ini"])
    return parser


def test_circus_holds_the_sockets_and_hands_them_to_the_pools(tmp_path: Path) -> None:
    ini = circus_ini(make_stack(tmp_path))
    assert ini["socket:wsgi"]["path"] == str(tmp_path / "run" / "wsgi.sock")
    assert ini["socket:wsgi"]["backlog"] == "1024"
    wsgi = ini["watcher:wsgi"]
    assert wsgi["use_sockets"] == "True"
    assert wsgi["numprocesses"] == "4"
    assert wsgi["cmd"].endswith("--uwsgi-socket fd://$(circus.sockets.wsgi)")
    assert wsgi["stop_signal"] == "USR2"  # stackctl.graceful, then uWSGI's own graceful HUP
    ws = ini["watcher:ws"]
    assert ws["numprocesses"] == "1"
    assert ws["cmd"].startswith("/opt/bin/python -m stackctl.ws --prefix /ws/")
    assert ws["cmd"].endswith("--fd $(circus.sockets.ws)")
    assert ini["watcher:nginx"]["stop_signal"] == "QUIT"


def test_circus_control_endpoints_are_ipc_in_the_run_dir(tmp_path: Path) -> None:
    circus = circus_ini(make_stack(tmp_path))["circus"]
    for key in ("endpoint", "pubsub_endpoint"):
        assert circus[key].startswith(f"ipc://{tmp_path / 'run'}/")
    assert circus["multicast_endpoint"] == ""
    assert "stats_endpoint" not in circus


def test_watchers_start_redis_first_and_nginx_last(tmp_path: Path) -> None:
    ini = circus_ini(make_stack(tmp_path))
    priority = {
        name: int(ini[f"watcher:{name}"]["priority"]) for name in ("redis", "wsgi", "ws", "nginx")
    }
    assert priority["redis"] > priority["wsgi"] == priority["ws"] > priority["nginx"]


def test_workers_get_the_redis_url_and_the_cleanup_marker(tmp_path: Path) -> None:
    ini = circus_ini(make_stack(tmp_path))
    env = ini["env:wsgi"]
    assert env["STACKCTL_REDIS_URL"] == f"unix://{tmp_path / 'run' / 'service' / 'redis.sock'}"
    assert env["STACKCTL_RUN_DIR"] == str(tmp_path / "run")
    assert env["PYTHONPATH"] == str(tmp_path)


def test_dev_code_reload_is_one_watcher_that_watches_the_stack_but_not_its_run_dirs(
    tmp_path: Path,
) -> None:
    watcher = circus_ini(make_stack(tmp_path))["watcher:autoreload"]  # the dev profile
    assert watcher["cmd"] == (
        f"/opt/bin/python -I -u -m stackctl.autoreload {tmp_path} --endpoint ipc://{tmp_path}/run/"
        f"circus.ctl --ignore {tmp_path}/run --ignore {tmp_path}/log"
    )
    prod = dataclasses.replace(make_stack(tmp_path), profile=profile.load(tmp_path, "prod", []))
    assert not circus_ini(prod).has_section("watcher:autoreload")


def test_external_redis_has_no_redis_watcher(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, '[redis]\nurl = "redis://10.0.0.5:6379/1"\n')
    rendered = files(stack)
    assert "redis.conf" not in rendered
    ini = circus_ini(stack)
    assert not ini.has_section("watcher:redis")
    assert ini["env:ws"]["STACKCTL_REDIS_URL"] == "redis://10.0.0.5:6379/1"


def test_nginx_routes_static_websockets_and_the_pool(tmp_path: Path) -> None:
    conf = files(make_stack(tmp_path))["nginx.conf"]
    assert "listen 127.0.0.1:8000;" in conf
    assert 'location "/static/" {\n            alias "%s/";' % (tmp_path / "static") in conf
    for prefix in ("/ws/", "/events/", "/poll/"):
        assert f'location "{prefix}" {{\n            proxy_pass http://ws_worker;' in conf
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    assert f'server "unix:{tmp_path / "run" / "wsgi.sock"}";' in conf
    assert "uwsgi_pass wsgi_pool;" in conf
    assert "gzip on;" in conf
    assert "worker_rlimit_nofile 20000;" in conf


def test_nginx_without_static_dir_has_no_static_location(tmp_path: Path) -> None:
    conf = files(make_stack(tmp_path, static_dir=None))["nginx.conf"]
    assert 'location "/static/"' not in conf
    assert "location /_stackctl/" in conf  # realtime.js is stackctl's own, always served


def test_nginx_user_only_when_root_starts_it(tmp_path: Path) -> None:
    assert "\nuser " not in files(make_stack(tmp_path))["nginx.conf"]
    assert "\nuser alice alice;" in files(make_stack(tmp_path, runner_uid=0))["nginx.conf"]


def test_uwsgi_runs_one_masterless_worker_per_process(tmp_path: Path) -> None:
    text = files(make_stack(tmp_path, "[wsgi]\nthreads = 3\n"))["uwsgi.ini"]
    ini = configparser.RawConfigParser(strict=False)  # uWSGI repeats "env"
    ini.read_string(text)
    uwsgi = ini["uwsgi"]
    assert (uwsgi["master"], uwsgi["processes"], uwsgi["threads"]) == ("false", "1", "3")
    assert uwsgi["module"] == "stackctl.wsgi:application"
    assert "\nenv = STACKCTL_WSGI_APP=hello:application\n" in text
    assert f"\nharakiri = {61}\n" in text
    assert uwsgi["need-app"] == "true"
    assert uwsgi["listen"] == "1024"  # what uWSGI logs as its backlog: circusd's, wsgi.backlog
    assert uwsgi["chdir"] == str(tmp_path)


def test_redis_listens_on_a_unix_socket_only(tmp_path: Path) -> None:
    conf = files(make_stack(tmp_path))["redis.conf"]
    assert "port 0\n" in conf
    assert f'unixsocket "{tmp_path / "run" / "service" / "redis.sock"}"' in conf


def test_rendering_is_pure(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    assert generation.render_all(stack) == generation.render_all(stack)
    assert not (tmp_path / "run").exists()


def test_every_template_variable_must_be_given() -> None:
    with pytest.raises(jinja2.UndefinedError):
        render_template("uwsgi.ini.j2", profile="dev")


class TestEscaping:
    def test_nginx_quotes_and_escapes(self) -> None:
        assert nginx_quote('/srv/my "site"\\x') == '"/srv/my \\"site\\"\\\\x"'
        assert nginx_quote("/srv/with space") == '"/srv/with space"'

    @pytest.mark.parametrize("bad", ["/srv/$site", "/srv/a\nb"])
    def test_nginx_refuses_what_it_cannot_quote(self, bad: str) -> None:
        with pytest.raises(StackError, match="cannot be written into the NGiNX config"):
            nginx_quote(bad)

    def test_ini_refuses_line_breaks(self) -> None:
        assert ini_value("a b;c") == "a b;c"
        with pytest.raises(StackError, match="Circus"):
            ini_value("a\nb")

    def test_uwsgi_refuses_its_magic_characters(self) -> None:
        assert uwsgi_value("/srv/app") == "/srv/app"
        for bad in ("/srv/100%", "/srv/$(HOME)"):
            with pytest.raises(StackError, match="uWSGI"):
                uwsgi_value(bad)


HOSTILE = [
    '"; alias /etc/; "',
    'x\\"; alias /etc/; #',
    "} server { listen 9; ",
    "a;b{c}d#e'f",
]


class TestEscapingAgainstHostileValues:
    """Each filter against values written to break out of its syntax, read back by the program
    (or the parser) that consumes that syntax."""

    @pytest.mark.parametrize("value", HOSTILE)
    def test_nginx_reads_a_quoted_value_as_one_argument(self, tmp_path: Path, value: str) -> None:
        # default_type takes exactly one argument and alias is not allowed in http{}: a value
        # that broke out of its quotes would make `nginx -t` fail.
        conf = tmp_path / "nginx.conf"
        conf.write_text(
            f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
            f"http {{\n    default_type {nginx_quote(value)};\n}}\n"
        )

        def nginx(option: str) -> subprocess.CompletedProcess[str]:
            args = ["-q", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "e.log")]
            return subprocess.run([NGINX, option, *args], capture_output=True, text=True)

        result = nginx("-t")
        assert result.returncode == 0, result.stderr
        dumped = nginx("-T").stdout
        assert f"default_type {nginx_quote(value)};" in dumped

    @pytest.mark.parametrize("value", ["$request_uri", "a\nalias /etc/;", "a\rb", "a\0b"])
    def test_nginx_refuses_variables_and_line_breaks(self, value: str) -> None:
        with pytest.raises(StackError, match="cannot be written into the NGiNX config"):
            nginx_quote(value)

    @pytest.mark.parametrize("value", HOSTILE)
    def test_circus_ini_value_stays_one_value(self, value: str) -> None:
        from circus.config import DefaultConfigParser  # the parser circusd reads its ini with

        parser = DefaultConfigParser()
        parser.read_string(f"[watcher:x]\ncmd = {ini_value(value)}\n")
        assert parser.sections() == ["watcher:x"]
        assert parser.get("watcher:x", "cmd") == value.strip()

    @pytest.mark.parametrize("value", ["a\n[watcher:evil]\ncmd = rm -rf /", "a\rb", "x\0"])
    def test_circus_ini_refuses_line_breaks(self, value: str) -> None:
        with pytest.raises(StackError, match="Circus"):
            ini_value(value)

    def test_circus_env_cannot_add_a_section(self) -> None:
        with pytest.raises(StackError, match="Circus"):
            ini_env({"A": "1\n[watcher:evil]"})

    @pytest.mark.parametrize(
        "value", ["/srv/%(home)", "/srv/%d", "/srv/$(HOME)", "/srv/@(exec://id)\nx", "a\rb"]
    )
    def test_uwsgi_refuses_what_it_would_expand(self, value: str) -> None:
        with pytest.raises(StackError, match="uWSGI"):
            uwsgi_value(value)

    @pytest.mark.parametrize("value", HOSTILE)
    def test_uwsgi_reads_the_value_back_verbatim(self, tmp_path: Path, value: str) -> None:
        ini = tmp_path / "uwsgi.ini"
        ini.write_text(f"[uwsgi]\nchdir = {uwsgi_value(value)}\nbuffer-size = 8192\n")
        uwsgi = shutil.which("uwsgi") or str(Path(sys.executable).parent / "uwsgi")
        result = subprocess.run(
            [uwsgi, "--ini", str(ini), "--get", "chdir", "--get", "buffer-size"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.stdout.splitlines() == [value.strip(), "8192"], result.stderr

    @pytest.mark.parametrize("value", [*HOSTILE, 'a"b\\c', "x\\"])
    def test_redis_reads_a_quoted_value_as_one_argument(self, value: str) -> None:
        # Redis splits config lines the way its CLI does (sdssplitargs): shlex in POSIX mode
        # reads a double-quoted string with backslash escapes the same way.
        quoted = redis_value(value)
        assert shlex.split(f"unixsocket {quoted}") == ["unixsocket", value]

    @pytest.mark.parametrize("value", ["a\nport 6379", "a\rb", "a\0b"])
    def test_redis_refuses_line_breaks(self, value: str) -> None:
        with pytest.raises(StackError, match="Redis"):
            redis_value(value)


def test_stack_url_for_wildcard_listen(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    wildcard = dataclasses.replace(
        stack.profile,
        server=dataclasses.replace(stack.profile.server, listen=profile.Listen("0.0.0.0", 80)),
    )
    assert dataclasses.replace(stack, profile=wildcard).url() == "http://127.0.0.1:80/"


def test_every_watcher_dies_with_circusd_when_setpriv_is_there(tmp_path: Path) -> None:
    programs = dataclasses.replace(PROGRAMS, setpriv="/usr/bin/setpriv")
    ini = circus_ini(make_stack(tmp_path, programs=programs))
    for name in ("redis", "ws", "nginx"):
        assert ini[f"watcher:{name}"]["cmd"].startswith("/usr/bin/setpriv --pdeathsig TERM -- ")
    # uWSGI takes SIGTERM for a reload while it loads the app: only KILL ends it for sure.
    assert ini["watcher:wsgi"]["cmd"].startswith("/usr/bin/setpriv --pdeathsig KILL -- ")


def test_request_logs_have_paths_never_query_strings(tmp_path: Path) -> None:
    rendered = files(make_stack(tmp_path))
    nginx_conf = rendered["nginx.conf"]
    assert f'access_log "{tmp_path / "log" / "nginx-access.log"}" path_only;' in nginx_conf
    log_format = nginx_conf[nginx_conf.index("log_format path_only") :].split(";", 1)[0]
    assert '"$request_method $uri $server_protocol"' in log_format
    for leaky in ("$request ", "$request_uri", "$args", "$query_string", "$http_referer"):
        assert leaky not in log_format
    uwsgi_ini = rendered["uwsgi.ini"]
    log_line = next(line for line in uwsgi_ini.splitlines() if line.startswith("log-format"))
    assert "%(method) %(var.STACKCTL_LOG_PATH) %(proto)" in log_line
    assert "%(uri)" not in log_line and "%(referer)" not in log_line


class TestQuerylessStream:
    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (
                b'upstream timed out, client: 127.0.0.1, request: "GET /hang?token=abc HTTP/1.1",'
                b' referrer: "http://h/page?token=abc&x=1"',
                b'upstream timed out, client: 127.0.0.1, request: "GET /hang?[query removed] '
                b'HTTP/1.1", referrer: "http://h/page?[query removed]"',
            ),
            (b"GET /ws/news?token=x\n", b"GET /ws/news?[query removed]\n"),
            (b"nothing to hide? none\n", b"nothing to hide? none\n"),
            (
                b'upstream: "uwsgi://unix:/run/wsgi.sock:"\n',
                b'upstream: "uwsgi://unix:/run/wsgi.sock:"\n',
            ),
        ],
    )
    def test_query_strings_are_cut(self, line: bytes, expected: bytes) -> None:
        assert without_queries(line) == expected
        assert without_queries(line.decode()) == expected

    def test_the_stream_writes_what_it_cut(self, tmp_path: Path) -> None:
        stream = QuerylessLogStream(filename=str(tmp_path / "nginx.log"))
        stream({"data": b'request: "GET /?token=s3cret HTTP/1.1"\n', "pid": 1, "name": "x"})
        stream.close()
        assert (tmp_path / "nginx.log").read_text() == 'request: "GET /?[query removed] HTTP/1.1"\n'

    def test_nginx_writes_its_errors_to_the_stream(self, tmp_path: Path) -> None:
        stack = make_stack(tmp_path)
        assert "\nerror_log stderr warn;\n" in files(stack)["nginx.conf"]
        nginx = circus_ini(stack)["watcher:nginx"]
        for stream in ("stdout_stream", "stderr_stream"):
            assert nginx[f"{stream}.class"] == "stackctl.logstream.QuerylessLogStream"


def test_the_code_reload_run_by_root_imports_nothing_from_the_stack_directory(
    tmp_path: Path,
) -> None:
    """It runs as circusd's user (root) in the stack directory, with PYTHONPATH naming it:
    a module of the app's named like one of the standard library's was imported instead."""
    marker = tmp_path / "imported"
    (tmp_path / "argparse.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    words = shlex.split(circus_ini(make_stack(tmp_path))["watcher:autoreload"]["cmd"])
    command = [sys.executable, *words[words.index("/opt/bin/python") + 1 :], "--help"]
    ran = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert not marker.exists()


def test_nginx_answers_the_health_check_alone_only_while_the_host_drains(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    rendered = files(stack)
    assert rendered["nginx.conf"].count("include health.conf;") == 1  # no HTTPS: one server
    block = rendered["health.conf"]
    assert 'location = "/_stackctl/health" {' in block
    assert f'if (-f "{tmp_path / "run" / "draining"}") {{' in block
    assert 'return 503 "{\\"ok\\": false, \\"reason\\": \\"draining\\"}";' in block
    assert "uwsgi_param STACKCTL_HEALTH 1;" in block and "uwsgi_pass wsgi_pool;" in block
    # The health worker finds the realtime worker of its host; the websocket worker, which
    # does not answer checks, does not get the variable.
    ini = circus_ini(stack)
    assert ini["env:wsgi"]["STACKCTL_WS_HEALTH"] == f"{tmp_path / 'run' / 'ws.sock'} /ws/"
    assert "STACKCTL_WS_HEALTH" not in ini["env:ws"]
