"""The pipeline's Prometheus metrics: what each verdict and each stage heartbeat becomes, by Prometheus' rules.

promtool checks the exposition here (skipped without it, unless $STREAM_SERVICE_REQUIRE_PROMETHEUS=1);
the live /metrics of a real pipeline, and a real Prometheus server scraping it, are checked in
tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream_service import __version__
from stream_service.runtime.heartbeat import HeartbeatRecord, beat
from stream_service.runtime.supervisor import StageSpec, StageState
from stream_service.web.prometheus import (
    LATENCY_BUCKETS_S,
    SEND_QUEUE_FULL,
    SUPERSEDED,
    WRONG_SIZE,
    PipelineMetrics,
    ProcessSample,
    camera_up,
)
from stream_service.wire.messages import Verdict

CAPTURE_STATS: dict[str, Any] = {
    "capture": {"fps": 9.5, "frames": 120, "sent": 108, "dropped": 10, "camera_errors": 1, "refused": 2},
    "sender": {"sent": 110, "dropped": {"cam0": 10}},
    "camera": "cam0",
}
SOARTC_STATS: dict[str, Any] = {
    "stage": {"received": 100, "sent": 99, "rejected": {"header json": 2}, "errors": {"FrameShapeError": 1}},
    "receiver": {"received": 100, "dropped": {"cam0": 7, "cam1": 1}},
    "sender": {"sent": 99, "dropped": {"cam0": 3}},
}
INFER_STATS: dict[str, Any] = {
    "stage": {"received": 99, "sent": 99, "rejected": {"schema_version": 1}},
    "receiver": {"received": 99, "dropped": {"cam0": 4}},
    "sender": {"sent": 99, "dropped": {}},
}


def stage(name: str, kind: Any, stats: dict[str, Any] | None, state: str = "running", restarts: int = 0) -> StageState:
    record = beat(name, kind, "running", stats) if stats is not None else None
    return StageState(StageSpec(name, kind, ()), state=state, restarts=restarts, heartbeat=record)


def pipeline_stages() -> list[StageState]:
    return [
        stage("infer", "infer", INFER_STATS, restarts=2),
        stage("soartc-0", "soartc", SOARTC_STATS),
        stage("capture-cam0", "capture", CAPTURE_STATS),
        stage("capture-cam1", "capture", None, state="starting"),  # no heartbeat yet
    ]


@pytest.fixture
def metrics(make_verdict: Callable[..., Verdict]) -> PipelineMetrics:
    """Metrics fed three verdicts of cam0 and the processes of a running pipeline."""
    fed = PipelineMetrics()
    fed.verdict(make_verdict(seq=1, latency_ms={"soartc": 12.0, "infer": 20.0, "end_to_end": 40.0}))
    fed.verdict(make_verdict(seq=2, verdict="fail", latency_ms={"soartc": 3.0, "infer": 800.0, "end_to_end": 1200.0}))
    fed.verdict(make_verdict(seq=5, verdict="fail", latency_ms={"end_to_end": 30.0}), missed=2)
    fed.update(pipeline_stages(), {})
    return fed


def value(metrics: PipelineMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.mark.parametrize(
    ("name", "labels", "expected"),
    [
        ("stream_service_verdicts_total", {"camera": "cam0", "verdict": "pass"}, 1.0),
        ("stream_service_verdicts_total", {"camera": "cam0", "verdict": "fail"}, 2.0),
        ("stream_service_subscriber_missed_verdicts_total", {"camera": "cam0"}, 2.0),
        ("stream_service_latency_seconds_count", {"stage": "end_to_end", "camera": "cam0"}, 3.0),
        ("stream_service_latency_seconds_sum", {"stage": "end_to_end", "camera": "cam0"}, 1.27),
        ("stream_service_latency_seconds_bucket", {"stage": "end_to_end", "camera": "cam0", "le": "0.05"}, 2.0),
        ("stream_service_latency_seconds_bucket", {"stage": "end_to_end", "camera": "cam0", "le": "1.0"}, 2.0),
        ("stream_service_latency_seconds_bucket", {"stage": "end_to_end", "camera": "cam0", "le": "2.5"}, 3.0),
        ("stream_service_latency_seconds_count", {"stage": "infer", "camera": "cam0"}, 2.0),
        ("stream_service_build_info", {"version": __version__}, 1.0),
    ],
)
def test_verdicts_become_counters_and_latency_histograms_in_seconds(
    metrics: PipelineMetrics, name: str, labels: dict[str, str], expected: float
) -> None:
    assert value(metrics, name, **labels) == pytest.approx(expected)


def dropped(stage: str, process: str, camera: str, reason: str) -> dict[str, str]:
    return {"stage": stage, "process": process, "camera": camera, "reason": reason}


@pytest.mark.parametrize(
    ("name", "labels", "expected"),
    [
        ("stream_service_frames_dropped_total", dropped("capture", "capture-cam0", "cam0", SEND_QUEUE_FULL), 10),
        ("stream_service_frames_dropped_total", dropped("capture", "capture-cam0", "cam0", WRONG_SIZE), 2),
        ("stream_service_frames_dropped_total", dropped("soartc", "soartc-0", "cam0", SUPERSEDED), 7),
        ("stream_service_frames_dropped_total", dropped("soartc", "soartc-0", "cam1", SUPERSEDED), 1),
        ("stream_service_frames_dropped_total", dropped("soartc", "soartc-0", "cam0", SEND_QUEUE_FULL), 3),
        ("stream_service_frames_dropped_total", dropped("infer", "infer", "cam0", SUPERSEDED), 4),
        (
            "stream_service_messages_rejected_total",
            {"stage": "soartc", "process": "soartc-0", "reason": "header json"},
            2,
        ),
        (
            "stream_service_messages_rejected_total",
            {"stage": "infer", "process": "infer", "reason": "schema_version"},
            1,
        ),
        (
            "stream_service_processing_errors_total",
            {"stage": "soartc", "process": "soartc-0", "error": "FrameShapeError"},
            1,
        ),
        ("stream_service_frames_captured_total", {"camera": "cam0"}, 120),
        ("stream_service_camera_errors_total", {"camera": "cam0"}, 1),
        ("stream_service_camera_up", {"camera": "cam0"}, 1),
        ("stream_service_camera_up", {"camera": "cam1"}, 0),  # its capture has not reported yet
        ("stream_service_process_restarts_total", {"process": "infer"}, 2),
        ("stream_service_process_restarts_total", {"process": "capture-cam1"}, 0),
        ("stream_service_process_up", {"stage": "infer", "process": "infer"}, 1),
        ("stream_service_process_up", {"stage": "capture", "process": "capture-cam1"}, 0),
    ],
)
def test_the_stages_own_counters_come_from_their_heartbeats(
    metrics: PipelineMetrics, name: str, labels: dict[str, str], expected: float
) -> None:
    assert value(metrics, name, **labels) == expected


def test_a_capture_counts_its_drops_once() -> None:
    fed = PipelineMetrics()
    fed.update([stage("capture-cam0", "capture", CAPTURE_STATS)], {})
    families = {f.name: f for f in text_string_to_metric_families(fed.exposition().decode())}
    drops = families["stream_service_frames_dropped"].samples
    assert [(s.labels["reason"], s.value) for s in drops] == [(SEND_QUEUE_FULL, 10.0), (WRONG_SIZE, 2.0)]


def test_the_latest_processes_replace_the_previous_ones(metrics: PipelineMetrics) -> None:
    metrics.update([stage("infer", "infer", INFER_STATS, state="restarting", restarts=3)], {})
    assert value(metrics, "stream_service_process_restarts_total", process="infer") == 3.0
    assert value(metrics, "stream_service_process_up", stage="infer", process="infer") == 0.0
    assert value(metrics, "stream_service_process_restarts_total", process="soartc-0") is None
    metrics.update([], {})  # `stream-service dashboard` before any status message
    assert value(metrics, "stream_service_camera_up", camera="cam0") is None
    metrics.update([], {"cam0": {"state": "online", "last_frame_age_s": 0.5}})  # from its status messages
    assert value(metrics, "stream_service_camera_up", camera="cam0") == 1.0


def test_a_negative_stage_latency_across_hosts_is_observed_as_zero(make_verdict: Callable[..., Verdict]) -> None:
    fed = PipelineMetrics()
    fed.verdict(make_verdict(latency_ms={"infer": -0.4, "end_to_end": 5.0}))
    assert value(fed, "stream_service_latency_seconds_sum", stage="infer", camera="cam0") == 0.0
    assert value(fed, "stream_service_latency_seconds_bucket", stage="infer", camera="cam0", le="0.001") == 1.0


def test_each_instance_has_its_own_registry(make_verdict: Callable[..., Verdict]) -> None:
    first, second = PipelineMetrics(), PipelineMetrics()  # a shared (global) registry would refuse the second
    first.verdict(make_verdict())
    assert value(first, "stream_service_verdicts_total", camera="cam0", verdict="pass") == 1.0
    assert value(second, "stream_service_verdicts_total", camera="cam0", verdict="pass") is None


def test_the_buckets_span_1_ms_to_10_s_and_can_be_set(make_verdict: Callable[..., Verdict]) -> None:
    assert (LATENCY_BUCKETS_S[0], LATENCY_BUCKETS_S[-1]) == (0.001, 10.0)
    custom = PipelineMetrics(latency_buckets_s=(0.01, 0.1))
    custom.verdict(make_verdict(latency_ms={"infer": 50.0}))
    bounds = [s.labels["le"] for f in custom.registry.collect() for s in f.samples if s.name.endswith("_bucket")]
    assert bounds == ["0.01", "0.1", "+Inf"]


def health(state: str) -> dict[str, Any]:
    return {"health": {"state": state, "since": 1.0}}


def seen(state: str, age: float | None) -> dict[str, Any]:
    """A camera's entry in ``PipelineSummary.snapshot()["health"]["cameras"]``."""
    return {"state": state, "reason": None, "since": 1.0, "last_frame_age_s": age}


@pytest.mark.parametrize(
    ("summary", "supervised", "beat_state", "stats", "up"),
    [
        (seen("online", 0.2), "running", "running", CAPTURE_STATS | health("online"), True),
        (seen("online", 0.2), None, None, None, True),  # `stream-service dashboard`: status messages only
        (seen("online", None), None, None, None, True),
        (seen("online", 6.0), "running", "running", CAPTURE_STATS | health("online"), False),  # stale (5 s)
        (seen("reconnecting", 0.2), "running", "running", CAPTURE_STATS | health("online"), False),  # newest wins
        (seen("failed", 9.0), None, None, None, False),
        (seen("starting", None), "running", "running", CAPTURE_STATS, False),
        (seen("online", 0.2), "restarting", "running", CAPTURE_STATS | health("online"), False),  # process gone
        (None, "running", "running", CAPTURE_STATS | health("online"), True),  # the heartbeat's own health
        (None, "running", "running", CAPTURE_STATS | health("reconnecting"), False),  # the health wins over fps
        (None, "running", "running", {"capture": {"fps": 0.0, "frames": 0}} | health("online"), True),
        (None, "running", "running", CAPTURE_STATS, True),  # no health at all: frames within the rate window
        (None, "running", "running", {"capture": {"fps": 0.0, "frames": 50}}, False),  # no frame lately
        (None, "running", "running", {"capture": {"fps": 5.0, "frames": 50, "finished": True}}, False),
        (None, "running", "starting", CAPTURE_STATS | health("online"), False),
        (None, "starting", None, None, False),  # no heartbeat yet
        (None, None, None, None, False),
    ],
)
def test_a_camera_is_up_while_online_and_delivering(
    summary: dict[str, Any] | None, supervised: str | None, beat_state: Any, stats: dict[str, Any] | None, up: bool
) -> None:
    record = None
    if beat_state is not None:
        record = HeartbeatRecord.model_validate(
            {"name": "capture-cam0", "stage": "capture", "pid": 1, "state": beat_state, "t": 0.0, "stats": stats}
        )
    capture = ProcessSample("capture-cam0", "capture", supervised, 0, record) if supervised is not None else None
    assert camera_up(summary, capture, stale_s=5.0) is up


def test_names_and_types_follow_prometheus_conventions(metrics: PipelineMetrics) -> None:
    families = list(text_string_to_metric_families(metrics.exposition().decode()))
    assert len(families) >= 14
    for family in families:
        assert family.name.startswith("stream_service_"), family.name
        assert not any(unit in family.name.split("_") for unit in ("ms", "milliseconds")), family.name
        assert "quantile" not in {k for s in family.samples for k in s.labels}, family.name
        assert "state" not in {k for s in family.samples for k in s.labels}, family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
    kinds = {f.name: f.type for f in families}
    assert kinds["stream_service_latency_seconds"] == "histogram"
    assert kinds["stream_service_camera_up"] == "gauge" and kinds["stream_service_verdicts"] == "counter"


def test_promtool_finds_nothing_to_complain_about(metrics: PipelineMetrics, promtool: str) -> None:
    text = metrics.exposition()
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert done.returncode == 0 and not done.stdout and not done.stderr, (done.stdout + done.stderr).decode()


def test_promtool_catches_what_the_hand_written_metrics_did(promtool: str) -> None:
    bad = b"# HELP stream_service_latency_ms Latency.\n# TYPE stream_service_latency_ms gauge\n"
    bad += b'stream_service_latency_ms{stage="infer",quantile="0.99"} 3\n'
    done = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, timeout=60)
    assert done.returncode != 0 and b"stream_service_latency_ms" in done.stdout + done.stderr
