"""The MQTT bridge's resume point: acknowledgements in any order advance it only over an unbroken prefix, and
it survives in its state file; a bad state file is refused with its path and what was found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_service.bridges.acks import AckCursor, read_state, write_state
from stream_service.errors import BridgeError
from stream_service.wire.messages import VerdictIds

IDS = [VerdictIds().new(1_796_000_000_000_000_000 + i * 1000) for i in range(5)]


@pytest.mark.parametrize(
    ("acks", "expected"),
    [
        ([], None),
        ([1], IDS[0]),
        ([2], None),  # the first one is not confirmed yet: resuming after the second would lose it
        ([2, 1], IDS[1]),
        ([1, 3, 2], IDS[2]),
        ([5, 4, 3, 2, 1], IDS[4]),
        ([1, 2, 4, 5], IDS[1]),
    ],
)
def test_the_cursor_advances_over_the_acknowledged_prefix_only(
    tmp_path: Path, acks: list[int], expected: str | None
) -> None:
    cursor = AckCursor(tmp_path / "state.json")
    for mid, verdict_id in enumerate(IDS, start=1):
        cursor.sent(mid, verdict_id, now=float(mid))
    for mid in acks:
        cursor.ack(mid)
    assert cursor.acked == expected
    assert read_state(tmp_path / "state.json") == expected
    assert cursor.in_flight == len(IDS) - (IDS.index(expected) + 1 if expected else 0)
    assert AckCursor(tmp_path / "state.json").acked == expected  # a restarted bridge resumes there


def test_an_acknowledgement_that_arrives_before_its_send_is_noted_still_counts(tmp_path: Path) -> None:
    cursor = AckCursor(tmp_path / "state.json")
    cursor.ack(1)  # the PUBACK raced ahead of sent() on the network thread
    assert cursor.acked is None
    cursor.sent(1, IDS[0], now=0.0)
    assert cursor.acked == IDS[0] and cursor.in_flight == 0


def test_reset_forgets_what_a_lost_connection_sent_and_keeps_the_acknowledged(tmp_path: Path) -> None:
    cursor = AckCursor(tmp_path / "state.json")
    cursor.sent(1, IDS[0], now=10.0)
    cursor.sent(2, IDS[1], now=11.0)
    cursor.ack(1)
    assert cursor.oldest_age_s(now=15.0) == 4.0  # the second, sent at 11
    cursor.reset()
    assert (cursor.acked, cursor.in_flight, cursor.oldest_age_s(now=20.0)) == (IDS[0], 0, 0.0)
    cursor.sent(1, IDS[1], now=21.0)  # a new connection numbers its messages afresh
    cursor.ack(1)
    assert cursor.acked == IDS[1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", 'expected {"version": 1, "acked": "<verdict_id>"}, found \'not json\''),
        ('{"version": 1}', 'expected {"version": 1, "acked"'),
        ('{"version": 1, "acked": "abc"}', "expected a verdict_id at 'acked', found 'abc'"),
        ('{"version": 1, "acked": 7}', "expected a verdict_id at 'acked', found 7"),
    ],
)
def test_a_bad_state_file_is_refused_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(BridgeError, match=r"bridge state .*state\.json: ") as caught:
        read_state(path)
    assert message in str(caught.value)


def test_the_state_file_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    write_state(path, IDS[3])
    assert json.loads(path.read_text()) == {"version": 1, "acked": IDS[3]}
    assert not path.with_name("state.json.tmp").exists()
    (tmp_path / "ro").write_text("a file, not a folder")
    with pytest.raises(BridgeError, match="expected a writable file"):
        write_state(tmp_path / "ro" / "state.json", IDS[0])
