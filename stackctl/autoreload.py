"""Code reload for development: one process watches the app's files and reloads the pool.

Circus runs it as the ``autoreload`` watcher when ``wsgi.autoreload`` is on (the ``dev``
profile). It watches every Python file under the stack directory with watchfiles (inotify,
as uvicorn's reloader does), not just the modules a worker had loaded when it started:
Django imports ``urls.py`` only at the first request. On a change it asks circusd to reload
the ``wsgi`` watcher: new workers start on the new code while the old ones finish their
requests and exit, so every request after the reload is served by the new code. A change
that does not compile is reported and waited out: the workers keep the code they have until
the file is fixed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from stackctl.errors import StackError

# Circus's reload waits for the old workers to finish their requests.
RELOAD_TIMEOUT = 120.0


def changed_sources(changes: Iterable[tuple[object, str]]) -> list[Path]:
    """The files of a batch of changes, in a stable order (a batch has no order)."""
    return sorted({Path(path) for _, path in changes})


def compiles(paths: list[Path]) -> bool:
    """A file saved half-way, or with a typo, must not take the workers down: wait for a fix."""
    for path in paths:
        if not path.is_file():
            continue  # deleted: nothing to check, the reload tells whether the app still loads
        try:
            compile(path.read_bytes(), str(path), "exec")  # checks only: writes no bytecode
        except (SyntaxError, ValueError, OSError) as e:
            print(f"stackctl: not reloading, {path} does not compile: {e}", file=sys.stderr)
            return False
    return True


def reload_pool(endpoint: str) -> None:
    from stackctl.supervisor import call_endpoint

    call_endpoint(endpoint, "reload", RELOAD_TIMEOUT, name="wsgi", graceful=True, waiting=True)


def watch(root: Path, ignored: list[Path], endpoint: str) -> None:
    from watchfiles import PythonFilter
    from watchfiles import watch as changes_under

    only_sources = PythonFilter(ignore_paths=ignored)
    for batch in changes_under(root, watch_filter=only_sources, raise_interrupt=False):
        paths = changed_sources(batch)
        if not compiles(paths):
            continue
        print(f"stackctl: {paths[0]} changed; reloading the wsgi workers", file=sys.stderr)
        try:
            reload_pool(endpoint)
        except StackError as e:
            print(f"stackctl: the reload failed: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stackctl.autoreload", description=__doc__)
    parser.add_argument("root", type=Path, help="the stack directory")
    parser.add_argument("--endpoint", required=True, help="circusd's control endpoint")
    parser.add_argument("--ignore", type=Path, action="append", default=[],
                        help="a directory not to watch (the run and log directories)")  # fmt: skip
    args = parser.parse_args(argv)
    watch(args.root.resolve(), [p.resolve() for p in args.ignore], args.endpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
