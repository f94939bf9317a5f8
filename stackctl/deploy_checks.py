"""Django's deployment checks (``manage.py check --deploy``), before a generation starts.

``stackctl init`` takes the settings module that ``manage.py`` uses, often a development one
with ``DEBUG = True``. A profile with ``app.deploy_checks`` (the shipped prod) therefore asks
Django, before ``up`` or ``reload`` starts workers, what it thinks of those settings: the
warnings are shown to whoever runs the command, and DEBUG = True is refused unless the
profile says ``app.allow_debug = true``. Django is asked in a separate interpreter with the
workers' environment, so the answer is about the settings the workers will load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from stackctl.errors import StackError
from stackctl.generation import import_failure, run_app_python
from stackctl.profile import Profile
from stackctl.stack import Stack

ANSWER_MARK = "stackctl-deploy-checks: "
"""Starts the probe's answer line: the app's settings may print lines of their own."""

CHECKS_CRASHED = 2
"""The probe's exit status when a check raised (1: the app did not load)."""
SERIOUS = 40  # django.core.checks.ERROR: Django's own `check` fails from this level up


@dataclass(frozen=True)
class Finding:
    """One message of Django's checks, as Django words it."""

    id: str
    level: int
    msg: str
    hint: str

    def lines(self) -> list[str]:
        return [f"  {self.id}: {self.msg}"] + ([f"    hint: {self.hint}"] if self.hint else [])


@dataclass(frozen=True)
class Answer:
    debug: bool
    settings_file: str
    findings: list[Finding]


def probe(wsgi: str) -> None:
    """Run in the workers' interpreter: load the app as a worker does (which sets Django up),
    then print Django's deployment checks and DEBUG as one JSON line."""
    import sys
    import traceback

    from stackctl.readiness import load_or_explain

    load_or_explain(wsgi)
    from django.conf import settings
    from django.core import checks

    try:
        found = checks.run_checks(include_deployment_checks=True)
    except Exception as e:  # a check of the app's own that crashed: its words, not a traceback
        print("".join(traceback.format_exception_only(e)), file=sys.stderr)
        raise SystemExit(CHECKS_CRASHED) from None
    module = sys.modules.get(str(settings.SETTINGS_MODULE))
    answer = {
        "debug": bool(settings.DEBUG),
        "settings_file": getattr(module, "__file__", None) or str(settings.SETTINGS_MODULE),
        "findings": [
            {"id": m.id or "?", "level": m.level, "msg": str(m.msg), "hint": str(m.hint or "")}
            for m in found
            if not m.is_silenced()
        ],
    }
    print(ANSWER_MARK + json.dumps(answer))


def ask_django(stack: Stack) -> Answer:
    wsgi = stack.profile.app.wsgi
    code = f"from stackctl.deploy_checks import probe; probe({wsgi!r})"
    result = run_app_python(stack, code, "app.deploy_checks: Django's deployment checks")
    if result.returncode == CHECKS_CRASHED:
        raise StackError(
            f"app.deploy_checks: Django's deployment checks crashed with "
            f"{stack.profile.app.django_settings}:\n{result.stderr.strip()}"
        )
    if result.returncode != 0:
        raise import_failure(stack, result)
    lines = [line for line in result.stdout.splitlines() if line.startswith(ANSWER_MARK)]
    if not lines:
        raise StackError("app.deploy_checks: Django's deployment checks gave no answer")
    found = json.loads(lines[-1].removeprefix(ANSWER_MARK))
    return Answer(found["debug"], found["settings_file"],
                  [Finding(**finding) for finding in found["findings"]])  # fmt: skip


def deploy_checks(stack: Stack) -> list[str]:
    """Lines to show the user before the app starts; raises StackError when it must not.

    Nothing to do for a profile without app.deploy_checks, or for an app that is not Django.
    """
    app = stack.profile.app
    if not app.deploy_checks or not app.django_settings:
        return []
    return judge(stack.profile, ask_django(stack))


def judge(chosen: Profile, answer: Answer) -> list[str]:
    """What Django's answer means for a profile with app.deploy_checks."""
    app = chosen.app
    if answer.debug and not app.allow_debug:
        raise StackError(
            f"{answer.settings_file}: DEBUG = True in {app.django_settings}, and profile "
            f"{chosen.name!r} serves the public (app.deploy_checks, from "
            f"{chosen.source('app.deploy_checks')}): every visitor would see tracebacks and "
            f"settings when an error occurs. Set DEBUG = False in {app.django_settings}, or "
            "set app.django_settings (in stack.toml) to your production settings module; to "
            "run with DEBUG anyway, set app.allow_debug = true in the profile"
        )
    serious = [f for f in answer.findings if f.level >= SERIOUS]
    if serious:
        raise StackError(
            f"Django's checks found errors in {app.django_settings}; fix them, or silence "
            "them in its SILENCED_SYSTEM_CHECKS:\n"
            + "\n".join(line for f in serious for line in f.lines())
        )
    lines = [line for f in answer.findings for line in f.lines()]
    if answer.debug:
        lines.append(
            f"  DEBUG = True in {app.django_settings}: allowed by app.allow_debug (from "
            f"{chosen.source('app.allow_debug')})"
        )
    if not lines:
        return []
    return [f"Django's deployment checks (check --deploy) for {app.django_settings}:", *lines]
