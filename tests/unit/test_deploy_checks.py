"""What Django's deployment checks mean for a profile: shown, refused, or not asked at all."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from stackctl import profile, stack
from stackctl.deploy_checks import Answer, Finding, deploy_checks, judge
from stackctl.errors import StackError
from stackctl.users import ServiceUser
from tests.unit.test_render import PROGRAMS

HSTS = Finding("security.W004", 30, "You have not set a value for the SECURE_HSTS_SECONDS.", "")
DEBUG = Finding("security.W018", 30, "You should not have DEBUG set to True in deployment.", "")
SETTINGS_FILE = "/srv/site/mysite/settings.py"


def load(
    stack_dir: Path, name: str, *overrides: str, django: str = "mysite.settings"
) -> profile.Profile:
    (stack_dir / "stack.toml").write_text(
        f'[app]\nwsgi = "mysite.wsgi:application"\ndjango_settings = "{django}"\n'
        '[static]\ndir = ""\n'
    )
    chosen = [profile.parse_override(o) for o in overrides]
    return profile.load(stack_dir, name, chosen, hostnames=["h"])


def test_prod_runs_the_checks_and_allows_no_debug(tmp_path: Path) -> None:
    prod, dev = load(tmp_path, "prod"), load(tmp_path, "dev")
    assert (prod.app.deploy_checks, prod.app.allow_debug) == (True, False)
    assert (dev.app.deploy_checks, dev.app.allow_debug) == (False, False)


def test_debug_under_prod_is_refused_naming_the_key_and_the_settings(tmp_path: Path) -> None:
    prod = load(tmp_path, "prod")
    with pytest.raises(StackError) as error:
        judge(prod, Answer(True, SETTINGS_FILE, [HSTS, DEBUG]))
    message = str(error.value)
    assert message.startswith(
        f"{SETTINGS_FILE}: DEBUG = True in mysite.settings, and profile 'prod' serves the public "
        "(app.deploy_checks, from "
    )
    assert "profiles/prod.toml)" in message
    assert message.endswith(
        "Set DEBUG = False in mysite.settings, or set app.django_settings (in stack.toml) to "
        "your production settings module; to run with DEBUG anyway, set app.allow_debug = "
        "true in the profile"
    )


def test_debug_allowed_explicitly_starts_with_the_warnings_shown(tmp_path: Path) -> None:
    allowed = load(tmp_path, "prod", "app.allow_debug=true")
    assert judge(allowed, Answer(True, SETTINGS_FILE, [HSTS, DEBUG])) == [
        "Django's deployment checks (check --deploy) for mysite.settings:",
        f"  {HSTS.id}: {HSTS.msg}",
        f"  {DEBUG.id}: {DEBUG.msg}",
        "  DEBUG = True in mysite.settings: allowed by app.allow_debug (from command line)",
    ]


def test_hints_are_shown_under_their_warning(tmp_path: Path) -> None:
    hinted = dataclasses.replace(HSTS, hint="Set it to 31536000.")
    lines = judge(load(tmp_path, "prod"), Answer(False, SETTINGS_FILE, [hinted]))
    assert lines[1:] == [f"  {HSTS.id}: {HSTS.msg}", "    hint: Set it to 31536000."]


def test_no_findings_no_words(tmp_path: Path) -> None:
    assert judge(load(tmp_path, "prod"), Answer(False, SETTINGS_FILE, [])) == []


def test_django_errors_refuse_the_start(tmp_path: Path) -> None:
    error = Finding("fields.E304", 40, "Reverse accessor clashes.", "Add related_name.")
    with pytest.raises(StackError) as refused:
        judge(load(tmp_path, "prod"), Answer(False, SETTINGS_FILE, [HSTS, error]))
    assert str(refused.value) == (
        "Django's checks found errors in mysite.settings; fix them, or silence them in its "
        "SILENCED_SYSTEM_CHECKS:\n  fields.E304: Reverse accessor clashes.\n"
        "    hint: Add related_name."
    )


@pytest.mark.parametrize(
    ("name", "overrides", "django"),
    [
        ("prod", (), ""),  # not a Django app
        ("dev", (), "mysite.settings"),  # not asked for
        ("prod", ("app.deploy_checks=false",), "mysite.settings"),
    ],
)
def test_nothing_is_run_unless_asked_for_a_django_app(
    tmp_path: Path, name: str, overrides: tuple[str, ...], django: str
) -> None:
    # An interpreter that does not exist: asking Django would fail loudly.
    programs = dataclasses.replace(PROGRAMS, python=str(tmp_path / "no-python"))
    planned = stack.plan(load(tmp_path, name, *overrides, django=django), programs)
    assert deploy_checks(planned) == []


def test_asking_is_running_the_workers_interpreter(tmp_path: Path) -> None:
    # The same interpreter missing, asked for: the check does run, and says what failed.
    programs = dataclasses.replace(PROGRAMS, python=str(tmp_path / "no-python"))
    planned = stack.plan(load(tmp_path, "prod"), programs)
    with pytest.raises(StackError) as error:
        deploy_checks(planned)
    assert str(error.value) == (
        "app.deploy_checks: Django's deployment checks: cannot start "
        f"{tmp_path / 'no-python'}: No such file or directory"
    )


def test_an_interpreter_the_service_user_cannot_start_is_named_before_anything(
    tmp_path: Path, service_user: ServiceUser
) -> None:
    # A virtualenv made with a Python under /root (0700): root runs stackctl from it, but the
    # service user cannot even start its interpreter. The checks run before `up` checks the
    # rest of what that user needs: they name it too, rather than end in a traceback.
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    (private / "python3").symlink_to(sys.executable)
    programs = dataclasses.replace(PROGRAMS, python=str(private / "python3"))
    chosen = load(tmp_path, "prod", f"server.user={service_user.name}")
    with pytest.raises(StackError) as error:
        deploy_checks(stack.plan(chosen, programs))
    message = str(error.value)
    assert message.startswith(
        f"command line: server.user: {service_user.name!r}: the app's processes run as "
        f"{service_user.name!r}, who cannot reach what they need:\n"
    ), message
    assert f"\n  cannot run {private / 'python3'}\n" in message
    assert "not under /root, which is private to root" in message


def tiny_django(root: Path, settings: str) -> stack.Stack:
    """A one-module Django project under prod, with the real interpreter."""
    (root / "tiny").mkdir()
    (root / "tiny" / "__init__.py").write_text("")
    (root / "tiny" / "settings.py").write_text(
        'SECRET_KEY = "k" * 60\nROOT_URLCONF = "tiny.urls"\nALLOWED_HOSTS = ["*"]\n'
        "INSTALLED_APPS = []\n" + settings
    )
    (root / "tiny" / "urls.py").write_text("urlpatterns = []\n")
    (root / "tiny" / "wsgi.py").write_text(
        "from django.core.wsgi import get_wsgi_application\napplication = get_wsgi_application()\n"
    )
    (root / "stack.toml").write_text(
        '[app]\nwsgi = "tiny.wsgi:application"\ndjango_settings = "tiny.settings"\n'
        '[static]\ndir = ""\n'
    )
    chosen = profile.load(root, "prod", [], hostnames=["h"])
    return stack.plan(chosen, dataclasses.replace(PROGRAMS, python=sys.executable))


def test_django_is_asked_with_the_workers_settings(tmp_path: Path) -> None:
    tiny = tiny_django(tmp_path, "DEBUG = True\nSILENCED_SYSTEM_CHECKS = ['security.W018']\n")
    # Silencing Django's warning does not silence the profile: DEBUG is asked for itself.
    with pytest.raises(StackError, match=r"tiny/settings.py: DEBUG = True in tiny.settings, "):
        deploy_checks(tiny)


def test_a_check_that_crashes_is_reported_as_such(tmp_path: Path) -> None:
    tiny = tiny_django(
        tmp_path,
        "from django.core import checks\n"
        "@checks.register(deploy=True)\n"
        "def broken(app_configs, **kwargs):\n"
        "    raise RuntimeError('the check itself failed')\n",
    )
    with pytest.raises(StackError) as error:
        deploy_checks(tiny)
    assert str(error.value) == (
        "app.deploy_checks: Django's deployment checks crashed with tiny.settings:\n"
        "RuntimeError: the check itself failed"
    )
