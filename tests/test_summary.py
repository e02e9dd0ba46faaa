"""The live summary and the verdict one-liner: pure text from verdicts and stage states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from stream_service.runtime.heartbeat import HeartbeatRecord, HeartbeatStats, StageKind
from stream_service.runtime.summary import PipelineSummary, format_status, missed_between, verdict_line
from stream_service.wire.messages import Region, Verdict


def verdict(seq: int, camera: str = "cam0", result: str = "pass", dropped: int = 0, **extra: Any) -> Verdict:
    return Verdict.model_validate(
        {
            "camera_id": camera,
            "seq": seq,
            "capture_ns": 0,
            "verdict": result,
            "score": 0.8 if result == "fail" else 0.1,
            "threshold": 0.5,
            "model_id": "m",
            "model_version": "1",
            "reference_id": "r",
            "reference_version": "1",
            "dropped": dropped,
            "latency_ms": {"soartc": 10.0 + seq, "infer": 20.0, "end_to_end": 30.0 + seq},
            **extra,
        }
    )


@pytest.mark.parametrize(
    ("last", "seq", "dropped", "missed"),
    [(None, 5, 0, 0), (4, 5, 0, 0), (4, 8, 0, 3), (4, 8, 3, 0), (4, 8, 1, 2), (9, 2, 0, 0), (4, 6, 5, 0)],
)
def test_missed_is_the_sequence_gap_that_dropped_does_not_explain(
    last: int | None, seq: int, dropped: int, missed: int
) -> None:
    assert missed_between(last, seq, dropped) == missed


def beat(stage: StageKind, stats: dict[str, Any]) -> HeartbeatRecord:
    return HeartbeatRecord(name=stage, stage=stage, pid=1, state="running", t=0.0, stats=HeartbeatStats(**stats))


@dataclass
class Row:
    name: str
    pid: int | None
    state: str
    restarts: int
    heartbeat: HeartbeatRecord | None


def test_summary_counts_and_renders_cameras_latency_and_stages() -> None:
    summary = PipelineSummary()
    truth_fail = {"label": "fail", "boxes": [[1, 2, 3, 4, 1]]}
    for i, seq in enumerate([0, 1, 2, 5, 6]):
        result = "fail" if seq % 2 else "pass"
        summary.add(verdict(seq, result=result, dropped=1 if seq == 5 else 0, truth=truth_fail), i * 100_000_000)
    summary.add(verdict(0, camera="cam1"), 0)
    tally = summary.cameras["cam0"]
    assert (tally.passed, tally.failed, tally.dropped, tally.missed) == (3, 2, 1, 1)
    assert (tally.truth_agree, tally.truth_total) == (2, 5) and summary.total == 6
    rows = [
        Row(
            "infer",
            11,
            "running",
            0,
            beat("infer", {"stage": {"fps": 9.5, "rejected": {"header json": 2}, "errors": {}}}),
        ),
        Row("capture-cam0", None, "restarting", 3, beat("capture", {"capture": {"dropped": 4, "camera_errors": 1}})),
    ]
    text = summary.render(rows, 400_000_000, 12.0)
    lines = text.splitlines()
    assert lines[0].startswith("stream-service: 12 s, 6 verdicts")
    assert any(line.split()[:6] == ["cam0", "10.0", "3", "2", "1", "1"] for line in lines), text
    assert any(line.split()[0] == "end_to_end" for line in lines)
    assert any(line.split() == ["infer", "running", "11", "0", "9.5", "0", "2", "0"] for line in lines), text
    assert any(line.split() == ["capture-cam0", "restarting", "-", "3", "0.0", "4", "0", "1"] for line in lines), text
    # The dashboard's data is the same snapshot the terminal block is rendered from.
    status = summary.snapshot(rows, 400_000_000, 12.0)
    assert format_status(status) == text
    assert status["verdicts"] == 6 and status["model"] == "m 1" and list(status["cameras"]) == ["cam0", "cam1"]
    assert status["cameras"]["cam0"] | {"fps": 0} == {
        "fps": 0,
        "passed": 3,
        "failed": 2,
        "dropped": 1,
        "missed": 1,
        "truth_total": 5,
        "truth_agree": 2,
        "last_seq": 6,
    }
    assert list(status["latency_ms"]) == ["infer", "soartc", "end_to_end"]  # end to end last
    assert status["latency_ms"]["end_to_end"]["count"] == 6
    assert [p["name"] for p in status["processes"]] == ["infer", "capture-cam0"]
    assert "cam0" in summary.line(400_000_000) and "e2e p50" in summary.line(400_000_000)


def test_the_one_liner_names_camera_verdict_regions_and_latency() -> None:
    region = Region(x1=1, y1=2, x2=30, y2=40, score=0.9, area=100)
    line = verdict_line(verdict(7, result="fail", dropped=2, regions=(region,), truth={"label": "fail"}))
    assert line.startswith("cam0 #7  FAIL")
    for part in ("score 0.800/0.500", "1 region(s) [[1, 2, 30, 40]]", "e2e 37.0 ms", "dropped 2", "truth fail"):
        assert part in line
    assert "PASS" in verdict_line(verdict(1)) and "dropped" not in verdict_line(verdict(1))
    assert "unscored" not in line


def test_the_one_liner_says_why_a_frame_could_not_be_scored() -> None:
    reason = "features: expected finite token values, found 1600 of 1600 NaN or infinite"
    line = verdict_line(verdict(3, result="fail", reason=reason))
    assert line.startswith("cam0 #3  FAIL") and line.endswith(f"unscored ({reason})")
