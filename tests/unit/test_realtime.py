"""The pure parts of realtime delivery: ids, envelopes, tokens, access rules and resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from stackctl import realtime
from stackctl.ws.access import Refused, Rules, subscription
from stackctl.ws.counters import Counters
from stackctl.ws.hub import Delivery, Hub, Resume

KEY = b"test secret"
RULES = Rules(secret=KEY, token_max_age=60)


def test_ids_order_by_time_then_sequence() -> None:
    ids = ["1700000000000-10", "1700000000000-9", "1700000000001-0"]
    assert sorted(ids, key=realtime.id_key) == [ids[1], ids[0], ids[2]]


def test_an_envelope_is_json_carrying_the_encoded_message() -> None:
    text = realtime.envelope("5-1", "news", json.dumps({"a": [1, "é"]}))
    assert json.loads(text) == {"id": "5-1", "channel": "news", "data": {"a": [1, "é"]}}


def test_a_token_names_its_user_and_groups_and_only_with_the_right_key() -> None:
    token = realtime.token("alice", ["staff", "admins"], key=KEY)
    assert realtime.read_token(token, KEY, max_age=60) == ("alice", {"staff", "admins"})
    with pytest.raises(ValueError, match="signature"):
        realtime.read_token(token, b"another key", max_age=60)
    with pytest.raises(ValueError, match="expired"):
        realtime.read_token(token, KEY, max_age=-1)  # any age is over a negative limit


def environ(path: str, query: str = "", **headers: str) -> dict[str, Any]:
    return {"PATH_INFO": path, "QUERY_STRING": query, "HTTP_HOST": "site.test:8000", **headers}


def refused(env: dict[str, Any], rules: Rules = RULES) -> str:
    with pytest.raises(Refused) as caught:
        subscription(env, "/ws/", rules)
    return f"{caught.value.status}: {caught.value.reason}"


def test_channels_come_from_the_path_and_the_last_id_from_since() -> None:
    sub = subscription(environ("/ws/news,user:alice", "since=12-3&token="
                               + realtime.token("alice", key=KEY)), "/ws/", RULES)  # fmt: skip
    assert (sub.channels, sub.since, sub.user) == (("news", "user:alice"), "12-3", "alice")
    assert refused(environ("/ws/a b")).startswith("400 Bad Request: expected 1 to 32 channels")
    assert refused(environ("/ws/news", "since=yesterday")).startswith("400 Bad Request: since")


def test_private_channels_need_a_token_that_names_them() -> None:
    bob = realtime.token("bob", ["sales"], key=KEY)
    assert refused(environ("/ws/user:alice")) == "403 Forbidden: 'user:alice' needs a token " \
        "for that user"  # fmt: skip
    assert refused(environ("/ws/user:alice", f"token={bob}")).startswith("403")
    assert refused(environ("/ws/group:staff", f"token={bob}")).startswith("403")
    assert subscription(environ("/ws/group:sales", f"token={bob}"), "/ws/", RULES).user == "bob"
    assert "signature" in refused(environ("/ws/news", "token=forged"))


def test_browsers_from_other_sites_are_refused() -> None:
    assert subscription(environ("/ws/news", HTTP_ORIGIN="http://site.test:8000"), "/ws/", RULES)
    assert subscription(environ("/ws/news"), "/ws/", RULES)  # not a browser: no Origin
    assert refused(environ("/ws/news", HTTP_ORIGIN="http://evil.test")).startswith("403")
    listed = Rules(secret=KEY, token_max_age=60, allowed_origins=("https://app.test",))
    assert subscription(environ("/ws/n", HTTP_ORIGIN="https://app.test"), "/ws/", listed)
    assert refused(environ("/ws/n", HTTP_ORIGIN="http://site.test:8000"), listed)


def test_client_publishing_follows_the_profile_patterns() -> None:
    rules = Rules(secret=KEY, token_max_age=60, client_publish=("chat", "room.*"))
    assert [rules.may_publish(c) for c in ("chat", "room.7", "news", "chatter")] == [
        True, True, False, False]  # fmt: skip


class History(Hub):
    """A hub whose history is given, and grows while a replay reads it, as Redis's can."""

    def __init__(self, texts: list[str], published_meanwhile: list[Delivery],
                 resume: Resume, gaps: list[str] | None = None) -> None:  # fmt: skip
        self.texts = texts
        self.gaps = gaps or []
        self.meanwhile = published_meanwhile
        self.resume = resume
        self.counters = Counters()

    def history(self, channels: Iterable[str], since: str) -> realtime.Missed:
        for delivery in self.meanwhile:
            self.resume.admit(delivery)  # arrives live during the replay
        return realtime.Missed(self.texts, self.gaps)


def message(n: int) -> Delivery:
    return Delivery(realtime.envelope(f"100-{n}", "c", str(n)))


def test_resuming_sends_the_missed_then_the_live_each_once_in_order() -> None:
    resume = Resume(since="100-0")
    assert not resume.admit(message(2))  # arrives live before the replay starts: held
    # 3 arrives live while the history is read; the history already has 4, which the live
    # flow brings only after the replay.
    hub = History([message(n).text for n in (1, 2, 3, 4)], [message(3)], resume)
    sent: list[str] = []
    resume.replay(hub, ["c"], lambda d: sent.append(d.id))
    live = [m.id for m in (message(4), message(5)) if resume.admit(m)]
    assert sent + live == ["100-1", "100-2", "100-3", "100-4", "100-5"]


def test_a_gap_is_told_before_what_the_history_still_holds() -> None:
    resume = Resume(since="100-0")
    hub = History([message(n).text for n in (7, 8)], [], resume, gaps=["c"])
    sent: list[Delivery] = []
    resume.replay(hub, ["c"], sent.append)
    notice = '{"channel":"c","gap":true}'
    assert [d.text for d in sent] == [notice, message(7).text, message(8).text]
    assert sent[0].sse_event == f"event: gap\ndata: {notice}\n\n".encode()
    assert not resume.admit(message(8)) and resume.admit(message(9))


def test_a_client_without_a_last_id_gets_what_came_during_its_handshake_then_the_flow() -> None:
    resume = Resume(since=None)
    assert not resume.admit(message(1))  # joined, but not ready to send yet
    sent: list[str] = []
    resume.replay(History([], [], resume), ["c"], lambda d: sent.append(d.id))
    assert sent == ["100-1"]
    assert resume.admit(message(2))


def test_token_app_hands_out_a_token_for_the_user_the_app_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret"
    realtime.ensure_secret(secret)
    assert secret.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(realtime.SECRET_FILE_VARIABLE, str(secret))
    app = realtime.token_app(lambda environ: (environ["REMOTE_USER"], ["staff"]))
    statuses: list[str] = []
    body = b"".join(app({"REMOTE_USER": "alice"}, lambda status, headers: statuses.append(status)))
    assert statuses == ["200 OK"]
    token = json.loads(body)["token"]
    assert realtime.read_token(token, secret.read_bytes(), 60) == ("alice", {"staff"})


DJANGO_TOKEN = """
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
)
django.setup()
from django.contrib.auth.models import AnonymousUser, Group, User
from django.core.management import call_command
from django.test import RequestFactory
from stackctl import realtime

call_command("migrate", verbosity=0)
alice = User.objects.create_user("alice")
alice.groups.add(Group.objects.create(name="staff"))
request = RequestFactory().get("/")
for user in (alice, AnonymousUser()):
    request.user = user
    print(realtime.read_token(realtime.django_token(request), realtime.secret(), 60))
"""


def test_django_token_names_the_logged_in_user_and_groups(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    realtime.ensure_secret(secret)
    # Django's settings are process-wide: configure them in a process of their own.
    out = subprocess.run(
        [sys.executable, "-c", DJANGO_TOKEN], capture_output=True, text=True, check=True,
        env={**os.environ, realtime.SECRET_FILE_VARIABLE: str(secret)}, timeout=60,
    ).stdout.splitlines()  # fmt: skip
    assert out == ["('alice', frozenset({'staff'}))", "(None, frozenset())"]


def test_the_worker_reads_request_heads_as_pywsgi_expects() -> None:
    from io import BytesIO

    from stackctl.ws.server import RequestHead

    raw = b"Host: a.test\r\nUpgrade: websocket\r\nX-Long: one\r\n  two\r\n\r\nbody"
    head = RequestHead(BytesIO(raw), 0)
    assert (head.status, head.get("upgrade"), head.get("HOST"), head.get("missing", "-")) == (
        "", "websocket", "a.test", "-")  # fmt: skip
    assert head.headers == ["Host: a.test\r\n", "Upgrade: websocket\r\n", "X-Long: one\r\n",
                            "  two\r\n"]  # fmt: skip
    assert RequestHead(BytesIO(b"X: " + b"y" * 9000 + b"\r\n\r\n"), 0).status


@pytest.mark.parametrize(
    "text",
    ["not json", "[1]", "5", '{"channel": "c"}', '{"id": 5}', '{"id": "x-1"}',
     '{"id": "1-0",\n"data": 1}'],  # fmt: skip
)
def test_what_did_not_come_from_publish_is_no_delivery(text: str) -> None:
    assert Delivery.from_bus(text) is None


def test_an_envelope_from_the_bus_is_a_delivery() -> None:
    delivery = Delivery.from_bus(realtime.envelope("5-1", "news", "[1]"))
    assert delivery is not None and delivery.id == "5-1" and delivery.key == (5, 1)


def test_a_crashed_listener_ends_the_worker_instead_of_leaving_it_deaf() -> None:
    import gevent

    crashed: list[BaseException | None] = []
    hub = Hub("redis://127.0.0.1:1/0", ping_interval=60,
              on_crash=lambda greenlet: crashed.append(greenlet.exception))  # fmt: skip

    def broken_listener() -> None:
        raise RuntimeError("a bug")

    hub._listen_forever = broken_listener  # type: ignore[method-assign]
    hub.start()
    gevent.sleep(0.1)
    hub.stop()
    assert [str(e) for e in crashed] == ["a bug"]
    assert not hub.listening


def test_the_worker_options_are_the_profile_settings() -> None:
    from stackctl.settings import BY_KEY
    from stackctl.ws import server

    options = server.parser()
    defaults = vars(options.parse_args(["--fd", "3"]))
    helps = {action.dest: action.help for action in options._actions}
    for key in server.OPTIONS:
        setting = BY_KEY[key]
        assert defaults[setting.field] == setting.default, key
        assert helps[setting.field] == setting.help, key
    assert defaults["client_publish"] == list(BY_KEY["ws.client_publish"].default)
    history = (BY_KEY["ws.history"].default, BY_KEY["ws.history_seconds"].default)
    assert history == realtime.DEFAULT_HISTORY
    # Every ws.* setting reaches the worker: as an option, or (the history) through Circus's
    # environment.
    passed = {*server.OPTIONS, *server.REPEATED_OPTIONS, "ws.history", "ws.history_seconds"}
    assert {key for key in BY_KEY if key.startswith("ws.")} <= passed


def test_the_secret_is_never_written_through_a_planted_link(tmp_path: Path) -> None:
    from stackctl.realtime import ensure_secret

    target = tmp_path / "victim"
    target.write_text("precious")
    secret = tmp_path / ".stackctl" / "secret"
    secret.parent.mkdir()
    (secret.parent / "secret.new").symlink_to(target)
    ensure_secret(secret)
    assert target.read_text() == "precious"
    assert not secret.is_symlink() and len(secret.read_text()) > 30
    assert secret.stat().st_mode & 0o777 == 0o600
