"""The Circus hooks: before_reap against Circus's real stream redirector and a real child
process; the take-back hook on a watcher's process table."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from circus.process import Process
from circus.stream.redirector import Redirector
from tornado.ioloop import IOLoop

from stackctl.hooks import flush_output_before_reap


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
    watcher = SimpleNamespace(stream_redirector=redirector, processes={process.pid: process},
                              stdout_stream=collect, stderr_stream=collect)  # fmt: skip
    try:
        # The event loop never ran: only the hook can have read the pipes.
        assert flush_output_before_reap(watcher, None, "before_reap", process.pid)
        assert b"".join(sorted(written)) == b"and a tracebacklast words"
        assert not fds & set(redirector.pipes)
        assert not fds & set(loop.handlers)  # type: ignore[attr-defined]
    finally:
        process.stop()
        loop.close()
