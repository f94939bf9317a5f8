"""Uploaded media: the keys, where media.dir may be, what init takes from Django, the NGiNX
location that serves it (read back by `nginx -t`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stackctl import generation, profile, stack
from stackctl.errors import StackError
from stackctl.init import AppFacts, media_root_problem, stack_file_text, url_prefix_of
from stackctl.render.nginx import MEDIA_CSP
from tests.unit.test_render import PROGRAMS

STACK = '[app]\nwsgi = "hello:application"\n[static]\ndir = "static"\n'


def load(stack_dir: Path, *overrides: str, extra: str = "") -> profile.Profile:
    (stack_dir / "stack.toml").write_text(STACK + extra)
    chosen = [profile.parse_override(o) for o in overrides]
    return profile.load(stack_dir, "dev", chosen, hostnames=["h"])


def test_media_is_off_by_default_and_its_url_free(tmp_path: Path) -> None:
    loaded = load(tmp_path, "media.url=/static/")
    assert (loaded.media.url, loaded.media.dir) == ("/static/", "")
    assert stack.plan(loaded, PROGRAMS).media_dir is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/static/", "command line: media.url: '/static/' is the same as static.url ('/static/'"),
        ("/static/up/", "command line: media.url: '/static/up/' lies inside static.url"),
        ("/ws/media/", "command line: media.url: '/ws/media/' lies inside ws.prefix ('/ws/'"),
        ("/events/", "command line: media.url: '/events/' is the same as ws.sse_prefix"),
        ("/_stackctl/", "command line: media.url: '/_stackctl/' overlaps /_stackctl/"),
    ],
)
def test_a_media_url_that_clashes_is_refused_naming_both_keys(
    tmp_path: Path, url: str, message: str
) -> None:
    with pytest.raises(StackError) as error:
        load(tmp_path, "media.dir=uploads", f"media.url={url}")
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("url", ["media/", "/media", "/../", "/a b/"])
def test_a_media_url_is_a_url_prefix(tmp_path: Path, url: str) -> None:
    with pytest.raises(StackError, match=r"^command line: media.url: expected a URL path"):
        load(tmp_path, f"media.url={url}")


@pytest.mark.parametrize(
    ("value", "relation", "what"),
    [
        (".", "is", "the stack directory"),
        ("..", "contains", "the stack directory"),
        (".stackctl", "is", "the stack's .stackctl directory"),
        (".stackctl/run/x", "is inside", "the stack's .stackctl directory"),
    ],
)
def test_media_dir_may_not_expose_the_stack(
    tmp_path: Path, value: str, relation: str, what: str
) -> None:
    with pytest.raises(StackError) as error:
        stack.plan(load(tmp_path, f"media.dir={value}"), PROGRAMS)
    resolved = (tmp_path / value).resolve()
    assert str(error.value).startswith(
        f"command line: media.dir: {value!r} resolves to {resolved}, which {relation} {what}"
    )
    assert 'Allowed: a directory of uploaded files only, such as "media"' in str(error.value)


@pytest.mark.parametrize(
    ("value", "relation"),
    [("static", "is"), ("static/uploads", "is inside"), (".", None)],
)
def test_media_and_static_dirs_may_not_overlap(
    tmp_path: Path, value: str, relation: str | None
) -> None:
    with pytest.raises(StackError) as error:
        stack.plan(load(tmp_path, f"media.dir={value}"), PROGRAMS)
    if relation:  # "." is refused first as the whole stack
        assert str(error.value).startswith(
            f"command line: media.dir: {value!r} resolves to {(tmp_path / value).resolve()}, "
            f"which {relation} static.dir ({tmp_path.resolve() / 'static'}, from "
        )
        assert "static and uploaded files each need a directory of their own" in str(error.value)


def test_media_dir_may_not_hold_the_static_dir(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"^command line: media.dir: 'up' resolves to .*, which "
                       r"contains static.dir \(.*/up/static, from command line\)"):  # fmt: skip
        stack.plan(load(tmp_path, "media.dir=up", "static.dir=up/static"), PROGRAMS)


def test_media_dir_outside_the_stack_is_refused_with_advice(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    with pytest.raises(StackError) as error:
        stack.plan(load(tmp_path / "site", "media.dir=../elsewhere"), PROGRAMS)
    assert str(error.value) == (
        f"command line: media.dir: '../elsewhere' resolves to {tmp_path / 'elsewhere'}, outside "
        f"the stack directory {tmp_path / 'site'}: NGiNX serves uploaded files only from "
        "inside the stack; keep uploaded files in a directory inside the stack, e.g. Django's "
        'MEDIA_ROOT = BASE_DIR / "media", and set media.dir to it ("media")'
    )


def test_media_dir_is_a_path_the_configs_can_hold(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"^command line: media.dir: expected a path without"):
        load(tmp_path, "media.dir=up; alias /etc")


def test_media_dir_may_be_missing_but_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "static").mkdir()
    planned = stack.plan(load(tmp_path, "media.dir=uploads"), PROGRAMS)
    generation.check_static(planned)  # no uploads yet: Django creates MEDIA_ROOT
    (tmp_path / "uploads").write_text("")
    with pytest.raises(StackError, match=r"^media.dir: 'uploads' resolves to .*, which is not a"):
        generation.check_static(planned)


def rendered_nginx(tmp_path: Path, *sets: str) -> str:
    planned = stack.plan(load(tmp_path, "media.dir=uploads", *sets), PROGRAMS)
    return {f.name: f.content for f in generation.render_all(planned)}["nginx.conf"]


def media_location(conf: str) -> str:
    location = conf[conf.index('location ^~ "/media/" {') :]
    return location[: location.index("\n        }\n")]


def test_nginx_serves_media_as_files_with_safe_headers(tmp_path: Path) -> None:
    location = media_location(rendered_nginx(tmp_path))
    assert f'alias "{tmp_path.resolve() / "uploads"}/";' in location
    # nosniff comes with the security headers, once; a location of its own headers would
    # otherwise drop them (HSTS, frame options).
    assert "include security_headers.conf;" in location
    assert "X-Content-Type-Options" not in location
    assert f'add_header Content-Security-Policy "{MEDIA_CSP}" always;' in location
    assert "add_header Content-Disposition $media_disposition always;" in location
    assert "location ~ /\\. {\n                return 404;" in location
    for never in ("uwsgi_pass", "proxy_pass", "try_files", "immutable", "autoindex on"):
        assert never not in location


def test_uploads_are_nosniff_even_when_the_profile_turns_the_header_off(tmp_path: Path) -> None:
    location = media_location(rendered_nginx(tmp_path, "headers.nosniff=false"))
    assert 'add_header X-Content-Type-Options "nosniff" always;' in location
    assert MEDIA_CSP.startswith("sandbox;") and "script-src" not in MEDIA_CSP
    assert "default-src 'none'" in MEDIA_CSP


def test_nginx_has_no_media_location_without_media_dir(tmp_path: Path) -> None:
    planned = stack.plan(load(tmp_path), PROGRAMS)
    conf = {f.name: f.content for f in generation.render_all(planned)}["nginx.conf"]
    assert "/media/" not in conf and "media_disposition" not in conf


def test_the_rendered_media_location_passes_nginx_t(tmp_path: Path) -> None:
    planned = stack.plan(load(tmp_path, "media.dir=uploads"), PROGRAMS)
    generation.make_dirs(planned)
    for file in generation.render_all(planned):
        (planned.run_dir / file.name).write_text(file.content)
    generation.check_nginx(planned, planned.nginx_conf)  # raises with nginx's complaint


class TestInitTakesDjangoMedia:
    def test_a_media_root_inside_the_project_is_taken(self, tmp_path: Path) -> None:
        assert media_root_problem(tmp_path, "/media/", str(tmp_path / "media")) == ""

    def test_no_media_root_is_no_problem(self, tmp_path: Path) -> None:
        assert media_root_problem(tmp_path, "/", "") == ""

    def test_a_media_root_outside_the_project_is_left_out_with_a_note(self, tmp_path: Path) -> None:
        note = media_root_problem(tmp_path, "/media/", "/var/uploads")
        assert note.startswith("MEDIA_ROOT is /var/uploads, outside the project")
        assert 'MEDIA_ROOT = BASE_DIR / "media"' in note

    def test_the_project_itself_is_refused(self, tmp_path: Path) -> None:
        note = media_root_problem(tmp_path, "/media/", str(tmp_path))
        assert note.startswith(f"MEDIA_ROOT is {tmp_path.resolve()}, which holds the whole")

    @pytest.mark.parametrize("url", ["https://cdn.example.com/m/", "//cdn.example.com/m/"])
    def test_media_on_another_server_is_not_served_here(self, tmp_path: Path, url: str) -> None:
        assert "on another server" in media_root_problem(tmp_path, url, str(tmp_path / "m"))

    def test_an_unset_media_url_says_so(self, tmp_path: Path) -> None:
        note = media_root_problem(tmp_path, "/", str(tmp_path / "media"))
        assert note.startswith("MEDIA_URL is not set")

    @pytest.mark.parametrize(
        ("django", "prefix"), [("/media/", "/media/"), ("uploads", "/uploads/"), ("/", "/m/")]
    )
    def test_url_prefix_of(self, django: str, prefix: str) -> None:
        assert url_prefix_of(django, "/m/") == prefix

    def test_the_stack_file_names_media(self, tmp_path: Path) -> None:
        text = stack_file_text(AppFacts(wsgi="a:b", media_url="/up/", media_dir="uploads"))
        (tmp_path / "stack.toml").write_text(text)
        loaded = profile.load(tmp_path, "dev", [], hostnames=["h"])
        assert (loaded.media.url, loaded.media.dir) == ("/up/", "uploads")
