"""Which exits count as a crash loop (PM2's min_uptime and max_restarts), and what is shown."""

from __future__ import annotations

from pathlib import Path

from stackctl.flapping import RestartJudge, last_crash


def judge(ready: set[int] = frozenset()) -> RestartJudge:  # type: ignore[assignment]
    return RestartJudge(min_uptime=2, max_restarts=3, was_ready=lambda _w, pid: pid in ready)


def test_workers_dying_before_ready_stop_the_watcher_after_max_restarts() -> None:
    j = judge()
    assert [j.exited("wsgi", pid, at=10.0) for pid in (1, 2, 3)] == [False, False, True]


def test_a_ready_worker_exiting_young_is_stable() -> None:
    # Recycled after max_requests, or retired by a reload: it served, so it was stable.
    j = judge(ready={1, 2, 3, 4})
    for pid in (1, 2, 3, 4):
        j.spawned(pid, at=0.0)
        assert not j.exited("wsgi", pid, at=0.1)


def test_a_stable_exit_resets_the_count() -> None:
    j = judge(ready={2})
    assert not j.exited("wsgi", 1, at=1.0)
    assert not j.exited("wsgi", 2, at=1.0)
    assert not j.exited("wsgi", 3, at=1.0)
    assert not j.exited("wsgi", 4, at=1.0)
    assert j.exited("wsgi", 5, at=1.0)


def test_other_watchers_are_judged_by_uptime() -> None:
    j = judge()
    for pid in (1, 2):
        j.spawned(pid, at=0.0)
        assert not j.exited("nginx", pid, at=0.5)
    j.spawned(3, at=0.0)
    assert not j.exited("nginx", 3, at=5.0)  # lived long enough: the count starts again
    for pid in (4, 5, 6):
        j.spawned(pid, at=10.0)
    assert [j.exited("nginx", pid, at=10.5) for pid in (4, 5, 6)] == [False, False, True]


def test_watchers_are_counted_separately() -> None:
    j = judge()
    for pid in (1, 2):
        j.spawned(pid, at=0.0)
        j.exited("ws", pid, at=0.1)
    assert not j.exited("wsgi", 3, at=0.1)


def test_a_crash_report_shows_the_last_traceback_not_the_next_start_up_banner(
    tmp_path: Path,
) -> None:
    log = tmp_path / "wsgi.log"
    traceback = ["Traceback (most recent call last):", '  File "app.py"', "RuntimeError: boom"]
    log.write_text("\n".join(["banner"] * 5 + traceback + ["GAME OVER"] + ["banner"] * 60))
    assert last_crash(log).splitlines()[:4] == [*traceback, "GAME OVER"]
    log.write_text("\n".join(f"line {n}" for n in range(30)))
    assert last_crash(log).splitlines() == [f"line {n}" for n in range(15, 30)]
