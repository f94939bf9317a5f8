"""The pure parts of following a Redis failover: the sentinel:// address, the password file,
what a client resuming across a break is told, and a recovery that sends nothing twice."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from stackctl import realtime
from stackctl.realtime import Counters, Missed, UnknownId, missed_since
from stackctl.settings import Invalid, redis_url, sentinel_address
from stackctl.ws.hub import Delivery, GapNotice, Hub, Recovery


def test_a_sentinel_address_names_each_sentinel_and_the_master() -> None:
    url = "sentinel://10.0.0.5:26379,[fd00::6]:26380,redis-3.internal:5000/site_main-1.a"
    assert redis_url(url) == url
    assert sentinel_address(url) == (
        [("10.0.0.5", 26379), ("fd00::6", 26380), ("redis-3.internal", 5000)],
        "site_main-1.a",
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://10.0.0.5/main", "'10.0.0.5' is not"),  # a port for each
        ("sentinel://10.0.0.5:0/main", "'10.0.0.5:0' is not"),
        ("sentinel://a;b:1/main", "'a;b:1' is not"),
        ("sentinel://h:1,/main", "'' is not"),
        ("sentinel://h:1/", "a master name of 1 to 64"),
        ("sentinel://h:1/m" + "x" * 64, "a master name of 1 to 64"),
        ("sentinel://h:1/m$x", "a master name of 1 to 64"),
        ("sentinel://h:1/main?db=1", "a master name of 1 to 64"),
    ],
)
def test_a_wrong_sentinel_address_is_refused_saying_what_is_expected(url: str, says: str) -> None:
    with pytest.raises(Invalid, match="sentinel://HOST:PORT") as refused:
        redis_url(url)
    assert says in str(refused.value)


def test_a_password_in_a_sentinel_address_is_refused_and_never_shown() -> None:
    with pytest.raises(Invalid) as refused:
        redis_url("sentinel://:hunter2@10.0.0.5:26379/main")
    assert "takes no password" in str(refused.value)
    assert ".stackctl/redis-password" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_the_password_is_the_first_line_of_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(realtime.REDIS_URL_VARIABLE, "sentinel://h:1/main")
    monkeypatch.delenv(realtime.PASSWORD_FILE_VARIABLE, raising=False)
    assert realtime.redis_password() is None
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret\nignored\n")
    monkeypatch.setenv(realtime.PASSWORD_FILE_VARIABLE, str(secret))
    assert realtime.redis_password() == "s3cret"
    secret.write_text("\n")
    assert realtime.redis_password() is None
    with pytest.raises(realtime.StackError, match="cannot read the Redis password"):
        realtime.redis_password(str(tmp_path / "missing"))


def stream(*ids: str) -> list[Any]:
    """What Redis answers for one channel: it exists, and its entries newest first."""
    return [1, [(i.encode(), {b"d": b'"x"'}) for i in reversed(ids)]]


def test_a_client_resuming_from_before_a_break_is_told_of_a_gap_then_gets_the_history() -> None:
    counters = Counters(now_ms=2000, last="1500-3", broken="1500-0")
    replies = [*stream("1400-0", "1500-1"), *stream("1500-2")]
    missed = missed_since(["a", "b"], "1300-0", counters, (100, 0), replies)
    assert missed.gaps == ["a", "b"]
    assert [realtime.id_key(e.split('"')[3]) for e in missed.envelopes] == [
        (1400, 0), (1500, 1), (1500, 2)]  # fmt: skip


def test_a_client_resuming_after_the_break_has_no_gap() -> None:
    counters = Counters(now_ms=2000, last="1500-3", broken="1500-0")
    missed = missed_since(["a"], "1500-1", counters, (100, 0), stream("1500-2"))
    assert missed.gaps == [] and len(missed.envelopes) == 1


def test_an_id_the_old_primary_issued_beyond_what_the_new_one_holds_is_a_gap() -> None:
    # The new primary's counter is behind the client's id, but the id is before the break.
    counters = Counters(now_ms=2000, last="1900-0", broken="1900-0")
    assert missed_since(["a"], "1850-7", counters, (100, 0), stream()).gaps == ["a"]
    with pytest.raises(UnknownId):  # without a break, an id not issued yet is refused
        missed_since(["a"], "1950-0", Counters(2000, "1900-0", None), (100, 0), stream())


class Member:
    def __init__(self) -> None:
        self.got: list[str] = []
        self.last_heard = 0.0

    def deliver(self, delivery: Delivery) -> None:
        self.got.append("gap" if isinstance(delivery, GapNotice) else delivery.id)

    def keepalive(self) -> None: ...

    def abort(self) -> None: ...


def test_a_live_message_the_recovery_replayed_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = Hub("redis://127.0.0.1:1/0", ping_interval=60)
    before, newcomer = Member(), Member()
    hub.members["c"] = {before, newcomer}
    envelopes = [realtime.envelope(i, "c", '"x"') for i in ("10-0", "11-0", "12-0")]
    # The history read after these were published; the first reached the listener before it.
    monkeypatch.setattr(realtime, "history", lambda *_: Missed(envelopes, ["c"]))
    recovery = Recovery("9-0", {"c": {before}})
    recovery.held.append(("c", Delivery(envelopes[0])))
    hub._recover(recovery)
    for text in [*envelopes[1:], realtime.envelope("13-0", "c", '"x"')]:  # still on their way
        hub._fan_out_live("c", Delivery(text))
    assert before.got == ["gap", "10-0", "11-0", "12-0", "13-0"]
    assert newcomer.got == ["10-0", "11-0", "12-0", "13-0"]  # joined during the outage
    assert hub.position == "13-0"


def test_publish_tries_again_while_redis_does_not_answer_then_raises() -> None:
    with socket.socket() as unused:  # a port nobody listens on: refused at once
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    connection = realtime.connect(f"redis://127.0.0.1:{port}/0", retry=realtime.NO_RETRY)
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        realtime.publish_json(connection, "c", "1", (10, 0), wait=1.0)
    assert time.monotonic() - started >= 0.7  # it kept trying, instead of giving up at once


def test_a_sentinel_error_is_logged_as_what_each_sentinel_answered() -> None:
    import redis.sentinel

    from stackctl.realtime import describe_error

    long = ("No master found for 'main' : <redis.client.Redis(<ConnectionPool(<Connection("
            "host=10.0.0.1,port=26379)>)>)> - auth:AuthenticationError, <redis.client.Redis(...)>"
            " - network:TimeoutError")  # fmt: skip
    assert describe_error(redis.sentinel.MasterNotFoundError(long)) == (
        "no Sentinel names a primary: the Sentinels answered auth:AuthenticationError, "
        "network:TimeoutError"
    )


def test_status_says_what_the_sentinels_answered_not_their_connections() -> None:
    """`stackctl status` shows the websocket worker's trouble: redis-py's "no master found"
    would put every Sentinel's connection there, in one line of 1,000s of characters."""
    import gevent
    import redis.sentinel

    class Probe:
        def ping(self) -> None:
            raise redis.sentinel.MasterNotFoundError(
                "No master found for 'main' : <redis.client.Redis(<ConnectionPool(<Connection("
                "host=10.0.0.1,port=26379)>)>)> - auth:AuthenticationError"
            )

    hub = Hub("redis://127.0.0.1:1/0", ping_interval=60)
    hub._listener, hub._connected, hub._probe = gevent.spawn(gevent.sleep, 5), True, Probe()
    try:
        assert hub.trouble() == (
            "Redis does not answer: no Sentinel names a primary: the Sentinels answered "
            "auth:AuthenticationError"
        )
    finally:
        hub._listener.kill()
