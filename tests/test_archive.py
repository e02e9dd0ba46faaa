"""HighlightArchive: which highlight pictures are kept, under which names, and what is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stream_service.errors import InputError
from stream_service.web.archive import HighlightArchive
from stream_service.wire.messages import Message, Verdict, VerdictIds, highlight_header, utc_time


@pytest.fixture
def verdict(make_verdict: Callable[..., Verdict]) -> Callable[[int, str], Verdict]:
    return lambda seq, judged: make_verdict(seq=seq, verdict=judged, score=0.9 if judged == "fail" else 0.1)


def highlight(v: Verdict, picture: bytes) -> Message:
    return Message("highlights.cam0", highlight_header(v, picture), [np.frombuffer(picture, np.uint8)])


def test_pictures_are_named_by_verdict_id_so_a_restarted_capture_overwrites_nothing(
    tmp_path: Path, make_verdict: Callable[..., Verdict]
) -> None:
    archive = HighlightArchive(tmp_path)
    ids, t_ns = VerdictIds(), 1_796_226_000_000_000_000
    # the capture restarted: seq 1 twice, two different verdicts
    first, again = (
        make_verdict(seq=1, verdict="fail", verdict_id=ids.new(t_ns + i), time=utc_time(t_ns + i)) for i in (0, 10**9)
    )
    for v in (first, again):
        archive.verdict(v)
    assert archive.highlight(highlight(again, b"\xff\xd8again")) == tmp_path / f"cam0/{again.verdict_id}-fail.jpg"
    assert archive.highlight(highlight(first, b"\xff\xd8first")) == tmp_path / f"cam0/{first.verdict_id}-fail.jpg"
    assert sorted(p.read_bytes() for p in (tmp_path / "cam0").iterdir()) == [b"\xff\xd8again", b"\xff\xd8first"]


def test_a_verdict_without_an_id_is_named_by_camera_and_seq(
    tmp_path: Path, verdict: Callable[[int, str], Verdict]
) -> None:
    archive = HighlightArchive(tmp_path / "pictures")
    passed, failed = verdict(7, "pass"), verdict(8, "fail")
    for v in (passed, failed):
        archive.verdict(v)
    assert archive.pending == 2
    assert archive.highlight(highlight(failed, b"\xff\xd8fail")) == tmp_path / "pictures/cam0/cam0-00000008-fail.jpg"
    assert archive.highlight(highlight(passed, b"\xff\xd8pass")) == tmp_path / "pictures/cam0/cam0-00000007-pass.jpg"
    assert (tmp_path / "pictures/cam0/cam0-00000008-fail.jpg").read_bytes() == b"\xff\xd8fail"
    assert (archive.saved, archive.pending) == (2, 0)
    assert not list((tmp_path / "pictures/cam0").glob("*.tmp"))


def test_passes_are_skipped_with_fails_only_and_unknown_verdicts_are_not_guessed(
    tmp_path: Path, verdict: Callable[[int, str], Verdict]
) -> None:
    archive = HighlightArchive(tmp_path, fails_only=True)
    archive.verdict(verdict(1, "pass"))
    assert archive.pending == 0
    assert archive.highlight(highlight(verdict(1, "pass"), b"x")) is None
    assert archive.highlight(highlight(verdict(2, "fail"), b"y")) is None  # its verdict never arrived here
    assert archive.saved == 0 and not (tmp_path / "cam0").exists()


def test_a_directory_that_cannot_be_made_is_an_input_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(InputError, match="--save-highlights: expected a writable directory"):
        HighlightArchive(blocker / "pictures")
