"""The subscriber's replay-then-live loop (``subscribe --since``), driven by an in-memory SUB queue and journal:
every verdict after ``since`` exactly once and in order, whatever the live stream lost or repeated."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stream_service.errors import JournalError
from stream_service.runtime.subscriber import VerdictSubscriber
from stream_service.wire.messages import Message, Verdict, VerdictIds, utc_time

T0_NS = 1_796_226_000_000_000_000


class Journal:
    """What the infer stage's journal holds at each request: ``grows`` verdicts more after each request."""

    def __init__(self, verdicts: list[Verdict], visible: int, grows: int = 0) -> None:
        self.verdicts, self.visible, self.grows = verdicts, visible, grows
        self.requests: list[str | None] = []

    def after(self, since: str | None, camera: str | None = None) -> Iterator[Verdict]:
        self.requests.append(since)
        kept = self.verdicts[: self.visible]
        self.visible += self.grows
        ids = [v.verdict_id for v in kept]
        if since is None:
            start = 0
        elif since in ids:
            start = ids.index(since) + 1
        elif since.endswith("Z"):
            start = next((i for i, v in enumerate(kept) if (v.time or "") >= since), len(kept))
        else:
            raise JournalError(f"since: expected the verdict_id of a verdict in the journal, found {since!r}")
        yield from (v for v in kept[start:] if camera is None or v.camera_id == camera)


class Receiver:
    """The SUB socket: what it holds, delivered one per ``receive``."""

    def __init__(self, verdicts: list[Verdict]) -> None:
        self.queue = [Message(f"verdicts.{v.camera_id}", v, []) for v in verdicts]

    def receive(self, timeout_s: float) -> Message | None:
        return self.queue.pop(0) if self.queue else None


@pytest.fixture
def line(make_verdict: Callable[..., Verdict]) -> list[Verdict]:
    """60 verdicts of one camera, 100 ms apart, ids in time order."""
    ids = VerdictIds()
    out = []
    for seq in range(60):
        t_ns = T0_NS + seq * 100_000_000
        out.append(make_verdict("cam0", seq, verdict_id=ids.new(t_ns), time=utc_time(t_ns)))
    return out


def run(journal: Journal, live: list[Verdict], since: str | None, **kwargs: Any) -> tuple[list[Verdict], Any]:
    got: list[Verdict] = []
    subscriber = VerdictSubscriber(Receiver(live), timeout_s=0.3, journal=journal, since=since, **kwargs)  # type: ignore[arg-type]
    subscriber.run(got.append)
    return got, subscriber


def test_replayed_then_live_overlapping_verdicts_come_once_in_order(line: list[Verdict]) -> None:
    journal = Journal(line, visible=40)
    got, subscriber = run(journal, line[30:60], since=line[9].verdict_id)  # the SUB queue overlaps the replay
    assert got == line[10:60] and subscriber.replayed == 30 and subscriber.missed == 0


def test_what_the_live_stream_lost_before_its_subscription_arrived_comes_from_the_journal(line: list[Verdict]) -> None:
    # At the replay the journal holds 0..19; 20..24 are published before the subscription is active (lost
    # live); the SUB socket then receives 25..59 while the journal keeps growing.
    journal = Journal(line, visible=20, grows=40)
    got, _ = run(journal, line[25:60], since=line[4].verdict_id)
    assert got == line[5:60]
    assert journal.requests[:2] == [line[4].verdict_id, line[19].verdict_id]  # caught up after the last handed on


def test_a_gap_in_the_live_stream_is_filled_from_the_journal(line: list[Verdict]) -> None:
    journal = Journal(line, visible=10, grows=50)
    live = [v for v in line[10:60] if v.seq not in (33, 34, 47)]  # lost to a full SUB queue
    got, _ = run(journal, live, since=line[9].verdict_id)
    assert got == line[10:60]


def test_live_verdicts_made_before_since_are_not_handed_on(line: list[Verdict]) -> None:
    journal = Journal(line, visible=60)
    got, _ = run(journal, line[0:60], since=line[29].verdict_id)
    assert got == line[30:60]


def test_since_a_time_replays_from_that_time(line: list[Verdict]) -> None:
    journal = Journal(line, visible=60)
    assert line[15].time is not None
    got, _ = run(journal, line[50:60], since=line[15].time)
    assert got == line[15:60]


def test_the_count_can_be_reached_during_the_replay(line: list[Verdict]) -> None:
    got, _ = run(Journal(line, visible=60), [], since=line[0].verdict_id, count=7)
    assert got == line[1:8]


def test_an_unknown_since_is_the_journal_error_for_the_caller(line: list[Verdict]) -> None:
    with pytest.raises(JournalError, match="since: expected the verdict_id of a verdict in the journal"):
        run(Journal(line, visible=60), [], since="01a23768-5eba-72a1-8876-7a619778c6d2")


def test_without_since_nothing_is_asked_from_the_journal(line: list[Verdict]) -> None:
    journal = Journal(line, visible=60)
    got, _ = run(journal, line[50:60], since=None)
    assert got == line[50:60] and journal.requests == []


def test_a_catch_up_that_reaches_the_count_hands_on_nothing_more(line: list[Verdict]) -> None:
    journal = Journal(line, visible=10, grows=50)
    got, _ = run(journal, line[30:60], since=line[4].verdict_id, count=12)
    assert got == line[5:17]
