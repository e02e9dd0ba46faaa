"""The verdict journal: append, replay after an id or a time, retention by age and size, WAL mode, bad input,
and the replay server over a real REP socket on a free loopback port."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stream_service.errors import JournalError, TransportError
from stream_service.runtime.journal import Journal, JournaledSink, JournalReader, replay_handler
from stream_service.runtime.runner import MemorySink
from stream_service.settings import JournalSettings, default_journal_path
from stream_service.wire.messages import Verdict, VerdictIds, utc_time
from stream_service.wire.replay import ReplayRequest, decode_reply, encode_request, error_text
from stream_service.wire.transport import ReplyServer, open_socket, request

T0_NS = 1_796_226_000_000_000_000  # 2026-12-02T15:40:00Z
IDS = VerdictIds()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path) -> JournalSettings:
    return JournalSettings(path=tmp_path / "state" / "journal.sqlite")


@pytest.fixture
def verdicts(make_verdict: Callable[..., Verdict]) -> Callable[[int, int], list[Verdict]]:
    """``verdicts(n, t0_ns)``: n verdicts 100 ms apart from t0, cameras cam0 and cam1 in turn."""

    def make(n: int, t0_ns: int = T0_NS) -> list[Verdict]:
        out = []
        for i in range(n):
            t_ns = t0_ns + i * 100_000_000
            out.append(make_verdict(f"cam{i % 2}", i, verdict_id=IDS.new(t_ns), time=utc_time(t_ns)))
        return out

    return make


def clock(t_ns: int) -> Callable[[], int]:
    return lambda: t_ns


def ids(texts: list[str]) -> list[str]:
    return [json.loads(t)["verdict_id"] for t in texts]


def test_a_new_journal_is_made_in_wal_mode_with_its_folder(settings: JournalSettings) -> None:
    journal = Journal(settings, clock(T0_NS))
    journal.close()
    assert settings.resolved_path.is_file()
    with sqlite3.connect(settings.resolved_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1


def test_the_default_path_is_a_persistent_per_user_state_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/srv/state")
    assert default_journal_path() == Path("/srv/state/stream-service/journal.sqlite")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_journal_path() == Path.home() / ".local" / "state" / "stream-service" / "journal.sqlite"


def test_appended_verdicts_replay_in_order_after_an_id_a_time_and_per_camera(
    settings: JournalSettings, verdicts: Callable[[int, int], list[Verdict]]
) -> None:
    made = verdicts(10, T0_NS)
    journal = Journal(settings, clock(T0_NS))
    for v in made:
        journal.append(v)
    reader = JournalReader(settings)
    everything, more = reader.after(None, None, 100)
    assert ids(everything) == [v.verdict_id for v in made] and not more
    assert [Verdict.model_validate_json(t) for t in everything] == made  # the JSON as published
    after, _ = reader.after(made[3].verdict_id, None, 100)
    assert ids(after) == [v.verdict_id for v in made[4:]]  # strictly after the id
    since, _ = reader.after(made[5].time, None, 100)
    assert ids(since) == [v.verdict_id for v in made[5:]]  # at or after the time
    cam1, _ = reader.after(made[2].verdict_id, "cam1", 100)
    assert ids(cam1) == [v.verdict_id for v in made[3::2]]
    page, more = reader.after(None, None, 4)
    assert ids(page) == [v.verdict_id for v in made[:4]] and more
    reader.close()
    journal.close()


def test_a_journal_reopened_after_the_writer_is_gone_keeps_everything_and_goes_on(
    settings: JournalSettings, verdicts: Callable[[int, int], list[Verdict]]
) -> None:
    first, second = verdicts(5, T0_NS), verdicts(5, T0_NS + 10**9)
    journal = Journal(settings, clock(T0_NS))
    for v in first:
        journal.append(v)
    del journal  # never closed, as after kill -9
    again = Journal(settings, clock(T0_NS))
    for v in second:
        again.append(v)
    rows, _ = JournalReader(settings).after(None, None, 100)
    assert ids(rows) == [v.verdict_id for v in first + second]


def test_retention_deletes_verdicts_older_than_max_age(
    settings: JournalSettings, verdicts: Callable[[int, int], list[Verdict]]
) -> None:
    day = 86_400 * 10**9
    old, recent = verdicts(4, T0_NS - 3 * day), verdicts(4, T0_NS)
    journal = Journal(settings.model_copy(update={"max_age_days": 2.0}), clock(T0_NS))
    for v in old + recent:
        journal.append(v)
    assert journal.prune() == 4
    rows, _ = JournalReader(settings).after(None, None, 100)
    assert ids(rows) == [v.verdict_id for v in recent]


def test_retention_deletes_the_oldest_verdicts_past_max_mb(
    settings: JournalSettings, make_verdict: Callable[..., Verdict]
) -> None:
    bounded = settings.model_copy(update={"max_mb": 0.25})
    journal = Journal(bounded, clock(T0_NS))
    filler = {"text": "x" * 900}
    made = [
        make_verdict("cam0", i, verdict_id=IDS.new(T0_NS + i), time=utc_time(T0_NS), truth=filler) for i in range(1000)
    ]
    for v in made:
        journal.append(v)
    assert journal.used_bytes() > 0.25 * (1 << 20)
    deleted = journal.prune()
    assert deleted > 0 and journal.used_bytes() <= 0.25 * (1 << 20)
    rows, _ = JournalReader(bounded).after(None, None, 2000)
    assert ids(rows) == [v.verdict_id for v in made[deleted:]]  # the oldest went, the newest stayed
    journal.close()
    assert settings.resolved_path.stat().st_size <= 0.3 * (1 << 20)  # freed pages went back to the file system


@pytest.mark.parametrize(
    ("since", "message"),
    [
        ("01a23768-5eba-72a1-8876-7a619778c6d2", "since: expected the verdict_id of a verdict in the journal"),
        ("last tuesday", "since: expected a verdict_id (UUIDv7) or an ISO 8601 time"),
    ],
)
def test_an_unknown_or_unreadable_since_is_an_error_naming_it(
    settings: JournalSettings, since: str, message: str
) -> None:
    Journal(settings, clock(T0_NS)).close()
    with pytest.raises(JournalError, match=re.escape(message)) as caught:
        JournalReader(settings).after(since, None, 10)
    assert repr(since) in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a database, but a text file " * 100, "expected a stream-service journal"),
        (None, "expected a stream-service journal"),
    ],
)
def test_a_corrupt_or_foreign_file_is_refused_naming_journal_path(
    settings: JournalSettings, content: bytes | None, message: str
) -> None:
    path = settings.resolved_path
    path.parent.mkdir(parents=True)
    if content is not None:
        path.write_bytes(content)
    else:
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE parts (id INTEGER)")
    with pytest.raises(JournalError, match=f"journal.path {path}: {message}"):
        Journal(settings)


def test_the_sink_journals_a_verdict_before_publishing_it_and_publishes_when_the_journal_fails(
    settings: JournalSettings, verdicts: Callable[[int, int], list[Verdict]]
) -> None:
    journal = Journal(settings, clock(T0_NS))
    reader = JournalReader(settings)
    seen_in_journal: list[bool] = []

    class Watching(MemorySink):
        def send(self, topic: str, header: object, arrays: object = ()) -> bool:  # type: ignore[override]
            seen_in_journal.append(bool(reader.after(None, None, 100)[0]))
            return super().send(topic, header, arrays)  # type: ignore[arg-type]

    published = Watching()
    sink = JournaledSink(published, journal)
    first, second = verdicts(2, T0_NS)
    assert sink.send("verdicts.cam0", first)
    assert seen_in_journal == [True]
    journal.close()  # the journal is gone: the verdict must still go out
    assert sink.send("verdicts.cam1", second)
    assert len(published.messages) == 2 and sink.errors == 1 and "journal.path" in (sink.last_error or "")


@pytest.fixture
def server(
    settings: JournalSettings, verdicts: Callable[[int, int], list[Verdict]]
) -> Iterator[tuple[str, list[Verdict]]]:
    journal = Journal(settings, clock(T0_NS))
    made = verdicts(25, T0_NS)
    for v in made:
        journal.append(v)
    reader = JournalReader(settings)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    rep = ReplyServer(endpoint, replay_handler(reader, 10), error_text, max_request_bytes=4096, linger_ms=0, poll_ms=50)
    rep.start()
    yield endpoint, made
    rep.close()
    reader.close()
    journal.close()


def test_the_replay_server_pages_by_its_limit_and_answers_bad_requests_with_an_error(
    server: tuple[str, list[Verdict]],
) -> None:
    endpoint, made = server
    ask = lambda req: decode_reply(request(endpoint, encode_request(req), timeout_ms=5000))  # noqa: E731
    first = ask(ReplayRequest(since=None, limit=1000))
    assert [v.verdict_id for v in first.verdicts] == [v.verdict_id for v in made[:10]] and first.more  # capped
    rest = ask(ReplayRequest(since=first.verdicts[-1].verdict_id, limit=1000))
    assert rest.verdicts[0] == made[10]
    unknown = ask(ReplayRequest(since="01a23768-5eba-72a1-8876-7a619778c6d2"))
    assert unknown.error is not None and "since: expected the verdict_id" in unknown.error and not unknown.verdicts
    for raw in (b"{not json", b'{"limit": 0}', b'{"since": 5}', b'{"camera": "a.b"}', b'{"bogus": 1}'):
        reply = decode_reply(request(endpoint, raw, timeout_ms=5000))
        assert reply.error is not None and reply.error.startswith("replay request field"), reply.error
    assert ask(ReplayRequest(limit=1)).verdicts == (made[0],)  # and it still serves


def test_a_request_to_nobody_times_out_naming_the_endpoint() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(TransportError, match=f"request to {endpoint}: expected a reply within 200 ms"):
        request(endpoint, b"{}", timeout_ms=200)


def test_a_request_of_several_parts_or_over_the_size_bound_never_stops_the_server(
    server: tuple[str, list[Verdict]],
) -> None:
    endpoint, made = server
    req = open_socket("req", endpoint, bind=False, hwm=1, linger_ms=0)
    try:
        req.send_multipart([b"{}", b"{}"])
        assert req.poll(5000)
        reply = decode_reply(req.recv())
    finally:
        req.close()
    assert reply.error == "replay request: expected 1 part, found 2"
    with pytest.raises(TransportError, match="expected a reply within 500 ms"):
        request(endpoint, b" " * 10_000, timeout_ms=500)  # over max_request_bytes: refused unread
    assert decode_reply(request(endpoint, encode_request(ReplayRequest(limit=2)), timeout_ms=5000)).verdicts == tuple(
        made[:2]
    )


def test_retention_runs_at_start_and_then_every_prune_every_s(
    settings: JournalSettings, verdicts: Callable[[int, int], list[Verdict]]
) -> None:
    day = 86_400 * 10**9
    journal = Journal(settings.model_copy(update={"max_age_days": 1.0, "prune_every_s": 3600.0}), clock(T0_NS))
    for v in verdicts(3, T0_NS - 2 * day):
        journal.append(v)
    assert journal.maybe_prune() == 0  # it ran at start; the next run is an hour away
    assert journal.prune() == 3
    journal.close()
    reopened = Journal(settings.model_copy(update={"max_age_days": 1.0}), clock(T0_NS))
    assert reopened.count() == 0
