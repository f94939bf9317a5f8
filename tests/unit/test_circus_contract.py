"""What stackctl.circusd takes from Circus's internals is still there, as it expects.

The behaviour is tested against the real circusd in tests/e2e/test_circus_reload.py; this
names each internal piece, so that an upgrade of Circus fails here with the name of what moved.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from types import SimpleNamespace

import circus.arbiter
import circus.circusd
import circus.sockets
from circus.commands import get_commands
from circus.process import Process
from circus.watcher import Watcher

from stackctl import circusd


def test_circus_is_the_release_stackctl_circusd_was_written_for() -> None:
    assert version("circus") == "0.19.0"


def test_circusd_builds_its_arbiter_and_watchers_from_module_globals() -> None:
    # stackctl.circusd.main swaps these two names for its own classes.
    assert circus.circusd.Arbiter is circus.arbiter.Arbiter
    assert circus.arbiter.Watcher is Watcher
    assert "Arbiter.load_from_config" in inspect.getsource(circus.circusd.main)
    assert "Watcher.load_from_config" in inspect.getsource(circus.arbiter.Arbiter.load_from_config)


def test_the_watcher_pieces_a_replacement_uses() -> None:
    for name in ("_reload", "_restart", "set_numprocesses", "manage_processes", "reload"):
        assert callable(getattr(Watcher, name)), name
    assert list(inspect.signature(Watcher._reload).parameters) == ["self", "graceful", "sequential"]
    # Circus retires the oldest processes first, by their start time.
    assert "key=lambda process: process.started" in inspect.getsource(Watcher.manage_processes)
    assert callable(Process.is_alive)
    # Unknown watcher options (stackctl_reload) are kept for the watcher, not rejected.
    assert "self._options = options" in inspect.getsource(Watcher.__init__)


def test_the_arbiter_pieces_a_config_reload_uses() -> None:
    wrapped = circus.arbiter.Arbiter.reload_from_config.__wrapped__
    assert list(inspect.signature(wrapped).parameters) == [
        "self", "config_file", "inside_circusd"
    ]  # fmt: skip
    assert isinstance(circus.arbiter._ENV_EXCEPTIONS, tuple)
    reload = circus.arbiter.Arbiter.reload.__wrapped__
    assert list(inspect.signature(reload).parameters) == ["self", "graceful", "sequential"]


def test_the_controller_takes_stackctl_s_reload_command() -> None:
    assert type(get_commands()["reload"]) is circusd.ReloadCommand


def test_the_controller_takes_stackctl_s_reloadconfig_command() -> None:
    assert type(get_commands()["reloadconfig"]) is circusd.ReloadConfigCommand


def test_the_arbiter_makes_its_sockets_from_a_module_global_and_compares_their_config() -> None:
    # stackctl.circusd.main swaps the global for StackSocket, whose filter is attached in
    # load_from_config, before Circus binds the socket.
    assert circus.arbiter.CircusSocket is circus.sockets.CircusSocket
    assert "CircusSocket.load_from_config" in inspect.getsource(
        circus.arbiter.Arbiter.load_from_config
    )
    reload = inspect.getsource(circus.arbiter.Arbiter.reload_from_config)
    assert "CircusSocket.load_from_config(socket_config)" in reload
    assert reload.index("CircusSocket.load_from_config") < reload.index("bind_and_listen()")
    # A socket whose _cfg equals its new section is left alone: the allow list is adopted
    # by giving the socket its new section.
    assert "if new_sockets[n] != s._cfg:" in reload
    made = inspect.getsource(circus.sockets.CircusSocket.load_from_config)
    assert "s = cls(**params)" in made and "s._cfg = config.copy()" in made
    assert "self.config_file" in reload


def test_the_periodic_check_skips_its_turn_while_a_command_runs() -> None:
    busy = SimpleNamespace(_exclusive_running_command="watcher_stop", _restarting=False)
    assert circusd.StackArbiter.manage_watchers(busy) is None  # no ConflictError to log
    source = inspect.getsource(circus.arbiter.Arbiter.manage_watchers)
    assert '@synchronized("manage_watchers")' in source


def test_the_stops_a_replacement_gives_way_to() -> None:
    # Each takes circusd's command lock: a stop during a replacement must wait for it to end.
    for stop in (circus.arbiter.Arbiter.stop, circus.arbiter.Arbiter.stop_watchers, Watcher.stop):
        assert "synchronized(" in inspect.getsource(stop).split("def ")[0], stop
    assert "arbiter.stop_watchers" in inspect.getsource(get_commands()["stop"].execute)
