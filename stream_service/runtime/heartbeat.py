"""The heartbeat: what a stage process tells the supervisor, the summary and the dashboard about itself.

Every stage writes one ``HeartbeatRecord`` as JSON to its heartbeat file (``<run_dir>/<name>.json``)
every ``supervisor.heartbeat_s``, atomically (write, then rename). The supervisor judges liveness by
``t`` (wall-clock time of the write) and readiness by ``state``; the summary and the dashboard show
``stats``. Versioned like the wire messages: ``schema_version`` is ``"MAJOR.MINOR"``, a reader
accepts any minor version of its major and ignores fields it does not know.

Only the parts a stage has are present: ``capture`` for a capture process, ``stage`` and
``receiver`` for the soartc and infer stages, ``features`` for the soartc stage, ``model`` and
``journal`` and ``unscored`` for infer. History: 1.0 the first record; 1.1 adds ``stats.journal`` and
``stats.unscored``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

HEARTBEAT_VERSION = "1.1"
HEARTBEAT_MAJOR = HEARTBEAT_VERSION.split(".", 1)[0]

StageKind = Literal["capture", "soartc", "infer", "bridge"]
BeatState = Literal["starting", "running"]
# The health of a camera (in its capture's heartbeat) or of a stage (its own): state, not a counter.
HealthState = Literal["starting", "online", "reconnecting", "failed"]


class _Counts(BaseModel):
    # extra="ignore": a newer minor version may add counters this reader does not know yet.
    model_config = ConfigDict(frozen=True, extra="ignore")


class StageCounts(_Counts):
    """The runner's counters of a soartc or infer stage (``runner.StageStats.snapshot``)."""

    received: int = 0
    sent: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    send_dropped: dict[str, int] = Field(default_factory=dict)
    rejected: dict[str, int] = Field(default_factory=dict)
    errors: dict[str, int] = Field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = Field(default_factory=dict)
    fps: float = 0.0


class CaptureCounts(_Counts):
    """A capture's counters (``stages.capture.CaptureStats.snapshot``)."""

    fps: float = 0.0
    frames: int = 0
    sent: int = 0
    dropped: int = 0
    camera_errors: int = 0
    refused: int = 0  # frames of the wrong size, never sent onward
    opens: int = 0
    finished: bool = False


class ReceiverCounts(_Counts):
    """A stage's receiving socket: messages received, dropped (drop-oldest) and rejected, by reason."""

    received: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    rejected: dict[str, int] = Field(default_factory=dict)
    ring: dict[str, int] = Field(default_factory=dict)


class SenderCounts(_Counts):
    """A stage's sending socket: messages sent (``sent_in_place``: straight into the ring) and dropped."""

    sent: int = 0
    sent_in_place: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)


class FeaturesCounts(_Counts):
    """The soartc stage's own counters: frames per camera whose registration was unsure (compared unaligned)."""

    unregistered: dict[str, int] = Field(default_factory=dict)


class JournalCounts(_Counts):
    """The infer stage's verdict journal: where, verdicts appended and deleted by retention, failed writes
    (the verdict was published anyway) and the last failure; or ``off`` with the reason (disabled, broken)."""

    path: str | None = None
    appended: int = 0
    pruned: int = 0
    errors: int = 0
    last_error: str | None = None
    off: str | None = None


class Health(_Counts):
    """A camera's or a stage's health: its state, why (the last error, for ``reconnecting``/``failed``), since when."""

    state: HealthState = "starting"
    reason: str | None = None
    since: float = Field(0.0, description="Wall-clock time (time.time()) the state began.")
    last_frame: float | None = Field(None, description="Wall-clock time of the camera's newest frame.")


class HeartbeatStats(_Counts):
    """The counters of one process; only the parts its stage has are set."""

    capture: CaptureCounts | None = None
    stage: StageCounts | None = None
    receiver: ReceiverCounts | None = None
    sender: SenderCounts | None = None
    features: FeaturesCounts | None = None
    journal: JournalCounts | None = None
    model: str | None = None
    unscored: dict[str, int] | None = None  # infer: fail-safe verdicts (frames it could not score), by subject
    camera: str | None = None  # a capture's camera id
    health: Health | None = None  # a capture: its camera's health; other stages: their own

    @property
    def dropped(self) -> int:
        """Frames or messages this process dropped (received and sent; a capture: frames it could not send)."""
        if self.capture is not None:
            return self.capture.dropped
        received = sum(self.receiver.dropped.values()) if self.receiver is not None else 0
        return received + (sum(self.sender.dropped.values()) if self.sender is not None else 0)

    @property
    def rejected(self) -> int:
        return sum(self.stage.rejected.values()) if self.stage is not None else 0

    @property
    def errors(self) -> int:
        """Messages that failed in processing (a capture: camera errors)."""
        if self.capture is not None:
            return self.capture.camera_errors
        return sum(self.stage.errors.values()) if self.stage is not None else 0

    @property
    def fps(self) -> float:
        """Rate in: frames read (capture) or messages received (other stages), per second."""
        if self.capture is not None:
            return self.capture.fps
        return self.stage.fps if self.stage is not None else 0.0

    @property
    def unregistered(self) -> int:
        return sum(self.features.unregistered.values()) if self.features is not None else 0


class HeartbeatRecord(BaseModel):
    """One heartbeat of one stage process."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: str = Field(HEARTBEAT_VERSION, pattern=r"^\d+\.\d+$", description="MAJOR.MINOR.")
    name: str
    stage: StageKind
    pid: int
    state: BeatState
    t: float = Field(description="Wall-clock time of the write (time.time()).")
    stats: HeartbeatStats = Field(default_factory=HeartbeatStats)

    @field_validator("schema_version")
    @classmethod
    def _known_major(cls, value: str) -> str:
        if value.split(".", 1)[0] != HEARTBEAT_MAJOR:
            raise ValueError(f"expected major version {HEARTBEAT_MAJOR} ('{HEARTBEAT_VERSION}'), found {value!r}")
        return value

    def to_json(self) -> str:
        # exclude_unset: a stage reports the counters it has; a reader's defaults fill the rest.
        return self.model_dump_json(exclude_unset=True, exclude_none=True)


def write_heartbeat(path: Path, record: HeartbeatRecord) -> None:
    """Write ``record`` to ``path`` atomically (a reader sees the old or the new record, never half of one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(record.to_json(), encoding="utf-8")
    os.replace(tmp, path)


def read_heartbeat(path: Path) -> HeartbeatRecord | None:
    """The record in ``path``; None when it is missing, half-written by an older writer, or not a heartbeat."""
    try:
        return HeartbeatRecord.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


def beat(name: str, stage: StageKind, state: BeatState, stats: HeartbeatStats | dict[str, object]) -> HeartbeatRecord:
    """A record of this process, now."""
    parsed = stats if isinstance(stats, HeartbeatStats) else HeartbeatStats.model_validate(stats)
    return HeartbeatRecord(
        schema_version=HEARTBEAT_VERSION,
        name=name,
        stage=stage,
        pid=os.getpid(),
        state=state,
        t=time.time(),
        stats=parsed,
    )


class Heartbeat:
    """Writes this process's ``HeartbeatRecord`` to ``path`` at most every ``interval_s``.

    ``snapshot`` returns the counters (a ``HeartbeatStats`` or its dict form). Without a path it only
    watches the parent (when ``exit_with_parent``).
    """

    def __init__(
        self,
        path: Path | None,
        name: str,
        stage: StageKind,
        interval_s: float,
        stop: threading.Event,
        exit_with_parent: bool = False,
    ) -> None:
        self.path, self.name, self.stage, self.interval_s = path, name, stage, interval_s
        self.stop = stop
        self.snapshot: Callable[[], HeartbeatStats | dict[str, object]] = HeartbeatStats
        self.state: BeatState = "starting"
        self._parent = os.getppid() if exit_with_parent else None
        self._due = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + self.interval_s
        if self._parent is not None and os.getppid() != self._parent:
            log.warning("%s: the supervisor (pid %d) is gone; stopping", self.name, self._parent)
            self.stop.set()
        self.write()

    @contextlib.contextmanager
    def beating(self) -> Iterator[None]:
        """Write heartbeats from a thread while the block runs: start-up work that holds the stage's loop
        (compiling the kernels, the first frame through them, the model's first run) is not a hang.
        Bounded by the block: the loop's own beats take over when it returns."""
        done = threading.Event()

        def beat_on() -> None:
            while not done.wait(self.interval_s):
                self.write()

        thread = threading.Thread(target=beat_on, name=f"{self.name} heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def running(self) -> None:
        self.state = "running"
        self._due = 0.0
        self()

    def write(self) -> None:
        if self.path is None:
            return
        write_heartbeat(self.path, beat(self.name, self.stage, self.state, self.snapshot()))
