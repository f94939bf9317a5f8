"""The Circus hooks: before_reap against Circus's real stream redirector and a real child
process; the take-back hook on a watcher's process table."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from circus.process import Process
from circus.stream.redirector import Redirector
from tornado.ioloop import IOLoop

from stackctl.hooks import TAKE_BACK_SIGNAL, flush_output_before_reap, take_back_younger_workers


def test_a_dead_process_output_reaches_the_log_and_its_pipes_leave_the_loop() -> None:
    loop = IOLoop()
    written: list[bytes] = []
    def collect(message: dict[str, bytes]) -> None:
        written.append(message["data"])

    redirector = Redirector(collect, collect, loop=loop)
    script = "import sys; sys.stdout.write('last words'); sys.stderr.write('and a traceback')"
    process = Process("test", 1, sys.executable, args=["-c", script])
    redirector.add_redirections(process)
    redirector.start()
    fds = set(redirector.pipes)
    process.wait(timeout=10)
    watcher = SimpleNamespace(stream_redirector=redirector, processes={process.pid: process})
    try:
        # The event loop never ran: only the hook can have read the pipes.
        assert flush_output_before_reap(watcher, None, "before_reap", process.pid)
        assert b"".join(sorted(written)) == b"and a tracebacklast words"
        assert not fds & set(redirector.pipes)
        assert not fds & set(loop.handlers)  # type: ignore[attr-defined]
    finally:
        process.stop()
        loop.close()


def test_taking_back_retires_the_younger_workers_and_keeps_the_count_of_the_others() -> None:
    # 1 and 2 serve; 3 and 4 are new, and 3 has died already (Circus forgot it).
    processes = {pid: SimpleNamespace(started=float(pid)) for pid in (1, 2, 4)}
    watcher = SimpleNamespace(processes=processes, numprocesses=4)

    def ask(pid: int, signum: int = TAKE_BACK_SIGNAL) -> bool:
        return take_back_younger_workers(watcher, None, "before_signal", pid=pid, signum=signum)

    assert ask(2) is False  # the signal itself is not sent
    assert watcher.numprocesses == 2  # 3 is not started again
    assert min(processes, key=lambda pid: processes[pid].started) == 4  # stopped first
    assert ask(2) is False and watcher.numprocesses == 2  # asked again: nothing changes
    processes[5] = SimpleNamespace(started=5.0)  # started before the count was lowered
    assert ask(2) is False and watcher.numprocesses == 2
    assert {pid for pid, p in processes.items() if p.started < 1.0} == {4, 5}
    assert ask(1, signum=10) is True  # any other signal goes through untouched


def test_circusds_periodic_check_skips_its_turn_while_a_command_runs() -> None:
    from stackctl.hooks import check_only_between_commands

    checks: list[str] = []
    caller = SimpleNamespace(callback=lambda: checks.append("checked"))
    arbiter = SimpleNamespace(ctrl=SimpleNamespace(caller=caller),
                              _exclusive_running_command=None, _restarting=False)  # fmt: skip
    assert check_only_between_commands(None, arbiter, "before_start")
    assert check_only_between_commands(None, arbiter, "before_start")  # wraps only once
    caller.callback()
    arbiter._exclusive_running_command = "watcher_stop"
    assert caller.callback() is None  # skipped: no ConflictError for the loop to log
    arbiter._exclusive_running_command = None
    caller.callback()
    assert checks == ["checked", "checked"]
