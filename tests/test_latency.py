"""Stamps -> per-stage durations, end to end, sliding-window percentiles, frame rate."""

from __future__ import annotations

import numpy as np
import pytest

from stream_service.errors import ConfigError
from stream_service.runtime.latency import (
    END_TO_END,
    FpsCounter,
    LatencyTracker,
    Percentiles,
    latency_breakdown,
    stage_durations_ms,
)
from stream_service.wire.messages import Stamp

MS = 1_000_000


def stamps(*pairs: tuple[str, float]) -> list[Stamp]:
    return [Stamp(stage=stage, t_ns=int(ms * MS)) for stage, ms in pairs]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], {}),
        ([("capture", 0)], {}),
        ([("capture", 0), ("soartc", 4.5)], {"soartc": 4.5}),
        ([("capture", 10), ("soartc", 14), ("infer", 20)], {"soartc": 4.0, "infer": 6.0}),
        ([("capture", 0), ("soartc", 1), ("soartc", 3)], {"soartc": 3.0}),  # a repeated stage adds up
    ],
)
def test_stage_durations_are_differences_of_consecutive_stamps(
    given: list[tuple[str, float]], expected: dict[str, float]
) -> None:
    assert stage_durations_ms(stamps(*given)) == pytest.approx(expected)


def test_breakdown_adds_the_publishing_stage_and_end_to_end() -> None:
    trail = stamps(("capture", 100), ("soartc", 104))
    assert latency_breakdown(trail, now_ns=112 * MS, stage="infer") == pytest.approx(
        {"soartc": 4.0, "infer": 8.0, END_TO_END: 12.0}
    )
    assert latency_breakdown(trail, now_ns=112 * MS) == pytest.approx({"soartc": 4.0, END_TO_END: 12.0})
    assert latency_breakdown([], now_ns=5) == {}


def test_tracker_percentiles_over_a_sliding_window() -> None:
    tracker = LatencyTracker(window=100)
    for ms in range(1000):  # only the last 100 samples (900..999) count
        tracker.add({"infer": float(ms), END_TO_END: 2.0 * ms})
    result = tracker.percentiles()
    window = np.arange(900, 1000, dtype=float)
    assert result["infer"] == Percentiles(
        p50=float(np.percentile(window, 50)),
        p95=float(np.percentile(window, 95)),
        p99=float(np.percentile(window, 99)),
        count=100,
    )
    assert result[END_TO_END].p99 == pytest.approx(2 * np.percentile(window, 99))
    assert tracker.snapshot()["infer"]["count"] == 100


def test_tracker_keeps_stages_independent() -> None:
    tracker = LatencyTracker(window=10)
    tracker.add({"soartc": 1.0})
    tracker.add({"soartc": 3.0, "infer": 5.0})
    result = tracker.percentiles()
    assert (result["soartc"].count, result["infer"].count) == (2, 1)
    assert result["soartc"].p50 == 2.0


def test_fps_counts_ticks_within_the_window() -> None:
    fps = FpsCounter(window_s=1.0)
    assert fps.fps(now_ns=0) == 0.0
    for i in range(31):  # 30 intervals of 1/30 s
        fps.tick(i * 1_000_000_000 // 30)
    assert fps.fps(now_ns=1_000_000_000) == pytest.approx(30.0, rel=1e-3)
    assert fps.fps(now_ns=10_000_000_000) == 0.0  # the stream stopped: the window emptied


@pytest.mark.parametrize("make", [lambda: LatencyTracker(window=0), lambda: FpsCounter(window_s=0)])
def test_bad_windows_are_config_errors(make: object) -> None:
    with pytest.raises(ConfigError, match="expected"):
        make()  # type: ignore[operator]
