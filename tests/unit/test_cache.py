"""The page cache's settings, its NGiNX config, and stackctl.cache's pure parts."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from stackctl import cache
from stackctl.errors import StackError
from stackctl.hooks import stop_orphaned_nginx_workers
from stackctl.render.nginx import session_regex
from stackctl.settings import CacheConfig, Invalid, cache_size, cookie_names, nginx_time
from tests.unit.test_render import files, make_stack

CACHED = "[cache]\nenabled = true\n"


def test_the_defaults_keep_nothing_and_name_djangos_cookies(tmp_path: Path) -> None:
    defaults = make_stack(tmp_path).profile.cache
    assert defaults == CacheConfig(False, "1g", "10m", ("sessionid", "csrftoken", "messages"))
    toml = CACHED + '[cache]\nsession_cookies = ["sid"]\n'.replace("[cache]\n", "")
    assert make_stack(tmp_path, toml).profile.cache.session_cookies == ("sid",)


@pytest.mark.parametrize("parse, bad", [
    (cache_size, "0"), (cache_size, "1t"), (cache_size, "1g;"), (cache_size, 1),
    (cache_size, "1g inactive=1s"),
    (nginx_time, "10"), (nginx_time, "0s"), (nginx_time, "1w"), (nginx_time, "1m; x"),
    (cookie_names, "sessionid"), (cookie_names, ["a;b"]), (cookie_names, ["a=b"]),
    (cookie_names, ["$x"]), (cookie_names, ["a b"]), (cookie_names, [""]),
])  # fmt: skip
def test_values_that_would_reach_nginx_conf_are_checked(parse, bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Invalid, match="expected"):
        parse(bad)


def test_the_session_regex_finds_a_cookie_by_its_whole_name() -> None:
    pattern = re.compile(session_regex(("sessionid", "my.sid"))[1:])  # without NGiNX's "~"
    for header in ("sessionid=1", "a=b; sessionid=1", "a=b;sessionid=", "my.sid=x",
                   "sessionid =1", "a=b; sessionid\t=1"):  # fmt: skip
        assert pattern.search(header), header
    for header in ("xsessionid=1", "a=sessionid", "myxsid=1", "sessionid2=1", ""):
        assert not pattern.search(header), header
    assert session_regex(()) == ""


def test_cache_disabled_renders_no_cache_lines(tmp_path: Path) -> None:
    rendered = files(make_stack(tmp_path))
    conf = rendered["nginx.conf"]
    for line in ("stackctl_pages", "cache.sock", "X-Cache-Status", "$stackctl_session"):
        assert line not in conf, line
    assert '"enabled": false' in rendered["cache.json"]


def test_cache_enabled_keeps_only_what_the_app_marks(tmp_path: Path) -> None:
    conf = files(make_stack(tmp_path, CACHED))["nginx.conf"]
    pages = tmp_path / "run" / "nginx-cache" / "pages"
    assert (f'uwsgi_cache_path "{pages}" levels=1:2 keys_zone=stackctl_pages:10m max_size=1g '
            "inactive=10m use_temp_path=off;") in conf  # fmt: skip
    assert "uwsgi_cache_valid " not in conf  # an unmarked answer is never kept
    assert "uwsgi_ignore_headers " not in conf  # Set-Cookie, Cache-Control: private... honoured
    assert "uwsgi_cache_key $scheme://$http_host$request_uri;" in conf
    bypass = "$http_authorization $stackctl_session $stackctl_cache_refresh"
    assert f"uwsgi_cache_bypass {bypass}\n{' ' * 31}$stackctl_other_host;" in conf
    no_cache = "$http_authorization $stackctl_session $stackctl_head $stackctl_unshared"
    assert f"uwsgi_no_cache {no_cache}\n{' ' * 27}$stackctl_other_host;" in conf
    assert "uwsgi_cache_lock on;" in conf
    assert "uwsgi_cache_use_stale updating error timeout http_500 http_503;" in conf
    assert f'listen "unix:{tmp_path / "run" / "cache.sock"}";' in conf
    # Only the pool's location: the realtime and static locations are untouched.
    pool = conf[conf.index("        location / {"):]
    assert conf.count("uwsgi_cache stackctl_pages;") == 1 and "uwsgi_cache stackctl_pages;" in pool


def test_a_cache_on_a_host_without_nginx_renders_nothing(tmp_path: Path) -> None:
    toml = CACHED + '[cluster]\nroles = ["wsgi", "ws", "redis"]\n'
    rendered = files(make_stack(tmp_path, toml))
    assert "nginx.conf" not in rendered and "cache.json" not in rendered


def target(tmp_path: Path, **changes: object) -> cache.Target:
    values: dict[str, object] = dict(
        enabled=True, socket=str(tmp_path / "cache.sock"), tls=False, scheme="http",
        host="example.com", port_suffix="", pages_dir=str(tmp_path / "pages"), timeout=60,
    )  # fmt: skip
    values.update(changes)
    return cache.Target(**values)  # type: ignore[arg-type]


def test_the_page_file_is_where_nginx_puts_it(tmp_path: Path) -> None:
    digest = hashlib.md5(b"http://example.com/news/?page=2").hexdigest()
    dirs, name = cache.cache_file(target(tmp_path), "/news/?page=2")
    assert (dirs, name) == ([digest[-1], digest[-3:-1]], digest)
    assert cache.host_headers(target(tmp_path), "::1") == ["[::1]"]  # as a client sends it
    # On another port than the default, a browser sends it, a load balancer may not.
    on_8000 = target(tmp_path, port_suffix=":8000")
    assert cache.host_headers(on_8000) == ["example.com:8000", "example.com"]
    assert cache.cache_key(on_8000, "/a") == "http://example.com:8000/a"


@pytest.mark.parametrize("path", ["/", "/news/?page=2&x=%2F", "/a;b=c:d@e/~f!$'()*+,"])
def test_paths_of_the_site_are_accepted(path: str) -> None:
    assert cache.check_path(path) == path


@pytest.mark.parametrize("path", [
    "", "news", "http://evil.example/", "//evil.example/", "/a\nb", "/a\r\nHost: x", "/a b",
    "/a#b", "/%", "/%2", "/%zz", "/é", "/a\0", "/" * 2 + "x", "/" + "a" * 4096, None, b"/",
])  # fmt: skip
def test_hostile_paths_are_refused(path: object) -> None:
    with pytest.raises(StackError, match="is not a path of the site"):
        cache.check_path(path)


def test_purge_removes_the_page_and_nothing_outside_the_cache(tmp_path: Path) -> None:
    where = target(tmp_path)
    dirs, name = cache.cache_file(where, "/x")
    page = Path(where.pages_dir, *dirs, name)
    page.parent.mkdir(parents=True)
    page.write_text("page")
    assert cache.purge_at(where, "/x") is True
    assert not page.exists()
    assert cache.purge_at(where, "/x") is False  # no page: nothing to do
    assert cache.purge_at(target(tmp_path, pages_dir=str(tmp_path / "none")), "/x") is False

    outside = tmp_path / "outside"
    (outside / dirs[1]).mkdir(parents=True)
    (outside / dirs[1] / name).write_text("keep")
    first = Path(where.pages_dir, dirs[0])
    page.parent.rmdir()
    first.rmdir()
    first.symlink_to(outside)
    with pytest.raises(StackError, match="nothing was deleted"):
        cache.purge_at(where, "/x")
    assert (outside / dirs[1] / name).read_text() == "keep"


def test_without_a_cache_the_calls_say_how_to_turn_it_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(StackError, match="cache.enabled = true"):
        cache.load_target(tmp_path)
    (tmp_path / cache.CACHE_FILE).write_text(target(tmp_path, enabled=False).to_json())
    with pytest.raises(StackError, match="cache.enabled = true"):
        cache.load_target(tmp_path)
    monkeypatch.delenv("STACKCTL_RUN_DIR", raising=False)
    with pytest.raises(StackError, match="stackctl cache refresh"):
        cache.refresh("/")


def test_a_dead_nginx_masters_refresh_socket_is_removed_before_the_next_one_binds(
    tmp_path: Path,
) -> None:
    stale = tmp_path / cache.CACHE_SOCKET
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(stale))  # left behind, as by a master that was killed
    watcher = SimpleNamespace(working_dir=str(tmp_path))
    pid_file = tmp_path / "nginx.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # a live master: its socket is its own
    assert stop_orphaned_nginx_workers(watcher, None, "before_spawn") is True
    assert stale.exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file.write_text(f"{dead.pid}\n")
    assert stop_orphaned_nginx_workers(watcher, None, "before_spawn") is True
    assert not stale.exists()
