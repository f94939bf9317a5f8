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


def test_a_worker_circus_stopped_before_it_was_ready_is_no_crash() -> None:
    # A failed reload takes back its new workers, some of them still starting.
    j = judge()
    assert not j.exited("wsgi", 1, at=1.0)
    for pid in (2, 3, 4, 5):
        j.stopped(pid)
        assert not j.exited("wsgi", pid, at=1.0)
    assert not j.exited("wsgi", 6, at=1.0)  # the second crash in a row, not the sixth
    assert j.exited("wsgi", 7, at=1.0)


def test_new_workers_dying_during_a_stackctl_reload_are_the_reloads_to_judge() -> None:
    under_way = True
    j = RestartJudge(min_uptime=2, max_restarts=3, was_ready=lambda _w, _pid: False,
                     reloading=lambda: under_way)  # fmt: skip
    assert not any(j.exited("wsgi", pid, at=1.0) for pid in range(1, 9))
    assert not j.exited("nginx", 9, at=1.0) and not j.exited("nginx", 10, at=1.0)
    under_way = False
    assert [j.exited("wsgi", pid, at=1.0) for pid in (11, 12, 13)] == [False, False, True]


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


def test_a_crash_report_skips_a_traceback_cut_short(tmp_path: Path) -> None:
    # The last process was stopped while circusd still read its pipe: no exception line.
    log = tmp_path / "wsgi.log"
    whole = ["Traceback (most recent call last):", '  File "app.py"', "RuntimeError: boom"]
    log.write_text("\n".join([*whole, "banner", *whole[:2], "banner"]))
    assert last_crash(log).splitlines()[:3] == whole


def test_a_crash_report_leaves_out_the_lines_other_workers_wrote_in_between(
    tmp_path: Path,
) -> None:
    # Four workers crash at once: one's start-up banner lands between another's frames.
    log = tmp_path / "wsgi.log"
    frames = ["Traceback (most recent call last):", '  File "app.py", line 6', "    raise boom"]
    banner = [f"thunder lock: disabled (banner line {n})" for n in range(40)]
    log.write_text("\n".join([*frames[:2], *banner, frames[2], "RuntimeError: boom", "GAME OVER"]))
    assert last_crash(log).splitlines() == [*frames, "RuntimeError: boom", "GAME OVER"]
