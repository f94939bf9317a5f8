"""[watchers.NAME]: parsed once into the typed profile, refused clearly when wrong, and
rendered into circus.ini sections that Circus reads back as exactly what was meant."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

import pytest
from circus.config import get_config

from stackctl import background, profile
from stackctl.broker import celery_broker_url, celery_settings
from stackctl.errors import StackError
from stackctl.render.circus import render
from stackctl.supervisor import stop_grace
from tests.unit.test_render import make_stack

CELERY = '[watchers.celery]\ncmd = "celery -A tasks worker --loglevel INFO"\n'


def load(tmp_path: Path, stack_toml: str, overrides: tuple[tuple[str, Any], ...] = ()):
    (tmp_path / "stack.toml").write_text('[app]\nwsgi = "hello:application"\n' + stack_toml)
    return profile.load(tmp_path, "dev", overrides, hostnames=["h"])


def test_a_watcher_gets_its_defaults_and_a_profile_may_change_one_key(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "prod.toml").write_text(
        'extends = "prod"\n[watchers.celery]\nnumprocesses = 3\nenv = { QUEUE = "slow" }\n'
    )
    (tmp_path / "stack.toml").write_text('[app]\nwsgi = "hello:application"\n' + CELERY)
    loaded = profile.load(tmp_path, "prod", [("watchers.celery.graceful_timeout", 90)])
    (celery,) = loaded.watchers
    assert celery == background.WatcherConfig(
        name="celery", cmd="celery -A tasks worker --loglevel INFO", numprocesses=3,
        stop_signal="TERM", graceful_timeout=90, env=(("QUEUE", "slow"),), working_dir="",
        role="wsgi",
    )  # fmt: skip
    assert loaded.source("watchers.celery.numprocesses").endswith("profiles/prod.toml")
    assert loaded.source("watchers.celery.graceful_timeout") == "command line"


def test_saved_settings_give_back_the_same_watchers(tmp_path: Path) -> None:
    loaded = load(tmp_path, CELERY + 'env = { A = "1", B = "two words" }\n')
    again = profile.from_saved_values(tmp_path, "dev", profile.saved_values(loaded))
    assert again.watchers == loaded.watchers


@pytest.mark.parametrize(
    ("toml", "wanted"),
    [
        ('[watchers.celery]\nnumprocesses = 2\n', "watchers.celery.cmd: required"),
        ('[watchers.redis]\ncmd = "x"\n', "'redis' is a name of the stack's own"),
        ('[watchers.nginx-access]\ncmd = "x"\n', "is a name of the stack's own"),
        ('[watchers.Celery]\ncmd = "x"\n', "'Celery' is not a watcher name"),
        ('[watchers."a/b"]\ncmd = "x"\n', "'a/b' is not a watcher name"),
        ('[watchers."x]\\n[watcher:evil"]\ncmd = "x"\n', "is not a watcher name"),
        ('[watchers.a]\ncmd = "x"\ncommand = "y"\n', "watchers.a.command: unknown key; did you "
         "mean cmd?"),
        ("[watchers]\na = 3\n", "expected a table of settings"),
        ('[watchers.a]\ncmd = ""\n', "watchers.a.cmd: expected a command line"),
        ('[watchers.a]\ncmd = "--loglevel INFO"\n', "starting with the program to run"),
        ("[watchers.a]\ncmd = '\"\" worker'\n", "starting with the program to run"),
        ("[watchers.a]\ncmd = '/ worker'\n", "starting with the program to run"),
        ('[watchers.a]\ncmd = "celery \'worker"\n', "does not split into words"),
        ('[watchers.a]\ncmd = "celery worker\\n[watcher:evil]\\ncmd = sh"\n',
         "expected a command line"),
        ('[watchers.a]\ncmd = "celery -n $(circus.wid)"\n', 'without "$"'),
        ('[watchers.a]\ncmd = "celery ((circus.wid))"\n', 'without "$", "((" or ";"'),
        ('[watchers.a]\ncmd = "celery worker ;comment"\n', 'without "$", "((" or ";"'),
        ('[watchers.a]\ncmd = "x"\nnumprocesses = -1\n', "watchers.a.numprocesses: expected a "
         "whole number, 0 or more up to 64, got -1"),
        ('[watchers.a]\ncmd = "x"\nnumprocesses = "2"\n', "numprocesses: expected"),
        ('[watchers.a]\ncmd = "x"\nstop_signal = "KILL"\n', 'stop_signal: expected one of "TERM"'),
        ('[watchers.a]\ncmd = "x"\ngraceful_timeout = 0\n', "graceful_timeout: expected a "
         "positive integer up to 3600, got 0"),
        ('[watchers.a]\ncmd = "x"\nenv = "A=1"\n', "env: expected a table of environment"),
        ('[watchers.a]\ncmd = "x"\nenv = { STACKCTL_REDIS_URL = "redis://evil" }\n',
         "STACKCTL_REDIS_URL is the stack's own"),
        ('[watchers.a]\ncmd = "x"\nenv = { PYTHONPATH = "/tmp" }\n', "PYTHONPATH is the stack's"),
        ('[watchers.a]\ncmd = "x"\nenv = { "A B" = "1" }\n', "'A B' is not a variable name"),
        ('[watchers.a]\ncmd = "x"\nenv = { A = "1\\nB = 2" }\n', "cannot be given to the program"),
        ('[watchers.a]\ncmd = "x"\nenv = { A = "$HOME" }\n', "cannot be given to the program"),
        ('[watchers.a]\ncmd = "x"\nenv = { A = 1 }\n', "cannot be given to the program"),
        ('[watchers.a]\ncmd = "x"\nenv = { A = " padded" }\n', "leading or trailing spaces"),
        ('[watchers.a]\ncmd = "x"\nworking_dir = "../elsewhere"\n', "working_dir: expected a "
         "directory inside the stack directory"),
        ('[watchers.a]\ncmd = "x"\nworking_dir = "/tmp"\n', "working_dir: expected a directory"),
        ('[watchers.a]\ncmd = "x"\nrole = "db"\n', 'role: expected one of "front"'),
    ],
)
def test_bad_watcher_values_name_the_file_key_value_and_rule(
    tmp_path: Path, toml: str, wanted: str
) -> None:
    with pytest.raises(StackError) as caught:
        load(tmp_path, toml)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "stack.toml")), message
    assert wanted in message


def test_a_bad_env_value_is_not_quoted_back(tmp_path: Path) -> None:
    with pytest.raises(StackError) as caught:
        load(tmp_path, CELERY + 'env = { API_KEY = "sk-live-$ecret" }\n')
    assert "the value of API_KEY cannot be given to the program" in str(caught.value)
    assert "ecret" not in str(caught.value)


def test_a_bad_watcher_key_on_the_command_line_names_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"^command line: watchers\.celery\.numprocesses: "):
        load(tmp_path, CELERY, (("watchers.celery.numprocesses", 100),))


def test_too_many_watchers_are_refused(tmp_path: Path) -> None:
    many = "".join(f'[watchers.w{i}]\ncmd = "x"\n' for i in range(background.MAX_WATCHERS + 1))
    with pytest.raises(StackError, match="at most 32"):
        load(tmp_path, many)


def circus_config(tmp_path: Path, stack_toml: str, **fields: Any) -> dict[str, Any]:
    stack = make_stack(tmp_path, stack_toml, **fields)
    (ini,) = [f for f in render(stack) if f.name == "circus.ini"]
    path = tmp_path / "circus.ini"
    path.write_text(ini.content)
    return get_config(str(path))


def test_circus_reads_back_the_watcher_as_declared_with_the_pools_environment(
    tmp_path: Path,
) -> None:
    toml = (
        '[watchers.celery]\ncmd = "celery -A tasks worker -n \'w 1@%h\'"\nnumprocesses = 2\n'
        'stop_signal = "INT"\ngraceful_timeout = 45\nworking_dir = "jobs"\n'
        'env = { QUEUES = "slow,fast", EMPTY = "" }\n'
    )
    (tmp_path / "jobs").mkdir()
    config = circus_config(tmp_path, toml)
    (celery,) = [w for w in config["watchers"] if w["name"] == "celery"]
    args = shlex.split(celery["cmd"])
    # Tied to circusd like every watcher, when setpriv is there; the program then the words.
    assert args[args.index("celery") :] == ["celery", "-A", "tasks", "worker", "-n", "w 1@%h"]
    assert celery["numprocesses"] == 2
    assert celery["stop_signal"] == 2  # SIGINT
    assert celery["graceful_timeout"] == 45
    assert celery["working_dir"] == str(tmp_path / "jobs")
    assert celery["stdout_stream"]["filename"] == str(tmp_path / "log" / "celery.log")
    env = celery["env"]
    assert env["QUEUES"] == "slow,fast" and env["EMPTY"] == ""
    for name in ("STACKCTL_REDIS_URL", "STACKCTL_SECRET_FILE", "PYTHONPATH"):
        assert env[name] == make_stack(tmp_path, toml).worker_env()[name]
    flapping = next(p for p in config["plugins"] if p["name"] == "plugin:flapping")
    assert flapping["also"] == "celery"
    two = circus_config(tmp_path, '[watchers.a]\ncmd = "x"\n[watchers.b]\ncmd = "y"\n')
    (flapping,) = [p for p in two["plugins"] if p["name"] == "plugin:flapping"]
    # Circus hands a plugin its options on a command line it splits at spaces.
    assert flapping["also"] == "a,b"


def test_root_runs_a_watcher_as_the_service_user_like_the_pool(tmp_path: Path) -> None:
    config = circus_config(tmp_path, CELERY, runner_uid=0)
    by_name = {w["name"]: w for w in config["watchers"]}
    assert (by_name["celery"]["uid"], by_name["celery"]["gid"]) == ("1000", "1000")
    assert (by_name["wsgi"]["uid"], by_name["wsgi"]["gid"]) == ("1000", "1000")


def test_a_watcher_of_another_role_or_without_processes_is_not_rendered(tmp_path: Path) -> None:
    config = circus_config(
        tmp_path,
        '[watchers.beat]\ncmd = "celery beat"\nrole = "redis"\n'
        '[watchers.off]\ncmd = "x"\nnumprocesses = 0\n'
        '[watchers.on]\ncmd = "x"\n',
    )
    names = [w["name"] for w in config["watchers"]]
    assert "on" in names and "beat" in names  # a single host runs every role
    assert "off" not in names
    # On a host of several, only the one whose role the host has.
    stack = make_stack(tmp_path, '[watchers.beat]\ncmd = "x"\nrole = "redis"\n'
                       '[watchers.on]\ncmd = "x"\n')  # fmt: skip
    host = dataclasses.replace(stack)
    object.__setattr__(host, "runs", lambda role: role != "redis")
    assert [w.name for w in background.on_this_host(host)] == ["on"]


def test_a_program_named_without_a_directory_is_the_one_beside_stackctls_python(
    tmp_path: Path,
) -> None:
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "celery").write_text("#!/bin/sh\n")
    python = str(venv / "python")
    assert background.program_path("celery", python) == str(venv / "celery")
    assert background.program_path("rq", python) == "rq"
    assert background.program_path("/usr/bin/celery", python) == "/usr/bin/celery"


def test_a_working_dir_that_is_not_there_is_refused_before_circus_would_fail(
    tmp_path: Path,
) -> None:
    with pytest.raises(StackError) as caught:
        circus_config(tmp_path, CELERY + 'working_dir = "jobs"\n')
    assert str(caught.value) == (
        f"{tmp_path / 'stack.toml'}: watchers.celery.working_dir: 'jobs': {tmp_path / 'jobs'} "
        'is not a directory; create it, or leave working_dir out (or "") to run in the stack '
        "directory"
    )


def test_up_notes_a_program_that_is_nowhere_to_be_found(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, '[watchers.gone]\ncmd = "no-such-program-here --x"\n'
                       '[watchers.sh]\ncmd = "sh -c true"\n')  # fmt: skip
    (line,) = background.missing_programs(stack)
    assert line.startswith(f"{tmp_path / 'stack.toml'}: watchers.gone.cmd: ")
    assert "no program 'no-such-program-here' here" in line


def test_the_stop_waits_for_the_longest_graceful_timeout(tmp_path: Path) -> None:
    loaded = load(tmp_path, CELERY + "graceful_timeout = 120\n")
    assert stop_grace(loaded) == 125


# --- the broker URL ----------------------------------------------------------------------------


def test_the_stacks_unix_socket_becomes_kombus_socket_url() -> None:
    assert celery_broker_url("unix:///s/run/redis.sock", "") == "redis+socket:///s/run/redis.sock"
    assert (celery_broker_url("unix:///s/redis.sock?db=2", "")
            == "redis+socket:///s/redis.sock?virtual_host=2")  # fmt: skip


def test_the_password_file_goes_into_the_url_and_kombu_masks_it() -> None:
    from kombu import Connection

    url = celery_broker_url("redis://10.0.0.5:6379/0", "p@ss/word")
    assert url == "redis://:p%40ss%2Fword@10.0.0.5:6379/0"
    connection = Connection(url)
    assert connection.password == "p@ss/word"
    assert "p%40ss" not in connection.as_uri() and "p@ss" not in connection.as_uri()
    socket_url = celery_broker_url("unix:///s/redis.sock", "secret")
    assert socket_url == "redis+socket://:secret@/s/redis.sock"
    assert "secret" not in Connection(socket_url).as_uri()
    # A password written in the URL itself wins, as for stackctl's own clients.
    assert celery_broker_url("redis://:mine@h:1/0", "file") == "redis://:mine@h:1/0"
    # A user name without one gets the file's.
    assert celery_broker_url("redis://app@h:1/0", "file") == "redis://app:file@h:1/0"


@pytest.mark.parametrize(
    ("url", "broker", "db"),
    [
        ("redis://10.0.0.5:6379?db=1&socket_timeout=5", "redis://10.0.0.5:6379/1", "1"),
        ("redis://:pw@10.0.0.5/0?socket_timeout=5", "redis://:pw@10.0.0.5/0", "0"),
        ("unix:///s/redis.sock?db=2&socket_timeout=5",
         "redis+socket:///s/redis.sock?virtual_host=2", "/"),
    ],
)
def test_a_redis_urls_options_become_kombus_transport_options(url: str, broker: str,
                                                               db: str) -> None:  # fmt: skip
    """redis.url accepts ?db=1&socket_timeout=5 as redis-py does; in kombu's URL they stopped
    the worker at start (Connection() got an unexpected keyword argument 'socket_timeout')."""
    from kombu import Connection

    settings = celery_settings(url, "")
    assert settings["broker_url"] == broker
    assert settings["broker_transport_options"] == {"socket_timeout": 5}
    connection = Connection(settings["broker_url"],
                            transport_options=settings["broker_transport_options"])  # fmt: skip
    assert connection.virtual_host == db


def test_a_rediss_broker_checks_the_servers_certificate_as_stackctls_clients_do() -> None:
    """kombu, given rediss:// and no ssl options, connects without checking the certificate
    (ssl_cert_reqs=CERT_NONE, with a mere warning), where redis-py requires a valid one."""
    import ssl

    from kombu import Connection

    settings = celery_settings("rediss://10.0.0.5:6380/0", "pw")
    assert settings["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    connection = Connection(settings["broker_url"], ssl=settings["broker_use_ssl"])
    assert connection.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    # Unless the URL says otherwise, as it would to stackctl's own clients.
    relaxed = celery_settings("rediss://10.0.0.5:6380/0?ssl_cert_reqs=none", "pw")
    assert relaxed["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert "broker_transport_options" not in relaxed
    assert "broker_use_ssl" not in celery_settings("redis://10.0.0.5:6379/0", "pw")


def test_sentinels_become_kombus_list_and_the_master_a_transport_option() -> None:
    settings = celery_settings("sentinel://10.0.0.5:26379,[fd00::6]:26379/main", "pw")
    assert settings == {
        "broker_url": "sentinel://:pw@10.0.0.5:26379;sentinel://:pw@[fd00::6]:26379",
        "broker_transport_options": {"master_name": "main",
                                     "sentinel_kwargs": {"password": "pw"}},
    }  # fmt: skip


def test_the_broker_is_found_from_the_workers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("from-file\n")
    monkeypatch.setenv("STACKCTL_REDIS_URL", "redis://127.0.0.1:6390/1")
    monkeypatch.setenv("STACKCTL_REDIS_PASSWORD_FILE", str(secret))
    assert celery_settings() == {"broker_url": "redis://:from-file@127.0.0.1:6390/1"}


def test_up_says_which_background_watchers_it_started(tmp_path: Path) -> None:
    from stackctl.cli import what_runs

    stack = make_stack(tmp_path, CELERY + 'numprocesses = 2\n[watchers.beat]\ncmd = "x"\n')
    assert "background: beat (1 process), celery (2 processes)" in what_runs(stack)


@pytest.mark.parametrize("stack_toml", ["", CELERY, CELERY + '[watchers.beat]\ncmd = "x"\n'])
def test_the_flapping_plugin_gets_every_option_as_circus_hands_them_over(
    tmp_path: Path, stack_toml: str
) -> None:
    from circus.plugins import _cfg2str, _str2cfg

    config = circus_config(tmp_path, stack_toml)
    (flapping,) = [p for p in config["plugins"] if p["name"] == "plugin:flapping"]
    # circusd starts a plugin with its options on a command line, split at spaces, each
    # "key:value" joined by ":::": an empty value there garbled the next key (log_dir).
    received = _str2cfg(shlex.split(f"--config {_cfg2str(flapping)}")[1])
    assert received == {key: str(value) for key, value in flapping.items()}
    assert received["log_dir"] == str(tmp_path / "log")
    assert received.get("also", "") == ",".join(sorted(
        name for name in ("beat", "celery") if f"[watchers.{name}]" in stack_toml))  # fmt: skip


def test_init_demo_writes_a_stack_file_that_runs_the_celery_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stackctl import init

    facts = init.init(tmp_path, demo=True, app=None, force=False)
    (celery,) = profile.load(tmp_path, "dev", [], hostnames=["h"]).watchers
    assert (celery.name, celery.cmd) == ("celery", init.DEMO_WORKER)
    assert (tmp_path / "demo_tasks.py").is_file()
    assert facts.notes == ()  # Celery is installed here
    # Without Celery, init says how to get it (the rest of the demo works without it).
    monkeypatch.setattr(init, "celery_installed", lambda: False)
    (note,) = init.init(tmp_path, demo=True, app=None, force=True).notes
    assert "pip install 'stackctl[demo]'" in note


def test_a_reload_names_a_watcher_that_comes_or_goes_not_each_of_its_options() -> None:
    from stackctl.reload import circus_differences, describe_differences

    old = ("[plugin:flapping]\nalso = old\n[watcher:wsgi]\nnumprocesses = 2\n"
           "[watcher:old]\ncmd = x\n[env:old]\nA = 1\n")  # fmt: skip
    new = ("[plugin:flapping]\nalso = tasks\n[watcher:wsgi]\nnumprocesses = 3\n"
           "[watcher:tasks]\ncmd = celery\nnumprocesses = 1\n[env:tasks]\nPYTHONPATH = /s\n")
    shown = describe_differences(old, new, circus_differences(old, new))
    assert shown == ["started tasks", "stopped old", "watcher:wsgi numprocesses"]
