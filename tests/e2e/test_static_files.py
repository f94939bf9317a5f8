"""Static files through the real stack: compressed once and sent as is (gzip_static), and
fingerprinted names cached by browsers for good (static.immutable)."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stackctl.render.nginx import IMMUTABLE_CACHE
from stackctl.stack import Stack
from tests.conftest import running_stack, short_dir, stackctl

pytestmark = pytest.mark.e2e

CSS = "".join(f".c{i} {{ color: #{i * 7919 % 0xFFFFFF:06x}; margin: {i % 40}px; }}\n"
              for i in range(600))  # fmt: skip


@dataclass(frozen=True)
class Site:
    stack: Stack
    static: Path
    decoy: Path

    def get(self, name: str, gzip_ok: bool = True) -> tuple[int, dict[str, str], bytes]:
        headers = {"Accept-Encoding": "gzip"} if gzip_ok else {}
        request = urllib.request.Request(self.stack.url() + "static/" + name, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, dict(e.headers), b""


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    root = short_dir()
    stackctl("init", str(root / "site"), "--demo", cwd=root)
    static = root / "site" / "static"
    (static / "css").mkdir()
    for name in ("app.css", "changing.css", "evil.css", "css/base.0123456789ab.css",
                 "css/base.0123456789xy.css"):  # fmt: skip
        (static / name).write_text(CSS)
    # Planted by whoever controls static.dir: stackctl, maybe root, must not write through it.
    decoy = root / "decoy"
    decoy.write_text("root's file\n")
    (static / "evil.css.gz").symlink_to(decoy)
    with running_stack(root / "site", "--profile", "prod") as stack:
        yield Site(stack, static, decoy)


def test_a_gzip_client_gets_the_file_compressed_at_up(site: Site) -> None:
    status, headers, body = site.get("app.css")
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert body == (site.static / "app.css.gz").read_bytes()
    assert gzip.decompress(body) == CSS.encode()


def test_a_client_without_gzip_gets_the_file_itself(site: Site) -> None:
    status, headers, body = site.get("app.css", gzip_ok=False)
    assert (status, body) == (200, CSS.encode())
    assert "Content-Encoding" not in headers


def test_a_changed_file_is_compressed_again_at_reload(site: Site) -> None:
    source = site.static / "changing.css"
    assert gzip.decompress(site.get("changing.css")[2]) == CSS.encode()
    source.write_text(CSS + ".changed { color: red; }\n")
    out = stackctl("reload", cwd=site.stack.stack_dir).stdout
    assert "static files: 1 compressed," in out  # the others were left alone
    status, headers, body = site.get("changing.css")
    assert headers["Content-Encoding"] == "gzip"
    assert body == (site.static / "changing.css.gz").read_bytes()
    assert gzip.decompress(body) == source.read_bytes()


def test_the_compress_command_does_new_files_without_a_reload(site: Site) -> None:
    (site.static / "late.js").write_text(CSS.replace("color", "var"))
    out = stackctl("compress", cwd=site.stack.stack_dir).stdout
    assert "static files: 1 compressed," in out
    _, headers, body = site.get("late.js")
    assert headers["Content-Encoding"] == "gzip"
    assert body == (site.static / "late.js.gz").read_bytes()


def test_a_planted_link_named_like_the_gz_is_not_followed(site: Site) -> None:
    assert site.decoy.read_text() == "root's file\n"
    packed = site.static / "evil.css.gz"
    assert not packed.is_symlink()
    _, headers, body = site.get("evil.css")
    assert headers["Content-Encoding"] == "gzip"
    assert body == packed.read_bytes()
    assert gzip.decompress(body) == CSS.encode()


def test_fingerprinted_names_are_cached_for_good_and_others_for_an_hour(site: Site) -> None:
    status, headers, _ = site.get("css/base.0123456789ab.css")
    assert status == 200
    assert headers["Cache-Control"] == IMMUTABLE_CACHE == "public, max-age=31536000, immutable"
    assert "Expires" not in headers
    # Its own add_header must not drop the security headers every static file gets.
    assert headers["X-Content-Type-Options"] == "nosniff"
    for name in ("app.css", "css/base.0123456789xy.css"):  # "xy": no hex digits, no hash
        status, headers, _ = site.get(name)
        assert (status, headers["Cache-Control"]) == (200, "max-age=3600"), name
        assert "Expires" in headers


def test_a_dotfile_with_a_fingerprinted_name_is_still_refused(site: Site) -> None:
    (site.static / ".env.0123456789ab.css").write_text("SECRET=1\n")
    assert site.get(".env.0123456789ab.css")[0] == 404
