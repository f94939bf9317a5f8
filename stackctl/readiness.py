"""Loading the app and marking a uWSGI worker ready, for :mod:`stackctl.wsgi` and reloads.

The mark, a file named after the worker's pid in ``<run_dir>/ready/``, tells
``stackctl reload`` that a new worker has loaded the app and is about to accept, so that old
workers are stopped only once their replacements can serve.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

APP_VARIABLE = "STACKCTL_WSGI_APP"
READY_DIR = "ready"


def load(spec: str) -> Any:
    """``"package.module:callable"`` → the callable (attributes may be dotted)."""
    module_name, _, attribute = spec.partition(":")
    target: Any = importlib.import_module(module_name)
    for name in attribute.split("."):
        target = getattr(target, name)
    return target


def ready_mark(run_dir: Path, pid: int) -> Path:
    return run_dir / READY_DIR / str(pid)


def mark_ready() -> None:
    run_dir = os.environ.get("STACKCTL_RUN_DIR")
    if run_dir:
        mark = ready_mark(Path(run_dir), os.getpid())
        mark.parent.mkdir(exist_ok=True)
        mark.touch()
