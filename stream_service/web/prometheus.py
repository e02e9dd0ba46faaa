"""The pipeline's Prometheus metrics (``/metrics`` of the dashboard), named and typed by Prometheus' rules.

Base units in names (seconds, not milliseconds), ``_total`` on counters, one metric with a label where
the values are alternatives of one thing (``verdict="pass"|"fail"``), no label whose value changes over
the life of a series (a process's state is not a label of its restarts). Two sources:

- the verdicts the run loop's subscriber receives (``PipelineMetrics.verdict``):
  ``stream_service_verdicts_total{camera,verdict}``,
  ``stream_service_latency_seconds{stage,camera}`` (a histogram per stage and end to end, from the
  verdict's ``latency_ms``), ``stream_service_subscriber_missed_verdicts_total{camera}`` (sequence gaps
  the pipeline did not report as dropped: this subscriber's own losses);
- the stages' newest heartbeats, the supervisor's view of each process and the cameras' health
  (``PipelineMetrics.update``, read at scrape time by a custom collector), i.e. what the stages count:
  ``stream_service_frames_dropped_total{stage,process,camera,reason}``,
  ``stream_service_messages_rejected_total{stage,process,reason}``,
  ``stream_service_processing_errors_total{stage,process,error}``,
  ``stream_service_frames_captured_total{camera}``, ``stream_service_camera_errors_total{camera}``,
  ``stream_service_camera_up{camera}``, ``stream_service_process_up{stage,process}`` and
  ``stream_service_process_restarts_total{process}``. A frame is dropped for a ``reason``:
  ``send_queue_full``, ``superseded`` (drop-oldest) or ``wrong_size`` (refused at the capture). A camera
  is up while its health (status messages and heartbeats, as ``/healthz`` sees it) is ``online`` with a
  frame within ``health.camera_stale_s`` and its capture process runs.

Plus ``stream_service_build_info{version}``. A stage's counters start again from 0 when its process is
restarted; Prometheus' ``rate()`` and ``increase()`` treat that as the counter reset it is. Each
``PipelineMetrics`` has its own ``CollectorRegistry``, so several dashboards (and tests) in one process
never share or collide on a metric.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stream_service import __version__
from stream_service.runtime.heartbeat import HeartbeatRecord, StageKind
from stream_service.settings import DashboardSettings, HealthSettings
from stream_service.wire.messages import Verdict

if TYPE_CHECKING:
    from stream_service.runtime.supervisor import StageState

CONTENT_TYPE = CONTENT_TYPE_LATEST  # what ``exposition()`` is written in
# 1 ms to 10 s (``dashboard.latency_buckets_s``): a healthy stage takes milliseconds, a backlog seconds.
LATENCY_BUCKETS_S = DashboardSettings().latency_buckets_s
CAMERA_STALE_S = HealthSettings().camera_stale_s  # an online camera with no frame for this long is down
# Why a stage lost a frame (the ``reason`` of stream_service_frames_dropped_total).
SEND_QUEUE_FULL = "send_queue_full"  # the stage could not queue it downstream (queue full or peer absent)
SUPERSEDED = "superseded"  # the stage's receiver kept a newer frame of the camera instead (drop-oldest)
WRONG_SIZE = "wrong_size"  # the capture refused a frame of another size than the camera's reference
_PREFIX = "stream_service_"
_MS_PER_S = 1000.0


@dataclass(frozen=True)
class ProcessSample:
    """One stage process as the supervisor saw it at the run loop's last tick."""

    name: str
    stage: StageKind
    state: str  # the supervisor's: pending | starting | running | restarting | failed | stopped
    restarts: int
    heartbeat: HeartbeatRecord | None

    @classmethod
    def of(cls, stage: StageState) -> ProcessSample:
        return cls(stage.name, stage.spec.kind, stage.state, stage.restarts, stage.heartbeat)


def camera_of(sample: ProcessSample) -> str:
    """The camera id of a capture process: from its heartbeat, else its name (``capture-<camera>``)."""
    camera = sample.heartbeat.stats.camera if sample.heartbeat is not None else None
    return camera if camera is not None else sample.name.removeprefix("capture-")


def camera_up(health: Mapping[str, Any] | None, capture: ProcessSample | None, stale_s: float) -> bool:
    """Whether a camera delivers frames: its ``health`` (``PipelineSummary.snapshot()["health"]["cameras"]``
    entry: state and age of its newest frame, from its status messages or its capture's heartbeat) is
    ``online`` with a frame within ``stale_s``, and its ``capture`` process (when supervised) runs. Without a
    health (a capture that reports none): the capture's heartbeat runs with frames within its rate window."""
    if capture is not None and capture.state != "running":
        return False
    if health is not None:
        age = health.get("last_frame_age_s")
        return bool(health.get("state") == "online" and (age is None or age <= stale_s))
    beat = capture.heartbeat if capture is not None else None
    if beat is None or beat.state != "running":
        return False
    if beat.stats.health is not None:
        return beat.stats.health.state == "online"
    counts = beat.stats.capture
    return counts is not None and counts.fps > 0 and not counts.finished


class PipelineMetrics:
    """A registry of the pipeline's metrics: fed by the run loop, read by ``/metrics`` (any thread)."""

    def __init__(
        self, latency_buckets_s: Sequence[float] = LATENCY_BUCKETS_S, camera_stale_s: float = CAMERA_STALE_S
    ) -> None:
        self.registry = CollectorRegistry()
        self.camera_stale_s = camera_stale_s
        self._lock = threading.Lock()
        self._processes: tuple[ProcessSample, ...] = ()
        self._cameras: dict[str, bool] = {}
        self._verdicts = Counter(
            _PREFIX + "verdicts",
            "Verdicts the run loop received, by camera and verdict (pass or fail).",
            ["camera", "verdict"],
            registry=self.registry,
        )
        self._latency = Histogram(
            _PREFIX + "latency_seconds",
            "Latency of each verdict per stage (queueing, transport, processing) and end_to_end (capture to "
            "publish), in seconds.",
            ["stage", "camera"],
            buckets=tuple(latency_buckets_s),
            registry=self.registry,
        )
        self._missed = Counter(
            _PREFIX + "subscriber_missed_verdicts",
            "Verdicts the run loop's subscriber missed (sequence gaps the pipeline did not report as dropped).",
            ["camera"],
            registry=self.registry,
        )
        Info(_PREFIX + "build", "The stream-service version serving these metrics.", registry=self.registry).info(
            {"version": __version__}
        )
        self.registry.register(_ProcessCollector(self.now))

    def verdict(self, verdict: Verdict, missed: int = 0) -> None:
        """Count ``verdict`` (and the ``missed`` verdicts just before it) and observe its latencies."""
        camera = verdict.camera_id
        self._verdicts.labels(camera, verdict.verdict).inc()
        for stage, ms in verdict.latency_ms.items():
            # Across hosts a stage's figure can be slightly negative (clock offsets, see runtime.latency);
            # a histogram's sum must not decrease, so such a sample counts as 0.
            self._latency.labels(stage, camera).observe(max(0.0, ms / _MS_PER_S))
        if missed:
            self._missed.labels(camera).inc(missed)

    def update(self, stages: Iterable[StageState], camera_health: Mapping[str, Mapping[str, Any]]) -> None:
        """Keep, for the next scrapes, a copy of the stage processes (state, restarts, newest heartbeat) and
        whether each camera is up, from ``camera_health`` (``PipelineSummary.snapshot()["health"]["cameras"]``)
        and the captures' heartbeats."""
        samples = tuple(ProcessSample.of(st) for st in stages)
        captures = {camera_of(s): s for s in samples if s.stage == "capture"}
        cameras = {
            camera: camera_up(camera_health.get(camera), captures.get(camera), self.camera_stale_s)
            for camera in sorted({*captures, *camera_health})
        }
        with self._lock:
            self._processes, self._cameras = samples, cameras

    def now(self) -> tuple[tuple[ProcessSample, ...], dict[str, bool]]:
        """The processes and the cameras' up state of the last ``update``."""
        with self._lock:
            return self._processes, self._cameras

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


class _ProcessCollector(Collector):
    """The stages' own counters, from their newest heartbeats, and the supervisor's view of each process."""

    def __init__(self, latest: Callable[[], tuple[tuple[ProcessSample, ...], dict[str, bool]]]) -> None:
        self._latest = latest

    def collect(self) -> Iterator[Metric]:
        samples, cameras = self._latest()
        yield from _stage_counters(samples)
        yield from _capture_metrics([s for s in samples if s.stage == "capture"], cameras)
        up = GaugeMetricFamily(
            _PREFIX + "process_up", "1 while the supervisor sees the process running.", labels=["stage", "process"]
        )
        restarts = CounterMetricFamily(
            _PREFIX + "process_restarts", "Restarts of each stage process by the supervisor.", labels=["process"]
        )
        for s in samples:
            up.add_metric([s.stage, s.name], 1.0 if s.state == "running" else 0.0)
            restarts.add_metric([s.name], s.restarts)
        yield up
        yield restarts


def _stage_counters(samples: Sequence[ProcessSample]) -> Iterator[Metric]:
    dropped = CounterMetricFamily(
        _PREFIX + "frames_dropped",
        "Frames (and verdicts) a stage process dropped, by camera and reason: send_queue_full (could not queue "
        "downstream), superseded (a newer frame of the camera was taken instead: drop-oldest) or wrong_size "
        "(the capture refused a frame of another size than the camera's reference).",
        labels=["stage", "process", "camera", "reason"],
    )
    rejected = CounterMetricFamily(
        _PREFIX + "messages_rejected",
        "Malformed messages a stage process received and rejected, by reason.",
        labels=["stage", "process", "reason"],
    )
    errors = CounterMetricFamily(
        _PREFIX + "processing_errors",
        "Messages a stage process failed to process, by error.",
        labels=["stage", "process", "error"],
    )
    for s in samples:
        if s.heartbeat is None:
            continue
        stats, labels = s.heartbeat.stats, [s.stage, s.name]
        if stats.capture is not None:
            dropped.add_metric([*labels, camera_of(s), SEND_QUEUE_FULL], stats.capture.dropped)
            dropped.add_metric([*labels, camera_of(s), WRONG_SIZE], stats.capture.refused)
        if stats.receiver is not None:
            for camera, n in sorted(stats.receiver.dropped.items()):
                dropped.add_metric([*labels, camera, SUPERSEDED], n)
        if stats.sender is not None and stats.capture is None:  # a capture's sender drops are capture.dropped
            for camera, n in sorted(stats.sender.dropped.items()):
                dropped.add_metric([*labels, camera, SEND_QUEUE_FULL], n)
        if stats.stage is not None:
            for reason, n in sorted(stats.stage.rejected.items()):
                rejected.add_metric([*labels, reason], n)
            for error, n in sorted(stats.stage.errors.items()):
                errors.add_metric([*labels, error], n)
    return iter((dropped, rejected, errors))


def _capture_metrics(captures: Sequence[ProcessSample], cameras: Mapping[str, bool]) -> Iterator[Metric]:
    frames = CounterMetricFamily(_PREFIX + "frames_captured", "Frames each camera's capture read.", labels=["camera"])
    camera_errors = CounterMetricFamily(
        _PREFIX + "camera_errors", "Errors of each camera (could not be opened, vanished).", labels=["camera"]
    )
    up = GaugeMetricFamily(
        _PREFIX + "camera_up", "1 while the camera delivers frames (its health is online), else 0.", labels=["camera"]
    )
    for camera, is_up in cameras.items():
        up.add_metric([camera], 1.0 if is_up else 0.0)
    for s in captures:
        capture = s.heartbeat.stats.capture if s.heartbeat is not None else None
        if capture is not None:
            frames.add_metric([camera_of(s)], capture.frames)
            camera_errors.add_metric([camera_of(s)], capture.camera_errors)
    return iter((frames, camera_errors, up))
