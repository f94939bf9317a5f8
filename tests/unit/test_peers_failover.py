"""The peers' failover benchmark counts what each client missed the way its rows say."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from peers_failover import Member, Publish, tally  # noqa: E402

KILL = 100.0


def published(*outcomes: str, start: float = 99.0, step: float = 1.0) -> list[Publish]:
    """One publish a ``step`` apart from ``start``, each taking 0.01 s."""
    return [
        Publish(start + i * step, start + i * step + 0.01, outcome)
        for i, outcome in enumerate(outcomes)
    ]


def member(counts: list[int], joins: list[float], drops: tuple[float, ...] = ()) -> Member:
    return Member(bytearray(counts), joins, list(drops))


def test_a_client_that_stayed_away_loses_what_was_acknowledged_meanwhile() -> None:
    # Messages at 99, 100, 101, 102; the kill at 100; the client back at 101.5.
    publishes = published("ok", "ok", "ok", "ok")
    away = member([1, 0, 0, 1], joins=[90.0, 101.5], drops=(100.2,))
    stayed = member([1, 1, 1, 1], joins=[90.0])
    row = tally([away, stayed], publishes, KILL, {0: 99.1, 1: 100.1, 3: 102.1})
    assert row["lost_messages"] == 2
    assert row["messages_missed_by_some"] == 2
    assert row["lost_well_before_kill"] == 0
    assert row["clients_complete"] == 1
    assert row["clients_dropped"] == 1 and row["clients_not_back"] == 0
    assert row["reconnect_p50_s"] == row["reconnect_max_s"] == 1.5
    assert row["first_delivery_after_kill_s"] == 0.1  # message 1, started at 100


def test_a_failed_publish_is_not_owed_but_an_unannounced_failure_is() -> None:
    publishes = published("ok", "failed", "unannounced")
    client = member([1, 0, 0], joins=[90.0])
    row = tally([client], publishes, KILL, {0: 99.1})
    assert row["acknowledged"] == 2 and row["failed_publishes"] == 1
    assert row["unannounced_publish_failures"] == 1
    assert row["lost_messages"] == 1  # the unannounced one, not the one that raised
    assert row["first_delivery_after_kill_s"] is None


def test_duplicates_spoil_a_complete_client_and_late_joiners_are_not_counted() -> None:
    publishes = published("ok", "ok")
    doubled = member([2, 1], joins=[90.0])
    late = member([0, 1], joins=[99.5])  # joined after publishing began: not owed anything
    never = member([0, 0], joins=[])
    row = tally([doubled, late, never], publishes, KILL, {0: 99.1, 1: 100.1})
    assert row["clients"] == 3 and row["joined"] == 1
    assert row["duplicates"] == 1
    assert row["clients_complete"] == 0
    assert row["lost_messages"] == 0


def test_a_client_that_dropped_and_never_came_back_is_named() -> None:
    publishes = published("ok", "ok")
    gone = member([1, 0], joins=[90.0], drops=(100.05,))
    row = tally([gone], publishes, KILL, {0: 99.1})
    assert row["clients_dropped"] == 1 and row["clients_not_back"] == 1
    assert row["reconnect_p50_s"] is None
    assert row["lost_messages"] == 1 and row["lost_well_before_kill"] == 0


def test_loss_long_before_the_kill_is_told_apart_from_loss_in_flight() -> None:
    # Acknowledged at 97.01 (3 s before the kill) and at 99.61 (in flight when it came).
    publishes = published("ok", "ok", start=97.0, step=2.6)
    behind = member([0, 0], joins=[90.0], drops=(100.1,))
    row = tally([behind], publishes, KILL, {})
    assert row["lost_messages"] == 2
    assert row["lost_well_before_kill"] == 1
