"""Static files: the fingerprinted-name pattern (static.immutable) on its way into NGiNX's
config, and the compress-once pass over static.dir, which may run as root in a tree that the
app's user controls."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stackctl import profile
from stackctl.compress import compress_static, compress_tree, compressible_extensions
from stackctl.errors import StackError
from stackctl.render import nginx_regex
from stackctl.render.nginx import immutable_location
from stackctl.settings import DJANGO_MANIFEST_NAME, Invalid, file_name_pattern
from stackctl.stack import NO_PROGRAMS, plan

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

# What Django's ManifestStaticFilesStorage names its copies: the stem, a dot, the first 12 hex
# digits of the content's MD5, then the extension (the last one only) if there was one.
DJANGO_NAMES = [
    "/static/css/base.0123456789ab.css",
    "/static/admin/js/vendor/jquery/jquery.min.5f1e2d3c4b5a.js",
    "/static/fonts/icons.abcdef012345.woff2",
    "/static/robots.0123456789ab",
    "/static/app.js.0123456789ab.map",
]
PLAIN_NAMES = [
    "/static/css/base.css",
    "/static/base.0123456789a.css",  # 11 digits
    "/static/base.0123456789abc.css",  # 13 digits
    "/static/base.0123456789AB.css",  # Django writes lower case hex
    "/static/0123456789ab/base.css",  # a directory, not a name
    "/media/base.0123456789ab.css",  # not under static.url
]


def test_default_pattern_matches_django_manifest_names_only() -> None:
    location = re.compile(immutable_location("/static/", DJANGO_MANIFEST_NAME))
    assert [name for name in DJANGO_NAMES if not location.match(name)] == []
    assert [name for name in PLAIN_NAMES if location.match(name)] == []


def test_an_empty_pattern_renders_no_location() -> None:
    assert immutable_location("/static/", "") == ""


@pytest.mark.parametrize(
    "value",
    [
        "a$",  # an NGiNX variable, or the end anchor twice
        '"; alias /etc/; "',
        "a;b",
        "a b",
        "a\nb",
        "a#b",
        "a'b",
        "a`b",
        "{",
        "a{x}",
        "a{1,2}}",
        "[{]",
        "(?i)base",  # flags: PCRE and Python's re read some differently
        "(?P<n>x)",
        r"a\x41",  # escapes other than \d, \w and escaped punctuation
        r"a\Q.\E",
        r"a\{",
        "a\\",
        "x" * 201,
        5,
        None,
    ],
)
def test_pattern_refuses_what_nginx_could_read_as_syntax(value: object) -> None:
    with pytest.raises(Invalid, match="expected a regular expression for file names"):
        file_name_pattern(value)


@pytest.mark.parametrize(
    ("value", "nested"),
    [
        (r"(\w|\w)+[.-]", r"(\w|\w)+"),  # made NGiNX answer 500 after 90 ms per request
        (r"(\w+)+x", r"(\w+)+"),
        ("(a|aa)*b", "(a|aa)*"),
        ("x(?:(?:a+)b){2,}", "(?:(?:a+)b){2,}"),
        ("((ab)*c)+", "((ab)*c)+"),
    ],
)
def test_pattern_refuses_a_repeated_group_that_repeats_inside(value: str, nested: str) -> None:
    with pytest.raises(Invalid) as e:
        file_name_pattern(value)
    assert str(e.value).startswith(
        f"{value!r}: {nested!r} repeats a group that repeats or chooses inside"
    )


def test_pattern_must_compile() -> None:
    with pytest.raises(Invalid, match=r"'\(a' is not a regular expression \(missing \)"):
        file_name_pattern("(a")


@pytest.mark.parametrize(
    "value",
    ["", DJANGO_MANIFEST_NAME, r"[\w-]+\.[0-9a-f]{8,20}\.(css|js)", r"(?:app|vendor)\.\d+\.js",
     r"(?:[a-z]{2}_)+\w+\.[0-9a-f]{8}\.js", r"([(+*|])+x", r"(\.min)?(\.[^/]+){0,1}"],
)
def test_pattern_accepts_name_patterns(value: str) -> None:
    assert file_name_pattern(value) == value


def test_bad_pattern_in_a_profile_names_file_key_and_value(tmp_path: Path) -> None:
    (tmp_path / "stack.toml").write_text('[app]\nwsgi = "a:b"\n[static]\nimmutable = "x$"\n')
    with pytest.raises(StackError) as error:
        profile.load(tmp_path, "dev", [], hostnames=["h"])
    assert str(error.value).startswith(
        f"{tmp_path / 'stack.toml'}: static.immutable: expected a regular expression for file "
        "names, such as"
    )
    assert "got 'x$'" in str(error.value)


@pytest.mark.parametrize("value", ['a"b', "a\nb", "a;b", "a b", "a#b", "a'b", "a\0b"])
def test_the_regex_filter_refuses_what_it_cannot_render(value: str) -> None:
    with pytest.raises(StackError, match="cannot be written into the NGiNX config"):
        nginx_regex(value)


@pytest.mark.parametrize(
    "pattern", [DJANGO_MANIFEST_NAME, r"[\w-]+\.[0-9a-f]{8,20}\.(css|js)", r"(?:app|v)\.\d+\.js"]
)
def test_nginx_reads_the_location_as_the_regex_that_was_checked(
    tmp_path: Path, pattern: str
) -> None:
    regex = immutable_location("/static/", pattern)
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{ server {{ location ~ {nginx_regex(regex)} {{ return 204; }} }} }}\n"
    )
    args = ["-q", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "e.log")]
    checked = subprocess.run([NGINX, "-t", *args], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    # NGiNX's dump is the file as written; the quoted string, unescaped, is the regex.
    dumped = subprocess.run([NGINX, "-T", *args], capture_output=True, text=True).stdout
    quoted = re.search(r'location ~ "((?:[^"\\]|\\.)*)"', dumped)
    assert quoted is not None
    assert quoted.group(1).replace("\\\\", "\\") == regex


# --- compressing once ------------------------------------------------------------------------

CSS = "".join(f".c{i} {{ color: #{i * 7919 % 0xFFFFFF:06x}; margin: {i % 40}px; }}\n"
              for i in range(400))  # fmt: skip


def tree(root: Path) -> Path:
    """A stack directory with a static tree of each kind of file, and a decoy outside it."""
    static = root / "site" / "static"
    (static / "css").mkdir(parents=True)
    (static / "css" / "app.css").write_text(CSS)
    (static / "vendor.js").write_text(CSS.replace("color", "var"))
    (static / "data.json").write_text('{"a": 1}' * 200)
    (static / "tiny.css").write_text("a{}")  # under gzip_min_length: not worth it
    (static / "logo.png").write_bytes(os.urandom(4096))
    (static / "icon.svgz").write_bytes(gzip.compress(b"<svg/>" * 400))
    (static / ".hidden").mkdir()
    (static / ".hidden" / "secret.css").write_text(CSS)
    (root / "outside").mkdir()
    (root / "outside" / "decoy.css").write_text(CSS)
    return static


def gz_files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*.gz")}


def test_compressible_files_are_those_nginx_would_gzip() -> None:
    extensions = compressible_extensions()
    assert {"css", "js", "mjs", "json", "txt", "xml", "svg", "map"} <= extensions
    assert not {"svgz", "png", "html", "gz"} & extensions


def test_each_compressible_file_gets_its_gz_stamped_with_its_time(tmp_path: Path) -> None:
    static = tree(tmp_path)
    os.chmod(static / "vendor.js", 0o640)
    outcome = compress_tree(tmp_path / "site", static)
    assert (outcome.compressed, outcome.fresh, outcome.failures) == (3, 0, [])
    assert gz_files(static) == {"css/app.css.gz", "vendor.js.gz", "data.json.gz"}
    for name in ("css/app.css", "vendor.js", "data.json"):
        source, packed = static / name, static / f"{name}.gz"
        assert gzip.decompress(packed.read_bytes()) == source.read_bytes()
        assert packed.stat().st_mtime_ns == source.stat().st_mtime_ns
        assert packed.stat().st_mode & 0o777 == source.stat().st_mode & 0o666
    assert not [p.name for p in static.iterdir() if p.name.endswith("gz-tmp")]


def test_a_second_pass_compresses_only_what_changed(tmp_path: Path) -> None:
    static = tree(tmp_path)
    compress_tree(tmp_path / "site", static)
    untouched = (static / "vendor.js.gz").stat().st_ino
    (static / "css" / "app.css").write_text(CSS + ".new { color: red; }\n")
    # An older copy put back (a backup restored, rsync -t) is a change too.
    os.utime(static / "data.json", ns=(0, 10**18))
    outcome = compress_tree(tmp_path / "site", static)
    assert (outcome.compressed, outcome.fresh) == (2, 1)
    assert (static / "vendor.js.gz").stat().st_ino == untouched
    assert gzip.decompress((static / "css" / "app.css.gz").read_bytes()).endswith(
        b".new { color: red; }\n"
    )
    assert compress_tree(tmp_path / "site", static).compressed == 0


@pytest.mark.parametrize("kept", [0, 0.5, 0.99])
def test_a_gz_cut_short_is_redone(tmp_path: Path, kept: float) -> None:
    static = tree(tmp_path)
    compress_tree(tmp_path / "site", static)
    packed = static / "vendor.js.gz"
    stamp = packed.stat().st_mtime_ns
    # What a crash before the data reached the disk may leave, with the time already set.
    packed.write_bytes(packed.read_bytes()[: int(packed.stat().st_size * kept)])
    os.utime(packed, ns=(stamp, stamp))
    assert compress_tree(tmp_path / "site", static).compressed == 1
    assert gzip.decompress(packed.read_bytes()) == (static / "vendor.js").read_bytes()


def test_a_planted_link_named_like_the_gz_is_replaced_not_written_through(tmp_path: Path) -> None:
    static = tree(tmp_path)
    decoy = tmp_path / "outside" / "decoy.css"
    before = decoy.read_bytes()
    (static / "vendor.js.gz").symlink_to(decoy)
    (static / "data.json.gz").hardlink_to(decoy)
    compress_tree(tmp_path / "site", static)
    assert decoy.read_bytes() == before
    assert not (static / "vendor.js.gz").is_symlink()
    assert (
        gzip.decompress((static / "vendor.js.gz").read_bytes())
        == (static / "vendor.js").read_bytes()
    )
    assert (static / "data.json.gz").stat().st_ino != decoy.stat().st_ino


def test_links_in_the_tree_are_not_followed(tmp_path: Path) -> None:
    static = tree(tmp_path)
    outside = tmp_path / "outside"
    (static / "linked.css").symlink_to(outside / "decoy.css")
    (static / "linked-dir").symlink_to(outside, target_is_directory=True)
    compress_tree(tmp_path / "site", static)
    assert gz_files(outside) == set()
    assert not (static / "linked.css.gz").exists()
    assert gz_files(static / ".hidden") == set()


def test_a_static_dir_swapped_for_a_link_is_not_entered(tmp_path: Path) -> None:
    static = tree(tmp_path)
    shutil.rmtree(static)
    static.symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(OSError):
        compress_tree(tmp_path / "site", static)
    assert gz_files(tmp_path / "outside") == set()


def test_a_file_that_cannot_be_compressed_is_reported_and_the_rest_done(tmp_path: Path) -> None:
    static = tree(tmp_path)
    (static / "vendor.js.gz").mkdir()  # a directory where the .gz would go
    outcome = compress_tree(tmp_path / "site", static)
    assert outcome.compressed == 2
    assert outcome.failures == [f"{static / 'vendor.js'}.gz: Is a directory"]
    assert "1 could not be (NGiNX compresses those on each request)" in outcome.summary()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_as_root_the_gz_belongs_to_its_source_s_owner(tmp_path: Path) -> None:
    static = tree(tmp_path)
    os.chown(static / "vendor.js", 65534, 65534)
    os.chown(static, 65534, 65534)
    compress_tree(tmp_path / "site", static)
    info = (static / "vendor.js.gz").stat()
    assert (info.st_uid, info.st_gid) == (65534, 65534)
    assert (static / "css" / "app.css.gz").stat().st_uid == 0


@pytest.mark.parametrize("name, compressed", [("prod", 3), ("dev", None)])
def test_the_stack_compresses_unless_its_profile_leaves_it_to_nginx(
    tmp_path: Path, name: str, compressed: int | None
) -> None:
    static = tree(tmp_path)
    (tmp_path / "site" / "stack.toml").write_text('[app]\nwsgi = "a:b"\n')
    stack = plan(profile.load(tmp_path / "site", name, [], hostnames=["h"]), NO_PROGRAMS)
    assert stack.static_dir == static
    outcome = compress_static(stack)
    assert (outcome and outcome.compressed) == compressed
    assert len(gz_files(static)) == (compressed or 0)
