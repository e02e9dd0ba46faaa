"""The live terminal summary of a pipeline, and the one-line form of a verdict. Pure: text out, no printing.

``PipelineSummary`` is fed every verdict a subscriber receives and renders, per camera, the verdict
rate, pass and fail counts, the frames the pipeline dropped (the verdicts' ``dropped``), the verdicts
this subscriber missed (gaps in the sequence numbers that ``dropped`` does not explain: a slow
subscriber's own losses) and, for synthetic cameras, the agreement with the ground truth; p50/p99 of
every stage's latency and end to end; and, from the supervisor, each stage process with its state,
restarts and counters (from its heartbeat). The health of every camera (``status.<camera>`` messages,
and the captures' heartbeats when a supervisor runs them) and of every process is ``snapshot()["health"]``:
``ok``, the ``problems`` in words, and each camera's state, reason and age of its newest frame.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from stream_service.runtime.heartbeat import HeartbeatRecord, HeartbeatStats
from stream_service.runtime.latency import END_TO_END, FpsCounter, LatencyTracker
from stream_service.wire.messages import CameraStatus, Verdict


class StageRow(Protocol):
    """What the summary shows of a stage process (``supervisor.StageState``)."""

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    state: str
    restarts: int
    heartbeat: HeartbeatRecord | None


def missed_between(last_seq: int | None, seq: int, dropped: int) -> int:
    """Verdicts a subscriber missed between sequence numbers ``last_seq`` and ``seq``: the gap less the
    frames the pipeline reported ``dropped`` (never negative; 0 for the first verdict or a restart)."""
    if last_seq is None or seq <= last_seq:
        return 0
    return max(0, seq - last_seq - 1 - dropped)


def verdict_line(v: Verdict) -> str:
    """A verdict for people: camera, sequence, verdict, score, regions, end-to-end latency, drops."""
    e2e = v.latency_ms.get(END_TO_END)
    parts = [
        f"{v.camera_id} #{v.seq}",
        f"{v.verdict.upper():<4}",
        f"score {v.score:.3f}/{v.threshold:.3f}",
        f"{len(v.regions)} region(s)" + (f" {[[r.x1, r.y1, r.x2, r.y2] for r in v.regions[:3]]}" if v.regions else ""),
        f"e2e {e2e:.1f} ms" if e2e is not None else "e2e n/a",
    ]
    if v.dropped:
        parts.append(f"dropped {v.dropped}")
    if v.truth is not None:
        parts.append(f"truth {v.truth.get('label')}")
    if v.reason is not None:
        parts.append(f"unscored ({v.reason})")
    return "  ".join(parts)


@dataclass
class CameraTally:
    """Per-camera counts of the verdicts received."""

    fps: FpsCounter
    passed: int = 0
    failed: int = 0
    dropped: int = 0
    missed: int = 0
    truth_total: int = 0
    truth_agree: int = 0
    last_seq: int | None = None


@dataclass(frozen=True)
class CameraHealthView:
    """What is known of a camera's health: state, reason, since and newest frame (wall-clock seconds), and
    ``t``, when this was true (the status message's or the heartbeat's time)."""

    state: str
    reason: str | None
    since: float
    last_frame: float | None
    t: float


@dataclass
class PipelineSummary:
    """Accumulates verdicts (``add``) and renders them (``render``, ``line``)."""

    latency_window: int = 1000
    fps_window_s: float = 5.0
    cameras: dict[str, CameraTally] = field(default_factory=dict)
    latency: LatencyTracker = field(init=False)
    model: str | None = None  # "<id> <version>" of the latest verdict
    stale_s: float = 5.0  # health.camera_stale_s
    health: dict[str, CameraHealthView] = field(default_factory=dict)

    def status(self, status: CameraStatus) -> None:
        """Take a camera's ``status.<camera>`` message (the newest one wins)."""
        known = self.health.get(status.camera_id)
        t = status.capture_ns / 1e9
        if known is None or t >= known.t:
            last = status.last_frame_ns / 1e9 if status.last_frame_ns is not None else None
            self.health[status.camera_id] = CameraHealthView(
                status.state, status.reason, status.since_ns / 1e9, last, t
            )

    def camera_health(self, stages: Sequence[StageRow]) -> dict[str, CameraHealthView]:
        """Each camera's newest health: from its status messages or its capture's heartbeat, whichever is newer."""
        merged = dict(self.health)
        for st in stages:
            beat = st.heartbeat
            if beat is None or beat.stats.camera is None or beat.stats.health is None:
                continue
            h, known = beat.stats.health, merged.get(beat.stats.camera)
            if known is None or beat.t >= known.t:
                merged[beat.stats.camera] = CameraHealthView(h.state, h.reason, h.since, h.last_frame, beat.t)
        return dict(sorted(merged.items()))

    def health_status(self, stages: Sequence[StageRow], now: float) -> dict[str, Any]:
        """``ok``, the ``problems`` (a camera not online or silent for ``stale_s``, a process not running) in
        words, and per camera its state, reason, since and the age of its newest frame (seconds)."""
        problems: list[str] = []
        cameras: dict[str, Any] = {}
        for cid, h in self.camera_health(stages).items():
            age = None if h.last_frame is None else max(0.0, now - h.last_frame)
            cameras[cid] = {"state": h.state, "reason": h.reason, "since": h.since, "last_frame_age_s": age}
            if h.state != "online":
                problems.append(f"camera {cid} {h.state}: {h.reason or 'no frame yet'}")
            elif age is not None and age > self.stale_s:
                problems.append(f"camera {cid}: no frame for {age:.0f} s (health.camera_stale_s = {self.stale_s:g})")
        # "stopped" is the end of a run asked for; "pending" the moment before the first start.
        for st in stages:
            if st.state not in ("running", "stopped", "pending"):
                reason = getattr(st, "reason", None)  # a failed stage's exit code and log
                problems.append(f"process {st.name} {st.state}" + (f": {reason}" if reason else ""))
        return {"ok": not problems, "problems": problems, "cameras": cameras}

    def __post_init__(self) -> None:
        self.latency = LatencyTracker(self.latency_window)

    @property
    def total(self) -> int:
        return sum(t.passed + t.failed for t in self.cameras.values())

    def add(self, verdict: Verdict, now_ns: int) -> int:
        """Count ``verdict`` received at monotonic ``now_ns``; returns the verdicts missed just before it."""
        tally = self.cameras.get(verdict.camera_id)
        if tally is None:
            tally = self.cameras[verdict.camera_id] = CameraTally(FpsCounter(self.fps_window_s))
        tally.fps.tick(now_ns)
        if verdict.verdict == "fail":
            tally.failed += 1
        else:
            tally.passed += 1
        tally.dropped += verdict.dropped
        missed = missed_between(tally.last_seq, verdict.seq, verdict.dropped)
        tally.missed += missed
        tally.last_seq = verdict.seq
        label = verdict.truth.get("label") if verdict.truth else None
        if label in ("pass", "fail"):
            tally.truth_total += 1
            tally.truth_agree += int(label == verdict.verdict)
        self.latency.add(verdict.latency_ms)
        self.model = f"{verdict.model_id} {verdict.model_version}"
        return missed

    def snapshot(
        self, stages: Sequence[StageRow], now_ns: int, elapsed_s: float, now: float | None = None
    ) -> dict[str, Any]:
        """Everything the summary shows, as JSON-ready data (``format_status`` renders it; the dashboard's
        ``/api/status`` serves it). ``now``: wall-clock seconds (default: now), for the health's ages."""
        cameras = {
            cid: {
                "fps": t.fps.fps(now_ns),
                "passed": t.passed,
                "failed": t.failed,
                "dropped": t.dropped,
                "missed": t.missed,
                "truth_total": t.truth_total,
                "truth_agree": t.truth_agree,
                "last_seq": t.last_seq,
            }
            for cid, t in sorted(self.cameras.items())
        }
        latency = {
            stage: {"p50": p.p50, "p99": p.p99, "count": p.count}
            for stage, p in sorted(self.latency.percentiles().items(), key=lambda kv: (kv[0] == END_TO_END, kv[0]))
        }
        return {
            "elapsed_s": elapsed_s,
            "verdicts": self.total,
            "model": self.model,
            "cameras": cameras,
            "latency_ms": latency,
            "processes": [stage_counts(st) for st in stages],
            "health": self.health_status(stages, time.time() if now is None else now),
        }

    def line(self, now_ns: int) -> str:
        """One line: per camera fps, pass/fail, dropped; end-to-end p50/p99."""
        cams = "  ".join(
            f"{cid} {t.fps.fps(now_ns):.1f} fps {t.passed} pass {t.failed} fail {t.dropped} dropped"
            for cid, t in sorted(self.cameras.items())
        )
        e2e = self.latency.percentiles().get(END_TO_END)
        latency = f"e2e p50 {e2e.p50:.0f} ms p99 {e2e.p99:.0f} ms" if e2e else "e2e n/a"
        return f"{cams or 'no verdicts yet'}  |  {latency}"

    def render(self, stages: Sequence[StageRow], now_ns: int, elapsed_s: float) -> str:
        """The full summary block (several lines, no trailing newline)."""
        return format_status(self.snapshot(stages, now_ns, elapsed_s))


def format_status(status: Mapping[str, Any]) -> str:
    """A ``PipelineSummary.snapshot`` as the terminal's summary block (several lines, no trailing newline)."""
    out = [f"stream-service: {status['elapsed_s']:.0f} s, {status['verdicts']} verdicts  (Ctrl-C stops)"]
    out.append(f"  {'camera':<12}{'fps':>7}{'pass':>8}{'fail':>8}{'dropped':>9}{'missed':>8}{'truth agrees':>15}")
    for cid, c in status["cameras"].items():
        truth = f"{c['truth_agree']}/{c['truth_total']}" if c["truth_total"] else "-"
        out.append(
            f"  {cid:<12}{c['fps']:>7.1f}{c['passed']:>8}{c['failed']:>8}{c['dropped']:>9}{c['missed']:>8}{truth:>15}"
        )
    if not status["cameras"]:
        out.append("  (no verdicts yet)")
    health = status.get("health")
    if health is not None:
        states = "  ".join(f"{cid} {h['state']}" for cid, h in health["cameras"].items())
        out.append(f"  health       {'ok' if health['ok'] else 'NOT OK'}" + (f"  ({states})" if states else ""))
        out.extend(f"    ! {problem}" for problem in health["problems"])
    out.append(f"  {'latency ms':<12}{'p50':>9}{'p99':>9}{'n':>7}")
    for stage, p in status["latency_ms"].items():
        out.append(f"  {stage:<12}{p['p50']:>9.1f}{p['p99']:>9.1f}{p['count']:>7}")
    if status["processes"]:
        out.append(
            f"  {'process':<16}{'state':<11}{'pid':>7}{'restarts':>9}{'in/s':>7}{'dropped':>9}{'rejected':>9}"
            f"{'errors':>7}"
        )
        out.extend(_process_line(c) for c in status["processes"])
    return "\n".join(out)


def stage_counts(st: StageRow) -> dict[str, Any]:
    """A stage process as the summary and the dashboard show it: state, restarts, rate in, and its counters
    of dropped (received and sent), rejected and failed messages (for a capture: frames and camera errors),
    and frames compared unregistered (soartc)."""
    stats = st.heartbeat.stats if st.heartbeat is not None else HeartbeatStats()
    return {
        "name": st.name,
        "state": st.state,
        "pid": st.pid,
        "restarts": st.restarts,
        "in_per_s": stats.fps,
        "dropped": stats.dropped,
        "rejected": stats.rejected,
        "errors": stats.errors,
        "unregistered": stats.unregistered,
    }


def _process_line(c: Mapping[str, Any]) -> str:
    pid = str(c["pid"]) if c["pid"] is not None else "-"
    return (
        f"  {c['name']:<16}{c['state']:<11}{pid:>7}{c['restarts']:>9}{c['in_per_s']:>7.1f}{c['dropped']:>9}"
        f"{c['rejected']:>9}{c['errors']:>7}"
    )
