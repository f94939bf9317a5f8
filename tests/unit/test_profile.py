"""Profile validation, precedence and the choice of a profile per host."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path

import pytest

from stackctl import profile, settings
from stackctl.errors import StackError
from stackctl.settings import REQUIRED, SECTION_TYPES, SETTINGS, Listen, Setting


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def stack_dir(tmp_path: Path) -> Path:
    write(tmp_path / "stack.toml", '[app]\nwsgi = "hello:application"\n[static]\ndir = ""\n')
    return tmp_path


def load(stack_dir: Path, name: str | None = "dev", overrides=(), hosts=("web1",)):
    return profile.load(stack_dir, name, list(overrides), hostnames=list(hosts))


def test_shipped_dev_profile_gives_defaults(stack_dir: Path) -> None:
    p = load(stack_dir)
    assert p.name == "dev"
    assert p.server.listen == Listen("127.0.0.1", 8000)
    assert p.wsgi.workers == "auto"
    assert p.ws.prefix == "/ws/"
    assert p.redis.url == "embedded"
    assert p.app.wsgi == "hello:application"


def test_prod_extends_base(stack_dir: Path) -> None:
    p = load(stack_dir, "prod")
    assert p.server.listen == Listen("0.0.0.0", 80)
    assert p.server.names == "_"  # from base.toml


def test_precedence_command_line_over_profile_over_stack_file_over_defaults(
    stack_dir: Path,
) -> None:
    write(
        stack_dir / "stack.toml",
        '[app]\nwsgi = "hello:application"\n'
        '[wsgi]\nthreads = 2\ngraceful_timeout = 7\n[static]\ndir = ""\n',
    )
    write(
        stack_dir / "profiles" / "web.toml", 'extends = "dev"\n[wsgi]\nthreads = 3\nworkers = 5\n'
    )
    p = load(stack_dir, "web", overrides=[("wsgi.workers", 9)])
    assert p.wsgi.workers == 9  # command line
    assert p.wsgi.threads == 3  # host profile over stack file
    assert p.wsgi.graceful_timeout == 7  # stack file over defaults
    assert p.wsgi.backlog == 1024  # default


def test_local_profile_may_extend_the_shipped_one_of_the_same_name(stack_dir: Path) -> None:
    write(
        stack_dir / "profiles" / "prod.toml",
        'extends = "prod"\n[server]\nlisten = "0.0.0.0:8080"\n',
    )
    p = load(stack_dir, "prod")
    assert p.server.listen.port == 8080
    assert p.server.max_body == "20m"  # from the shipped prod


def test_extends_loop_is_an_error(stack_dir: Path) -> None:
    write(stack_dir / "profiles" / "a.toml", 'extends = "b"\n')
    write(stack_dir / "profiles" / "b.toml", 'extends = "a"\n')
    with pytest.raises(StackError, match="loops back"):
        load(stack_dir, "a")


def test_unknown_profile_lists_known_ones(stack_dir: Path) -> None:
    with pytest.raises(
        StackError, match=r"no profile named 'nope'; known profiles: base, dev, prod"
    ):
        load(stack_dir, "nope")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[wsgi]\nworkers = -2\n",
            'wsgi.workers: expected a positive integer up to 512, or "auto", got -2',
        ),
        (
            '[server]\ndrain_seconds = "10s"\n',
            "server.drain_seconds: expected a whole number, 0 or more up to 600, got '10s'",
        ),
        (
            '[wsgi]\nworkers = "many"\n',
            "wsgi.workers: expected a positive integer up to 512, or \"auto\", got 'many'",
        ),
        ("[wsgi]\nworker = 4\n", "wsgi.worker: unknown key; did you mean wsgi.workers?"),
        ("[wsgii]\nworkers = 4\n", "wsgii: unknown section; did you mean wsgi?"),
        (
            "[wsgi]\nthreads = true\n",
            "wsgi.threads: expected a positive integer up to 256, got True",
        ),
        ('[server]\nlisten = "localhost"\n', "server.listen: expected HOST:PORT"),
        ('[server]\nlisten = "127.0.0.1:70000"\n', "server.listen: expected HOST:PORT"),
        # All-numeric "host names" are mistyped addresses.
        ('[server]\nlisten = "1.2.3.4.5:80"\n', "server.listen: expected HOST:PORT"),
        ('[server]\nlisten = "1.2.3:80"\n', "server.listen: expected HOST:PORT"),
        ('[server]\nlisten = "10.0.0.256:80"\n', "server.listen: expected HOST:PORT"),
        ('[ws]\nprefix = "ws"\n', 'ws.prefix: expected a URL path that starts and ends with "/"'),
        ('[redis]\nurl = "mysql://x"\n', 'redis.url: expected "embedded", redis://'),
        (
            '[ws]\nallowed_origins = "example.com"\n',
            'ws.allowed_origins: expected a list of origins such as ["https://example.com"], '
            "or [] for the site itself, got 'example.com'",
        ),
        ('[ws]\nclient_publish = ["a b"]\n', "ws.client_publish: expected a list of channel"),
        ("wsgi = 3\n", "wsgi: expected a table of settings, got 3"),
        # Values that would break out of the rendered configs.
        (
            '[server]\nlisten = "9151; location /x { alias /etc/; } listen 127.0.0.1:9150"\n',
            "server.listen: expected HOST:PORT, where HOST is a host name, an IP address",
        ),
        ('[server]\nlisten = "a b:80"\n', "server.listen: expected HOST:PORT"),
        ('[server]\nlisten = "[::1:80"\n', "server.listen: expected HOST:PORT"),
        ('[server]\nnames = "x; alias /etc/"\n', "server.names: expected host names"),
        ('[server]\nnames = "~^(.*)$"\n', "server.names: expected host names"),
        ('[server]\nnames = "a\\nb"\n', "server.names: expected host names"),
        ('[server]\nmax_body = "10m; alias /"\n', "server.max_body: expected a size"),
        ('[static]\ndir = "s; alias /etc"\n', "static.dir: expected a path without quotes"),
        ('[static]\ndir = "s}"\n', "static.dir: expected a path without quotes"),
        ('[static]\ndir = "s\\"x"\n', "static.dir: expected a path without quotes"),
        ('[static]\ndir = "$HOME"\n', "static.dir: expected a path without quotes"),
        ('[static]\ndir = "100%"\n', "static.dir: expected a path without quotes"),
        ('[paths]\nrun_dir = "a\\nb"\n', "paths.run_dir: expected a non-empty path without"),
        ('[paths]\nlog_dir = "l{x}"\n', "paths.log_dir: expected a non-empty path without"),
        # The run and log directories stay inside the stack directory.
        ('[paths]\nrun_dir = "/tmp/shared"\n', "paths.run_dir: expected a directory inside the"),
        ('[paths]\nlog_dir = "/var/log"\n', "paths.log_dir: expected a directory inside the"),
        ('[paths]\nrun_dir = "../run"\n', "paths.run_dir: expected a directory inside the"),
        ('[paths]\nlog_dir = "log/../../x"\n', "paths.log_dir: expected a directory inside"),
        ('[paths]\nrun_dir = "."\n', "paths.run_dir: expected a directory inside the stack"),
        ('[paths]\nrun_dir = "./"\n', "paths.run_dir: expected a directory inside the stack"),
        ('[static]\nurl = "/../"\n', "static.url: expected a URL path that starts and ends"),
        ('[redis]\nurl = "redis://"\n', 'redis.url: expected "embedded"'),
        ('[redis]\nurl = "redis://h:1/0\\n[x]"\n', 'redis.url: expected "embedded"'),
        ('[redis]\nurl = "redis://a;b:6379/0"\n', 'redis.url: expected "embedded"'),
        ('[redis]\nurl = "redisx://h"\n', 'redis.url: expected "embedded"'),
        ('[redis]\nurl = "redis://h:6379/$(x)"\n', 'redis.url: expected "embedded"'),
        ('[redis]\nurl = "unix://relative.sock"\n', 'redis.url: expected "embedded"'),
        ('[redis]\nurl = "unix:///r.sock?db=1;x{"\n', 'redis.url: expected "embedded"'),
        ('[redis]\nurl = "redis://h/0#frag"\n', 'redis.url: expected "embedded"'),
        (
            '[redis]\nurl = "redis://:hunter2@h:99999/0"\n',
            "got 'redis://:***@h:99999/0'",  # no password in an error message
        ),
        ('[ws]\nallowed_origins = ["https://a;b"]\n', "ws.allowed_origins: expected a list"),
        # Numbers have upper bounds.
        ("[wsgi]\nworkers = 100000\n", "wsgi.workers: expected a positive integer up to 512"),
        ("[wsgi]\nthreads = 5000\n", "wsgi.threads: expected a positive integer up to 256"),
        ("[server]\ntimeout = 999999\n", "server.timeout: expected a positive integer up to"),
        ("[wsgi]\ngraceful_timeout = 86401\n", "wsgi.graceful_timeout: expected a positive"),
        ("[wsgi]\nmax_rss_mb = 99999999999\n", "wsgi.max_rss_mb: expected a whole number"),
        ("[ws]\nmax_message = 99999999999\n", "ws.max_message: expected a positive integer"),
        ("[ws]\nmax_connections = 99999999\n", "ws.max_connections: expected a positive"),
        ("[ws]\nqueue_limit = 99999999\n", "ws.queue_limit: expected a positive integer"),
        ("[ws]\nhistory = 99999999\n", "ws.history: expected a positive integer up to"),
        ("[ws]\nping_interval = 99999999\n", "ws.ping_interval: expected a positive integer"),
        ("[ws]\ntoken_max_age = 99999999\n", "ws.token_max_age: expected a positive integer"),
        ("[ws]\nhistory_seconds = 99999999\n", "ws.history_seconds: expected a whole number"),
        ("[wsgi\n", "not valid TOML"),
    ],
)
def test_bad_profile_values_name_file_key_value_and_rule(
    stack_dir: Path, text: str, message: str
) -> None:
    path = write(stack_dir / "profiles" / "bad.toml", text)
    with pytest.raises(StackError) as error:
        load(stack_dir, "bad")
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_bad_app_in_stack_file(tmp_path: Path) -> None:
    write(tmp_path / "stack.toml", '[app]\nwsgi = "hello"\n')
    with pytest.raises(
        StackError, match=r'stack.toml: app.wsgi: expected an app as "package.module:callable"'
    ):
        load(tmp_path)


def test_missing_app_is_required(tmp_path: Path) -> None:
    write(tmp_path / "stack.toml", '[static]\ndir = ""\n')
    with pytest.raises(
        StackError, match=r"stack.toml: app.wsgi: required; set it there or pass --app"
    ):
        load(tmp_path)


def test_missing_stack_file_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"run `stackctl init`"):
        load(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["static.url=/ws/"],
            "command line: static.url: '/ws/' is the same as ws.prefix ('/ws/', from defaults); "
            "each URL prefix needs its own, and none may start with another: change one of them",
        ),
        (
            ["ws.sse_prefix=/ws/"],
            "command line: ws.sse_prefix: '/ws/' is the same as ws.prefix ('/ws/', from defaults)",
        ),
        (
            ["static.url=/ws/files/"],
            "command line: static.url: '/ws/files/' lies inside ws.prefix ('/ws/', from defaults)",
        ),
        (
            ["ws.poll_prefix=/static/poll/"],
            "command line: ws.poll_prefix: '/static/poll/' lies inside static.url ('/static/', "
            "from defaults)",
        ),
        (
            ["static.url=/_stackctl/"],
            "command line: static.url: '/_stackctl/' overlaps /_stackctl/, where stackctl serves "
            "its browser client; choose another prefix",
        ),
        (["ws.prefix=/_stackctl/ws/"], "command line: ws.prefix: '/_stackctl/ws/' overlaps"),
    ],
)
def test_url_prefixes_that_clash_are_refused_naming_both_keys(
    stack_dir: Path, overrides: list[str], message: str
) -> None:
    chosen = [profile.parse_override(o) for o in ["static.dir=static", *overrides]]
    with pytest.raises(StackError) as error:
        load(stack_dir, overrides=chosen)
    assert str(error.value).startswith(message)


def test_static_url_is_free_when_there_is_no_static_dir(stack_dir: Path) -> None:
    loaded = load(stack_dir, overrides=[profile.parse_override("static.url=/ws/")])
    assert loaded.static.url == "/ws/"


def test_bad_command_line_value_names_the_command_line(stack_dir: Path) -> None:
    with pytest.raises(StackError, match=r"^command line: wsgi.workers: expected a positive"):
        load(stack_dir, overrides=[profile.parse_override("wsgi.workers=0")])


def test_parse_override_reads_toml_values_and_falls_back_to_text() -> None:
    assert profile.parse_override("wsgi.workers=4") == ("wsgi.workers", 4)
    assert profile.parse_override("wsgi.workers=auto") == ("wsgi.workers", "auto")
    assert profile.parse_override("server.listen=127.0.0.1:9000") == (
        "server.listen",
        "127.0.0.1:9000",
    )
    with pytest.raises(StackError, match="expected KEY=VALUE"):
        profile.parse_override("wsgi.workers")


class TestChooseProfile:
    def exists(self, *names: str):
        return lambda name: name in names

    def test_explicit_profile_wins(self) -> None:
        choice = profile.choose_profile("prod", {"web*": "dev"}, ["web1"], self.exists())
        assert choice == profile.Choice("prod", "given with --profile")

    def test_first_matching_host_pattern_in_file_order(self) -> None:
        hosts = {"db*": "db", "web*.example.com": "prod", "web*": "staging"}
        choice = profile.choose_profile(None, hosts, ["web1", "web1.example.com"], self.exists())
        assert choice.name == "prod"
        assert "'web1.example.com' matches 'web*.example.com'" in choice.reason

    def test_patterns_ignore_case(self) -> None:
        assert (
            profile.choose_profile(None, {"WEB*": "prod"}, ["web2"], self.exists()).name == "prod"
        )

    def test_profile_named_after_host(self) -> None:
        choice = profile.choose_profile(None, {}, ["web1", "web1.example.com"], self.exists("web1"))
        assert choice.name == "web1"
        assert "named after host 'web1'" in choice.reason

    def test_dev_when_nothing_matches(self) -> None:
        choice = profile.choose_profile(None, {"db*": "db"}, ["laptop"], self.exists("web1"))
        assert choice.name == "dev"
        assert "host 'laptop'" in choice.reason

    def test_hosts_table_drives_load(self, stack_dir: Path) -> None:
        write(
            stack_dir / "stack.toml",
            '[app]\nwsgi = "hello:application"\n[static]\ndir = ""\n[hosts]\n"web*" = "prod"\n',
        )
        p = profile.load(stack_dir, None, [], hostnames=["web7"])
        assert (p.name, p.server.listen.port) == ("prod", 80)

    def test_bad_hosts_table(self, stack_dir: Path) -> None:
        write(stack_dir / "stack.toml", '[app]\nwsgi = "hello:application"\n[hosts]\n"web*" = 3\n')
        with pytest.raises(StackError, match=r"stack.toml: hosts: expected a table"):
            load(stack_dir)


def test_a_profile_that_sets_nothing_gets_parsed_defaults(stack_dir: Path) -> None:
    # Defaults skipped their parsers: server.listen stayed the string "127.0.0.1:8000" and
    # `up` crashed on listen.host for a profile that left it out.
    write(stack_dir / "profiles" / "bare.toml", 'extends = "base"\n')
    p = load(stack_dir, "bare")
    assert p.server.listen == Listen("127.0.0.1", 8000)
    assert p.ws.allowed_origins == ()
    assert p.source("server.listen") == "defaults"


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.default is not REQUIRED])
def test_every_default_passes_its_parser_into_the_declared_type(setting: Setting) -> None:
    section = SECTION_TYPES[setting.section]
    declared = typing.get_type_hints(section, globalns=vars(settings))[setting.field]
    value = setting.parse(setting.default)
    union = isinstance(declared, types.UnionType)
    allowed = typing.get_args(declared) if union else (declared,)
    assert isinstance(value, tuple(typing.get_origin(t) or t for t in allowed))


def test_the_model_is_the_declaration() -> None:
    # One declaration per key: the profile's section classes are the ones SETTINGS is read
    # from, with no field that is not a setting.
    assert profile.ServerConfig is settings.ServerConfig
    assert typing.get_type_hints(profile.Profile)["wsgi"] is settings.WsgiConfig
    for cls in SECTION_TYPES.values():
        assert all("setting" in f.metadata for f in dataclasses.fields(cls))
    assert [s.key for s in SETTINGS][:2] == ["server.listen", "server.names"]
    assert len(SETTINGS) == sum(len(dataclasses.fields(c)) for c in SECTION_TYPES.values())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[server]\nlisten = "[::1]:8080"\n', ("server.listen", Listen("::1", 8080))),
        ('[server]\nlisten = "*:8080"\n', ("server.listen", Listen("*", 8080))),
        (
            '[server]\nlisten = "web1.example.com:80"\n',
            ("server.listen", Listen("web1.example.com", 80)),
        ),
        (
            '[server]\nnames = "example.com *.example.com www.*"\n',
            ("server.names", "example.com *.example.com www.*"),
        ),
        (
            '[redis]\nurl = "redis://:p%40ss@db.internal:6380/2"\n',
            ("redis.url", "redis://:p%40ss@db.internal:6380/2"),
        ),
        (
            '[redis]\nurl = "unix:///run/redis/redis.sock"\n',
            ("redis.url", "unix:///run/redis/redis.sock"),
        ),
        (
            '[redis]\nurl = "rediss://db.internal/1?socket_timeout=5&ssl_cert_reqs=none"\n',
            ("redis.url", "rediss://db.internal/1?socket_timeout=5&ssl_cert_reqs=none"),
        ),
        ('[static]\ndir = "my static/files-1"\n', ("static.dir", "my static/files-1")),
    ],
)
def test_strict_values_still_accept_ordinary_ones(stack_dir: Path, text: str, expected) -> None:
    write(stack_dir / "profiles" / "ok.toml", text)
    key, value = expected
    section, name = key.split(".")
    assert getattr(getattr(load(stack_dir, "ok"), section), name) == value


def test_backlog_is_bounded_by_the_kernel_limit(stack_dir: Path) -> None:
    limit = int(Path("/proc/sys/net/core/somaxconn").read_text())
    write(stack_dir / "profiles" / "ok.toml", f"[wsgi]\nbacklog = {limit}\n")
    assert load(stack_dir, "ok").wsgi.backlog == limit
    path = write(stack_dir / "profiles" / "big.toml", "[wsgi]\nbacklog = 99999999999\n")
    with pytest.raises(StackError) as error:
        load(stack_dir, "big")
    assert str(error.value) == (
        f"{path}: wsgi.backlog: expected a positive integer up to {limit} (this kernel's limit, "
        "from /proc/sys/net/core/somaxconn; raise it with sysctl net.core.somaxconn first), "
        "got 99999999999"
    )


def test_a_stack_directory_that_would_break_the_configs_is_refused(tmp_path: Path) -> None:
    from stackctl.stack import plan
    from tests.unit.test_render import PROGRAMS

    stack_dir = tmp_path / "a;b"
    write(stack_dir / "stack.toml", '[app]\nwsgi = "hello:application"\n[static]\ndir = ""\n')
    with pytest.raises(StackError, match=r"the stack directory '.*a;b' cannot be written into"):
        plan(load(stack_dir), PROGRAMS)


@pytest.mark.parametrize("name", ["../../etc/evil", ".hidden", "a b", "x\ny"])
def test_a_profile_name_is_a_plain_file_name(stack_dir: Path, name: str) -> None:
    with pytest.raises(StackError, match="^profile: .* is not a profile name: letters, digits"):
        load(stack_dir, name)
    path = write(stack_dir / "profiles" / "web.toml", f"extends = {json.dumps(name)}\n")
    with pytest.raises(StackError, match=f"^{re.escape(str(path))}: extends: .* is not a profile"):
        load(stack_dir, "web")


def test_saved_settings_give_back_the_same_profile(stack_dir: Path) -> None:
    # What `down` and `status` use once the profile files no longer load.
    overrides = [("server.listen", "[::1]:8080"), ("ws.allowed_origins", ["https://a.example"]),
                 ("wsgi.workers", 3), ("tls.certificate", "self-signed")]  # fmt: skip
    started = load(stack_dir, "prod", overrides)
    saved = json.loads(json.dumps(profile.saved_values(started)))  # as state.json keeps them
    again = profile.from_saved_values(stack_dir, "prod", saved)
    assert dataclasses.replace(again, reason=started.reason) == started
    assert again.source("wsgi.workers") == profile.SAVED
    with pytest.raises(StackError, match=r"^the settings .*: wsgi\.workers: expected"):
        profile.from_saved_values(stack_dir, "prod", {**saved, "wsgi.workers": "many"})
