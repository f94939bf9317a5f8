"""circusd as stackctl runs it: Circus's own reload never leaves the site short of workers.

``circusctl reload wsgi`` (and ``restart``, and ``reload`` of the whole stack) replaces the
processes of a watcher whose section says ``stackctl_reload = replace`` the way
``stackctl reload wsgi`` always has: Circus starts the new processes beside the old ones,
waits until each has marked itself ready (:mod:`stackctl.readiness`), and only then retires
the old ones with the watcher's graceful stop signal. If a new process dies before it is
ready, or none is ready in time, the new ones are stopped and the old ones keep serving.
NGiNX needs none of this: its watcher has ``send_hup``, and a HUP is NGiNX's own graceful
reload.

``circusctl reloadconfig`` applies a changed command line or environment of such a watcher
through the same replacement, instead of Circus's stop-then-start of the whole watcher.

A TCP socket whose section has ``stackctl_allow = ADDRESS_OR_NETWORK ...`` accepts
connections only from those hosts (:mod:`stackctl.allowlist`): the filter is attached before
the socket is bound. ``reloadconfig`` applies a changed allow list to the live socket: Circus
would close it and bind a new one, and its watchers would have to start again (the pinned
release even fails that reload half-way, once the old socket is closed). An allow list that
does not parse stops circusd from starting, and makes ``reloadconfig`` fail with nothing
changed.

This is the one module that reaches into Circus's internals (Watcher's process table and
``_reload``, a socket's ``_cfg``, the module globals that name the Arbiter, Watcher and
CircusSocket classes). pyproject.toml pins Circus to the release it was written against, and
tests/e2e/test_circus_reload.py and tests/e2e/test_allowlist.py hold it to that contract
against the real circusd.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Generator
from contextlib import suppress
from pathlib import Path
from typing import Any

import circus.arbiter
import circus.circusd
import circus.util
import psutil
from circus.arbiter import Arbiter
from circus.commands.reload import Reload
from circus.commands.reloadconfig import ReloadConfig
from circus.config import get_config
from circus.exc import MessageError
from circus.sockets import CircusSocket
from circus.util import parse_env_dict, synchronized
from circus.watcher import Watcher
from tornado import gen

from stackctl import allowlist, processes
from stackctl.logfile import no_follow_handlers
from stackctl.readiness import forget_dead_marks, marked_since, reloading, startup_timeout

logger = logging.getLogger("circus")

RELOAD_OPTION = "stackctl_reload"
REPLACE = "replace"
POLL_SECONDS = 0.05
RETIRED = 0.0
"""The start time given to a process being taken back: Circus stops the oldest first."""
# What a new config may change in a watcher that replaces its processes: the rest (sockets,
# hooks, streams...) is left to Circus's stop-then-start.
ADOPTABLE = {"cmd", "args", "env", "numprocesses", "graceful_timeout"}
ENV_IGNORED = circus.arbiter._ENV_EXCEPTIONS
ALLOW_OPTION = "stackctl_allow"
SHOWN_CHARS = 200
STRAYS_OPTION = "stackctl_strays"
"""``stop``: a stopped process's children and their children go with it (background
watchers: a task may run a tool, or start one and forget it)."""
STRAYS_GRACE = 5.0
"""How much of an allow list an error quotes: a list of hundreds of hosts is cut there."""


class StackWatcher(Watcher):
    """A Circus watcher whose reload and restart follow its ``stackctl_reload`` option."""

    refused: str | None = None
    """Why the last replacement was undone, for the answer to the reload command."""

    @property
    def policy(self) -> str | None:
        policy: str | None = self._options.get(RELOAD_OPTION)
        return policy

    @synchronized("watcher_reload")
    @gen.coroutine
    def reload(self, graceful: bool = True, sequential: bool = False) -> Generator[Any, Any, None]:
        before = set() if self.is_stopped() else set(self.processes)
        yield self._reload(graceful=graceful, sequential=sequential)
        after = set(self.processes)
        answer: dict[str, Any] = {"stopped": sorted(before - after),
                                  "started": sorted(after - before),
                                  "kept": sorted(after & before)}  # fmt: skip
        if self.refused:
            answer["refused"] = self.refused
        raise gen.Return(answer)

    @gen.coroutine
    def _reload(self, graceful: bool = True, sequential: bool = False) -> Generator[Any, Any, None]:
        self.refused = None
        if not graceful or self.is_stopped() or self.policy != REPLACE:
            yield super()._reload(graceful=graceful, sequential=sequential)
            return
        yield self.replace(sequential)
        self.notify_event("reload", {"time": time.time()})
        logger.info("%s reloaded", self.name)

    @gen.coroutine
    def stop(self) -> Generator[Any, Any, None]:
        """Circus's stop of this watcher; one asked for during a replacement (``stackctl down``
        under way) ends the replacement first, instead of being refused."""
        yield self.arbiter.end_replacements()
        yield Watcher.stop(self)

    @gen.coroutine
    def _restart(self) -> Generator[Any, Any, None]:
        if self.policy == REPLACE and not self.is_stopped():
            yield self.replace(sequential=False)
        else:
            yield super()._restart()

    @gen.coroutine
    def kill_process(self, process: Any, stop_signal: Any = None,
                     graceful_timeout: Any = None) -> Generator[Any, Any, bool]:  # fmt: skip
        """Circus's stop of one process; with ``stackctl_strays = stop``, then of what it had
        started. Circus signals only the process (and, once it kills it, its children, but
        never theirs), so what the process leaves would live on, reparented, until `down`."""
        family: list[psutil.Process] = []
        if self._options.get(STRAYS_OPTION) == "stop":
            with suppress(psutil.Error):
                family = psutil.Process(process.pid).children(recursive=True)
        stopped = yield super().kill_process(process, stop_signal, graceful_timeout)
        if family:
            stop_strays(self.name, family)
        raise gen.Return(stopped)

    # --- replacing processes -------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return Path(self.env["STACKCTL_RUN_DIR"])

    @gen.coroutine
    def replace(self, sequential: bool) -> Generator[Any, Any, None]:
        """Start new processes, ``1`` or all at a time; retire as many old ones once the new
        ones are ready, or stop the new ones if they are not."""
        target = self.numprocesses
        if target == 0:
            return
        step = 1 if sequential else target
        forget_dead_marks(self.run_dir)
        with reloading(self.run_dir):
            for done in range(0, target, step):
                before = set(self.processes)
                yield self.set_numprocesses(target + step)
                failure = yield self.wait_ready(before, step)
                if failure:
                    yield self.take_back(before, target)
                    replaced = f" ({done} of {target} had been replaced)" if done else ""
                    self.refused = f"{failure}; the old processes kept serving{replaced}"
                    logger.error("%s: reload undone: %s", self.name, self.refused)
                    return
                yield self.set_numprocesses(target)  # Circus retires the oldest first

    @gen.coroutine
    def wait_ready(self, before: set[int], count: int) -> Generator[Any, Any, str | None]:
        """None once ``count`` processes not in ``before`` are ready, else why not."""
        timeout = startup_timeout(self.graceful_timeout)
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        ready: set[int] = set()
        while time.monotonic() < deadline:
            if self.arbiter.stop_wanted:
                raise gen.Return("a stop was asked for")
            alive = {pid for pid, p in self.processes.items() if p.is_alive()}
            seen |= alive - before
            ready |= {pid for pid in seen & alive
                      if marked_since(self.run_dir, pid, self.processes[pid].started)}  # fmt: skip
            if len(ready & alive) >= count:
                raise gen.Return(None)
            died = seen - alive - ready
            if died:
                raise gen.Return(f"new {self.name} processes {sorted(died)} exited before "
                                 "they were ready")  # fmt: skip
            yield gen.sleep(POLL_SECONDS)
        raise gen.Return(f"new {self.name} processes {sorted(seen) or 'none'} were not ready "
                         f"within {timeout:.0f} s")  # fmt: skip

    @gen.coroutine
    def take_back(self, before: set[int], target: int) -> Generator[Any, Any, None]:
        """Stop every process that is not in ``before``; keep the others."""
        kept = [pid for pid in self.processes if pid in before]
        for pid, process in self.processes.items():
            if pid in before:
                continue
            # One not ready yet has accepted nothing, and may hang in the app's import:
            # waiting out its graceful stop would only hold circusd longer.
            if not marked_since(self.run_dir, pid, process.started):
                with suppress(OSError, psutil.Error):
                    process.send_signal(signal.SIGKILL)
            process.started = RETIRED
        yield self.set_numprocesses(len(kept))
        # An old process that died meanwhile is replaced, as Circus always would.
        yield self.set_numprocesses(target)

    # --- adopting a new config without a stop ----------------------------------------------

    def adoptable_changes(self, new: dict[str, Any]) -> set[str] | None:
        """The options ``new`` changes, if this watcher can apply them itself, else None."""
        if self.policy != REPLACE or self.is_stopped():
            return None
        changed = {k for k in new.keys() | self._cfg.keys()
                   if normalized(k, new.get(k)) != normalized(k, self._cfg.get(k))}  # fmt: skip
        return changed if changed <= ADOPTABLE else None

    @gen.coroutine
    def adopt(self, new: dict[str, Any], changed: set[str]) -> Generator[Any, Any, None]:
        if "env" in new:
            new = {**new, "env": parse_env_dict(new["env"])}
        self.cmd, self.args = new["cmd"], new.get("args")
        if "env" in new:
            self.env = {**(os.environ if self.copy_env else {}), **new["env"]}
        self.graceful_timeout = float(new.get("graceful_timeout", 30.0))
        self._cfg = new.copy()
        if changed & {"cmd", "args", "env"}:
            yield self.replace(sequential=False)
        self.numprocesses = int(new.get("numprocesses", 1))
        yield self.manage_processes()


def stop_strays(watcher: str, family: list[psutil.Process]) -> None:
    """SIGTERM now to those of ``family`` still running (psutil checks that a pid is still
    the process it was), SIGKILL in a while to those that ignore it, off circusd's loop."""
    alive = [proc for proc in family if proc.is_running()]
    if not alive:
        return
    logger.info("%s: stopping %d process(es) its stopped process left: %s", watcher,
                len(alive), " ".join(str(proc.pid) for proc in alive))  # fmt: skip
    for proc in alive:
        with suppress(psutil.Error):
            proc.terminate()
    threading.Thread(target=processes.kill_all, args=(alive, STRAYS_GRACE), daemon=True).start()


def normalized(key: str, value: Any) -> Any:
    if key == "env" and isinstance(value, dict):
        env = parse_env_dict(value)
        return {k: v for k, v in env.items() if k not in ENV_IGNORED}
    return value


class AllowListError(ValueError):
    """A ``stackctl_allow`` value that circusd refuses, with where it is and why."""


def allowed_hosts(config: dict[str, Any], config_file: str = "circus.ini") -> tuple[
        allowlist.Network, ...]:  # fmt: skip
    """The hosts a ``[socket:NAME]`` section lets connect (none listed: every host)."""
    value = str(config.get(ALLOW_OPTION) or "")
    shown = value if len(value) <= SHOWN_CHARS else f"{value[:SHOWN_CHARS]}..."
    where = f"{config_file}: [socket:{config['name']}] {ALLOW_OPTION} = {shown!r}"
    if value.strip() and config.get("path"):
        raise AllowListError(f"{where}: an allow list applies to a TCP socket (host and "
                             "port), not to a Unix socket path")  # fmt: skip
    try:
        allowed = allowlist.parse(value)
        allowlist.check(allowed)  # a list too long for the kernel is refused here too
    except ValueError as e:
        raise AllowListError(f"{where}: {e}") from None
    return allowed


def check_allow_lists(config_file: str) -> None:
    """Raise AllowListError for the first socket of ``config_file`` whose allow list does
    not parse: before anything is bound or changed."""
    for section in get_config(config_file).get("sockets", []):
        allowed_hosts(section, config_file)


def changed_options(old: dict[str, Any], new: dict[str, Any]) -> set[str]:
    return {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


class StackSocket(CircusSocket):
    """A Circus socket that accepts connections only from the hosts its section lists."""

    allowed: tuple[allowlist.Network, ...] = ()

    @classmethod
    def load_from_config(cls, config: dict[str, Any]) -> StackSocket:
        allowed = allowed_hosts(config)
        sock: StackSocket = super().load_from_config(config)  # made, not bound yet
        if not allowed:
            return sock  # every host: the socket is Circus's own, untouched
        try:
            sock.allow(allowed)
        except BaseException:
            sock.close()
            raise
        logger.info("socket %s accepts connections from %s only", sock.name,
                    allowlist.describe(allowed))  # fmt: skip
        return sock

    def allow(self, allowed: tuple[allowlist.Network, ...]) -> None:
        """Filter the socket to ``allowed``; on a listening socket, from the next packet on
        (the connections it already accepted keep the filter they were accepted with)."""
        allowlist.attach(self, allowed)
        self.allowed = allowed


class StackArbiter(Arbiter):
    """An arbiter whose ``reloadconfig`` lets stackctl's watchers adopt what they can, whose
    periodic check waits for the command under way, and whose stop ends a replacement."""

    stop_wanted = False
    """A stop waits for the replacement under way to end, and tells it to end now."""

    @gen.coroutine
    def end_replacements(self) -> Generator[Any, Any, None]:
        self.stop_wanted = True
        try:
            while self._exclusive_running_command is not None:
                yield gen.sleep(POLL_SECONDS)
        finally:
            self.stop_wanted = self._stopping

    @gen.coroutine
    def stop_watchers(self, watcher_iter_func: Any = None) -> Generator[Any, Any, None]:
        """`circusctl stop` of several watchers (``stackctl down`` stops them in stages)."""
        yield self.end_replacements()
        yield Arbiter.stop_watchers(self, watcher_iter_func=watcher_iter_func)

    @gen.coroutine
    def stop(self) -> Generator[Any, Any, None]:
        # Ctrl-C, SIGTERM, `circusctl quit`: while a replacement runs, Circus would refuse
        # them (the command lock) and go on waiting for new workers that may hang.
        if self._stopping or self.stop_wanted:
            return  # the stop already asked for does it
        yield self.end_replacements()
        yield Arbiter.stop(self)

    def manage_watchers(self) -> Any:
        # circusd checks its watchers every check_delay under the lock its commands take (stop,
        # decr, reload...): a check that falls while one runs raises ConflictError, which the
        # event loop logs with a traceback, some ten per reload or stop. Skipping loses
        # nothing: the next check comes check_delay later.
        if self._exclusive_running_command is not None or self._restarting:
            return None
        return super().manage_watchers()

    @synchronized("arbiter_reload_config")
    @gen.coroutine
    def reload_from_config(self, config_file: str | None = None,
                           inside_circusd: bool = False) -> Generator[Any, Any, None]:  # fmt: skip
        config_file = config_file or self.config_file
        check_allow_lists(config_file)
        new_cfg = get_config(config_file)
        if self.get_arbiter_config(new_cfg) == self._cfg:
            self.adopt_allow_lists(new_cfg)
            for watcher in self.iter_watchers():
                new = self.get_watcher_config(new_cfg, watcher.name)
                changed = watcher.adoptable_changes(new) if isinstance(
                    watcher, StackWatcher) and new else None  # fmt: skip
                if changed:
                    logger.info("%s adopts its new %s", watcher.name, ", ".join(sorted(changed)))
                    yield watcher.adopt(new, changed)
        # Circus's own reloadconfig, for everything else (it finds the adopted ones unchanged).
        yield Arbiter.reload_from_config.__wrapped__(self, config_file, inside_circusd)

    def adopt_allow_lists(self, new_cfg: dict[str, Any]) -> None:
        """Give a socket whose allow list is all that changed its new list, live, and its new
        config: Circus then finds it unchanged, and neither binds it again nor restarts the
        watchers that use it."""
        for new in new_cfg.get("sockets", []):
            sock = self.sockets.get(new["name"])
            if isinstance(sock, StackSocket) and changed_options(sock._cfg, new) == {
                    ALLOW_OPTION}:  # fmt: skip
                sock.allow(allowed_hosts(new, self.config_file))
                sock._cfg = new.copy()
                logger.info("socket %s now accepts connections from %s", sock.name,
                            allowlist.describe(sock.allowed))  # fmt: skip

    @classmethod
    def load_from_config(cls, config_file: str, loop: Any = None) -> Any:
        """Circus's, after checking every socket's allow list: one that does not parse stops
        circusd with the reason, before any socket is bound."""
        try:
            check_allow_lists(config_file)
        except AllowListError as e:
            logger.error("%s", e)
            raise SystemExit(1) from None
        return super().load_from_config(config_file, loop)

    @synchronized("arbiter_reload")
    @gen.coroutine
    def reload(self, graceful: bool = True,
               sequential: bool = False) -> Generator[Any, Any, dict[str, Any] | None]:  # fmt: skip
        """Circus's reload of every watcher; if one of them was undone, an error that says so
        (``circusctl reload --waiting`` fails)."""
        yield Arbiter.reload.__wrapped__(self, graceful, sequential)
        refused = [f"{w.name}: {w.refused}" for w in self.iter_watchers()
                   if isinstance(w, StackWatcher) and w.refused]  # fmt: skip
        if refused:
            raise gen.Return(reload_answer({"refused": "; ".join(refused)}))
        raise gen.Return(None)


class ReloadCommand(Reload):
    """Reload the arbiter or a watcher (see ``circusctl help reload``).

    As Circus's own, except that a reload that was undone answers with an error and says why,
    so that ``circusctl reload wsgi --waiting`` fails when the old workers were kept.
    """

    name = "reload"  # defined later than Circus's, so the controller takes this one

    def execute(self, arbiter: Any, props: dict[str, Any]) -> Any:
        answer = super().execute(arbiter, props)
        if props.get("waiting") and "name" in props:
            answer.set_transform_function(reload_answer)
        return answer


class ReloadConfigCommand(ReloadConfig):
    """Reload the configuration file (see ``circusctl help reloadconfig``).

    As Circus's own, except that an allow list of a socket that does not parse fails the
    command with the reason, before anything changes.
    """

    name = "reloadconfig"  # defined later than Circus's, so the controller takes this one

    def execute(self, arbiter: Any, props: dict[str, Any]) -> Any:
        try:
            check_allow_lists(arbiter.config_file)
        except AllowListError as e:
            raise MessageError(str(e)) from None
        return super().execute(arbiter, props)


def reload_answer(info: dict[str, Any]) -> dict[str, Any]:
    if info.get("refused"):
        return {"status": "error", "reason": f"reload undone: {info['refused']}", "info": info}
    return {"info": info}


def configure_logger(*args: Any, **kwargs: Any) -> None:
    """Circus's, but circusd.log is opened without following a symbolic link."""
    circus.util.configure_logger(*args, **kwargs)
    no_follow_handlers(logging.getLogger())


def main() -> None:
    circus.arbiter.Watcher = StackWatcher
    circus.arbiter.CircusSocket = StackSocket
    circus.circusd.Arbiter = StackArbiter
    circus.circusd.configure_logger = configure_logger
    circus.circusd.main()


if __name__ == "__main__":
    main()
