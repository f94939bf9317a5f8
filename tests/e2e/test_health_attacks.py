"""The health check and draining attacked: what an operator's leftovers in the run directory
make of `stackctl drain`, on the real stack."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from stackctl.errors import EXIT_STACK_ERROR
from stackctl.stack import Stack
from stackctl.users import ServiceUser
from tests.conftest import REPO, app_site, free_port, running_stack, stackctl
from tests.service_users import new_site, run, running_site

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    site = app_site(REPO / "tests" / "apps" / "cacheapp.py", "cacheapp:application")
    with running_stack(site, "--workers", "2") as running:
        yield running


def health(stack: Stack) -> int:
    try:
        with urllib.request.urlopen(stack.url() + "_stackctl/health", timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        with refused:
            assert json.loads(refused.read())["ok"] is False
            return refused.code


def said_draining(stack: Stack) -> bool:
    return "draining:" in stackctl("status", cwd=stack.stack_dir, check=False).stdout


@pytest.mark.parametrize("leads_to", ["a file", "nothing"])
def test_a_link_in_place_of_the_mark_neither_fakes_nor_blocks_a_drain(
    stack: Stack, leads_to: str
) -> None:
    """NGiNX follows no link (disable_symlinks): a link named like the mark is no mark to it.
    `stackctl drain` must not say 503 while the check answers 200, nor status say draining."""
    mark = stack.run_dir / "draining"
    elsewhere = stack.stack_dir / "elsewhere"
    if leads_to == "a file":
        elsewhere.write_text("not a mark")
    mark.symlink_to(elsewhere)
    try:
        assert health(stack) == 200 and not said_draining(stack)
        assert "answers 503" in stackctl("drain", cwd=stack.stack_dir).stdout
        assert health(stack) == 503 and said_draining(stack)
        assert not mark.is_symlink()
        if leads_to == "a file":
            assert elsewhere.read_text() == "not a mark"  # the link was replaced, not followed
    finally:
        stackctl("drain", "--off", cwd=stack.stack_dir)
        elsewhere.unlink(missing_ok=True)
    assert health(stack) == 200 and not Path(mark).exists()


def test_a_directory_in_place_of_the_mark_is_named_not_a_traceback(stack: Stack) -> None:
    mark = stack.run_dir / "draining"
    mark.mkdir()
    try:
        for args in (("drain",), ("drain", "--off")):
            result = stackctl(*args, cwd=stack.stack_dir, check=False)
            assert result.returncode == EXIT_STACK_ERROR, result
            assert f"{mark}: " in result.stderr and "Traceback" not in result.stderr
            assert "not a file" in result.stderr
        assert health(stack) == 200 and not said_draining(stack)
    finally:
        mark.rmdir()


def test_with_https_the_check_over_plain_http_is_answered_not_redirected() -> None:
    """A balancer in front of an HTTPS site may check over plain HTTP. A redirect (301) counts
    as healthy to HAProxy's httpchk: a draining host, or one whose Redis is down, would stay
    in rotation. The plain listener answers the check itself, as the HTTPS one does."""
    site = app_site(REPO / "tests" / "apps" / "cacheapp.py", "cacheapp:application")
    tls = ("--set", "tls.certificate=self-signed", "--set", f"tls.listen=127.0.0.1:{free_port()}")
    with running_stack(site, "--workers", "2", *tls) as running:
        plain = f"http://127.0.0.1:{running.profile.server.listen.port}/_stackctl/health"
        opener = urllib.request.build_opener(NoRedirect)
        assert plain_health(opener, plain) == 200
        stackctl("drain", cwd=site)
        assert plain_health(opener, plain) == 503
        stackctl("drain", "--off", cwd=site)
        assert plain_health(opener, plain) == 200
        # Every other page still goes to HTTPS.
        assert plain_health(opener, plain.replace("/_stackctl/health", "/x")) == 301


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def plain_health(opener: urllib.request.OpenerDirector, url: str) -> int:
    try:
        with opener.open(url, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code


def test_the_check_works_when_the_app_runs_as_the_service_user(
    python: Path, service_user: ServiceUser
) -> None:
    """Root starts the stack, the app runs as the service user: the wsgi worker that answers
    the check must reach the realtime worker's socket and Redis as that user."""
    site = new_site(python, None)
    up = ("--listen", f"127.0.0.1:{free_port()}", "--workers", "2",
          "--set", f"server.user={service_user.name}")  # fmt: skip
    with running_site(python, site, *up) as running:
        assert health(running) == 200
        run(python, "drain", cwd=site)
        assert health(running) == 503
        run(python, "drain", "--off", cwd=site)
        assert health(running) == 200


def test_another_local_user_can_neither_drain_nor_touch_the_cache(
    python: Path, service_user: ServiceUser
) -> None:
    """Root's stack, its app run as root too: the service user is just another local user
    here. It gets a plain refusal, no traceback, and the check and the kept page stay."""
    site = new_site(python, None)
    up = ("--listen", f"127.0.0.1:{free_port()}", "--workers", "1", "--set", "server.user=root",
          "--set", "cache.enabled=true")  # fmt: skip
    with running_site(python, site, *up) as running:
        assert health(running) == 200
        for args in (("drain",), ("drain", "--off"), ("cache", "purge", "/"),
                     ("cache", "refresh", "/")):  # fmt: skip
            result = run(python, *args, user=service_user, cwd=site, check=False)
            assert result.returncode == EXIT_STACK_ERROR, (args, result.stderr.splitlines())
            assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, args
        assert health(running) == 200
        assert not (running.run_dir / "draining").exists()

