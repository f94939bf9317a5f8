"""The dev code reload picks up every Python file of the app, even one imported after start."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from stackctl.stack import Stack
from tests.conftest import running_stack, short_dir, stackctl, wait_for
from tests.e2e.test_django import django_project
from tests.e2e.test_restarts import wsgi_pids

pytestmark = pytest.mark.e2e

# Like Django, which imports the project's urls.py at the first request, not at start.
APP = '''
def application(environ, start_response):
    import routes

    body = routes.ANSWER.encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
'''


def lazy_site() -> Path:
    site = short_dir() / "site"
    site.mkdir()
    (site / "lazyapp.py").write_text(APP)
    (site / "routes.py").write_text('ANSWER = "old"\n')
    stackctl("init", ".", "--app", "lazyapp:application", cwd=site)
    return site


def get(stack: Stack, path: str = "") -> str:
    with urllib.request.urlopen(stack.url() + path, timeout=10) as response:
        return str(response.read().decode())


def status(stack: Stack, path: str) -> int:
    try:
        with urllib.request.urlopen(stack.url() + path, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_a_module_imported_after_start_is_reloaded_and_every_later_request_sees_it() -> None:
    site = lazy_site()
    with running_stack(site, "--workers", "2", "--profile", "dev") as stack:
        for _ in range(6):  # every worker has imported routes.py by now
            assert get(stack) == "old"
        before = wsgi_pids(stack)
        (site / "routes.py").write_text('ANSWER = "new"\n')
        wait_for(lambda: not before & wsgi_pids(stack), timeout=30,
                 what="the pool to be reloaded")  # fmt: skip
        assert [get(stack) for _ in range(20)] == ["new"] * 20

        # A file saved with a typo is waited out: the workers keep the code they have.
        serving = wsgi_pids(stack)
        (site / "routes.py").write_text('ANSWER = "typo\n')
        wait_for(lambda: "routes.py does not compile" in (stack.log_dir / "wsgi.log").read_text(),
                 what="the typo to be reported")  # fmt: skip
        assert wsgi_pids(stack) == serving
        assert get(stack) == "new"


def test_a_django_url_added_while_running_answers_on_every_request_after_the_reload(
    short_tmp: Path,
) -> None:
    project = django_project(short_tmp)
    stackctl("init", cwd=project)
    with running_stack(project, "--workers", "2", "--profile", "dev") as stack:
        assert [status(stack, "hello/") for _ in range(6)] == [404] * 6  # urls.py imported
        before = wsgi_pids(stack)
        urls = project / "mysite" / "urls.py"
        urls.write_text(
            urls.read_text()
            + "\nfrom django.http import HttpResponse\n"
            + 'urlpatterns.append(path("hello/", lambda request: HttpResponse("hello")))\n'
        )
        wait_for(lambda: not before & wsgi_pids(stack), timeout=30,
                 what="the pool to be reloaded")  # fmt: skip
        assert [get(stack, "hello/") for _ in range(20)] == ["hello"] * 20
