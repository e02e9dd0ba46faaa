"""The capture stage: one camera's frames, stamped and pushed downstream without ever blocking.

``CaptureStage`` is pure: a frame (and the synthetic camera's ground truth) in, the outgoing
``(topic, FrameHeader, [frame])`` out, resized to the camera's ``frame_size`` when one is set. The
header carries one stamp, ``capture`` at the capture time, from which every later stage's latency and
the end-to-end latency are measured.

``run_capture`` is the loop around a camera source. The sink is a non-blocking sender: a frame it
cannot queue is dropped, counted, and reported in the ``dropped`` field of the camera's next frame.
Given ``slots`` (a sender's shared-memory ring), the frame's last step (the colour conversion, or the
resize to ``frame_size``) writes it straight into a reserved slot, so its pixels are never copied on
the way to the soartc stage; with no slot free the frame is made privately and the sender drops it. A
camera that vanishes raises ``CameraError`` (after its own reconnection policy, for live streams): the
loop logs it, closes the source, waits ``retry_s`` and opens it again, so a capture process outlives
an unplugged camera. A finished source (a video file or a folder without ``loop``) leaves the loop
idle, beating, until it is stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from stream_service.errors import CameraError
from stream_service.model.references import reference_shape
from stream_service.runtime.heartbeat import Health, HealthState
from stream_service.runtime.latency import FpsCounter
from stream_service.runtime.runner import Outgoing, Sink, StopEvent
from stream_service.settings import CameraSettings, Settings, SyntheticSource
from stream_service.sources.camera import Allocator, FrameSource, SyntheticStream, open_source
from stream_service.sources.synthetic import Truth
from stream_service.vision.arrays import U8
from stream_service.wire.messages import CameraStatus, FrameHeader, Stamp, topic_of

log = logging.getLogger(__name__)

STAGE = "capture"
# Idle loops (a finished source, a wait before reopening) wake this often to check the stop event.
_IDLE_S = 0.1


def retry_delay_s(camera: CameraSettings, settings: Settings) -> float:
    """How long to wait before reopening a camera that raised ``CameraError``.

    Live streams back off up to ``retry_backoff_max_s`` inside their source already; files and folders
    have no policy of their own and wait the supervisor's ``restart_backoff_s``.
    """
    return float(getattr(camera.source, "retry_backoff_max_s", settings.supervisor.restart_backoff_s))


def expected_shape(camera: CameraSettings) -> tuple[int, int] | None:
    """(H, W) every frame of ``camera`` must have on leaving the capture: its ``frame_size`` (frames are
    resized to it), the synthetic source's size, else its golden reference's size (None: unknown)."""
    shape = camera.frame_shape
    if shape is None and camera.reference is not None:
        shape = reference_shape(camera.reference)
    return shape


class CameraHealth:
    """A camera's health as the capture sees it: ``starting`` until its first frame, ``online`` while frames
    come, ``reconnecting`` while a live stream retries (its ``problem``), ``failed`` when the source gave up
    (``CameraError``) or its frames cannot be used (wrong size); back to ``online`` with the next good frame.

    ``changed`` is set by every change of state or reason, for the capture to send a status message.
    """

    def __init__(self, camera_id: str, clock: Callable[[], float] = time.time) -> None:
        self.camera_id, self._clock = camera_id, clock
        self.state: HealthState = "starting"
        self.reason: str | None = None
        self.since = clock()
        self.last_frame: float | None = None
        self.changed = True

    def _set(self, state: HealthState, reason: str | None) -> None:
        if (state, reason) == (self.state, self.reason):
            return
        if state != self.state:
            self.since = self._clock()
            log_at = logging.INFO if state == "online" else logging.ERROR
            log.log(log_at, "camera %s: %s%s", self.camera_id, state, f": {reason}" if reason else "")
        self.state, self.reason, self.changed = state, reason, True

    def frame(self) -> None:
        """A good frame was read."""
        self.last_frame = self._clock()
        self._set("online", None)

    def trouble(self, problem: str) -> None:
        """The source delivers nothing for now and says why (a live stream reconnecting)."""
        self._set("failed" if self.state == "failed" else "reconnecting", problem)

    def failed(self, reason: str) -> None:
        self._set("failed", reason)

    def snapshot(self) -> Health:
        return Health(state=self.state, reason=self.reason, since=self.since, last_frame=self.last_frame)

    def message(self, seq: int, frames: int) -> CameraStatus:
        """The ``status.<camera>`` message of the current state."""
        return CameraStatus(
            camera_id=self.camera_id,
            seq=seq,
            capture_ns=time.time_ns(),
            state=self.state,
            reason=self.reason,
            since_ns=int(self.since * 1e9),
            last_frame_ns=int(self.last_frame * 1e9) if self.last_frame is not None else None,
            frames=frames,
        )


class CaptureStage:
    """Frame messages of one camera: sequence numbers, the capture stamp, the truth of synthetic frames."""

    name = STAGE

    def __init__(self, camera: CameraSettings) -> None:
        self.camera_id = camera.id
        # Frames are resized only to a configured frame_size; otherwise they go out as captured.
        self.shape = (camera.frame_size[1], camera.frame_size[0]) if camera.frame_size is not None else None
        self.attach_truth = isinstance(camera.source, SyntheticSource) and camera.source.truth
        # Frames that go out unresized must have the size the soartc stage compares them at.
        self.expected = expected_shape(camera) if self.shape is None else None
        self.seq = 0

    def wrong_size(self, frame_hw: U8) -> str | None:
        """Why ``frame_hw`` cannot be judged (a size other than its reference's), and what to do; None if fine."""
        if self.expected is None or frame_hw.shape == self.expected:
            return None
        (h, w), (eh, ew) = frame_hw.shape[:2], self.expected
        return (
            f"frames of {w}x{h} px, expected {ew}x{eh} px (the golden reference's size); refused. Set "
            f"frame_size: [{ew}, {eh}] for camera {self.camera_id} to resize them, or grab a reference at this "
            f"size: stream-service reference grab --config FILE --camera {self.camera_id}"
        )

    def frame_message(
        self, frame_hw: U8, truth: Truth | None, capture_ns: int, out: Allocator | None = None
    ) -> Outgoing:
        """The outgoing message of a uint8 gray ``(H, W)`` frame captured at wall-clock ``capture_ns``.

        A frame resized to ``frame_size`` is written into ``out((H, W))`` when that returns an array.
        """
        if frame_hw.ndim != 2 or frame_hw.dtype != np.uint8:
            raise CameraError(
                f"camera {self.camera_id} frame: expected a uint8 gray (H, W) image, found {frame_hw.dtype} "
                f"{frame_hw.shape}"
            )
        frame, scale = frame_hw, (1.0, 1.0)
        if self.shape is not None and frame_hw.shape != self.shape:
            height, width = self.shape
            scale = (width / frame_hw.shape[1], height / frame_hw.shape[0])
            dst = out(self.shape) if out is not None else None
            frame = np.asarray(
                cv2.resize(frame_hw, (width, height), interpolation=cv2.INTER_AREA)
                if dst is None
                else cv2.resize(frame_hw, (width, height), dst=dst, interpolation=cv2.INTER_AREA)
            )
        header = FrameHeader(
            camera_id=self.camera_id,
            seq=self.seq,
            capture_ns=capture_ns,
            shape=frame.shape,
            dtype="uint8",
            stamps=(Stamp(stage=STAGE, t_ns=capture_ns),),
            truth=_scaled_truth(truth, scale, frame.shape) if self.attach_truth and truth is not None else None,
        )
        self.seq += 1
        return topic_of(header), header, [frame]


def _scaled_truth(truth: Truth, scale: tuple[float, float], shape: tuple[int, ...]) -> dict[str, Any]:
    """The truth with its boxes ``[x1, y1, x2, y2, kind]`` scaled like the frame (inclusive corners)."""
    sx, sy = scale
    if (sx, sy) == (1.0, 1.0):
        return {"label": truth["label"], "boxes": [list(b) for b in truth["boxes"]]}
    h, w = shape[0], shape[1]
    boxes = [
        [
            min(w - 1, int(x1 * sx)),
            min(h - 1, int(y1 * sy)),
            min(w - 1, int((x2 + 1) * sx) - 1),
            min(h - 1, int((y2 + 1) * sy) - 1),
            kind,
        ]
        for x1, y1, x2, y2, kind in truth["boxes"]
    ]
    return {"label": truth["label"], "boxes": boxes}


@dataclass
class CaptureStats:
    """Counters of a capture loop; ``snapshot()`` is what its heartbeat reports."""

    fps: FpsCounter = field(default_factory=lambda: FpsCounter(5.0))  # frames read per second
    frames: int = 0  # frames read from the camera
    sent: int = 0  # frames queued downstream
    dropped: int = 0  # frames the sender could not queue (downstream full or absent)
    camera_errors: int = 0  # CameraErrors (the camera vanished or could not be opened)
    refused: int = 0  # frames of the wrong size, never sent onward
    opens: int = 0  # times the source was opened
    finished: bool = False  # the source has no more frames (a file or folder without loop)

    def snapshot(self) -> dict[str, Any]:
        return {
            "fps": self.fps.fps(time.monotonic_ns()),
            "frames": self.frames,
            "sent": self.sent,
            "dropped": self.dropped,
            "camera_errors": self.camera_errors,
            "refused": self.refused,
            "opens": self.opens,
            "finished": self.finished,
        }


def _pause(seconds: float, stop: StopEvent, heartbeat: Callable[[], None] | None) -> None:
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        if heartbeat is not None:
            heartbeat()
        time.sleep(min(_IDLE_S, left))


def _unless_resized(slots: Allocator, shape: tuple[int, int] | None) -> Allocator:
    """``slots`` for frames that go out as the source reads them (no resize to ``frame_size``)."""
    return lambda frame_shape: slots(frame_shape) if shape in (None, frame_shape) else None


def run_capture(
    stage: CaptureStage,
    open_camera: Callable[[], FrameSource],
    sink: Sink,
    stop: StopEvent,
    *,
    retry_s: float,
    heartbeat: Callable[[], None] | None = None,
    stats: CaptureStats | None = None,
    clock_ns: Callable[[], int] = time.time_ns,
    slots: Allocator | None = None,
    health: CameraHealth | None = None,
    status_every_s: float = 5.0,
) -> CaptureStats:
    """Read, stamp and send frames until ``stop`` is set; see the module docstring for the policy.

    ``slots``: writable frame arrays in the sink's shared memory (None: none or no ring yet). ``health``
    follows the camera; its status message goes out on every change and every ``status_every_s``.
    """
    stats = stats if stats is not None else CaptureStats()
    health = health if health is not None else CameraHealth(stage.camera_id)
    status = _StatusSender(stage, health, sink, stats, status_every_s)
    source: FrameSource | None = None
    direct = _unless_resized(slots, stage.shape) if slots is not None else None
    try:
        while not stop.is_set():
            if heartbeat is not None:
                heartbeat()
            status()
            if source is None:
                try:
                    source = open_camera()
                except CameraError as exc:
                    _camera_error(stage, stats, health, exc, retry_s)
                    _pause(retry_s, stop, heartbeat)
                    continue
                stats.opens += 1
                stats.finished = False
            try:
                frame = source.read(direct)
            except CameraError as exc:
                _camera_error(stage, stats, health, exc, retry_s)
                source.close()
                source = None
                _pause(retry_s, stop, heartbeat)
                continue
            if frame is None:
                if source.problem is not None:
                    health.trouble(source.problem)
                if source.finished and not stats.finished:
                    stats.finished = True
                    log.info("camera %s: the source has no more frames; idle until stopped", stage.camera_id)
                if source.finished:
                    _pause(_IDLE_S, stop, None)
                continue
            stats.frames += 1
            stats.fps.tick(time.monotonic_ns())
            refused = stage.wrong_size(frame)
            if refused is not None:
                stats.refused += 1
                health.failed(refused)
                continue
            health.frame()
            truth = source.truth if isinstance(source, SyntheticStream) else None
            topic, header, arrays = stage.frame_message(frame, truth, clock_ns(), slots)
            if sink.send(topic, header, arrays):
                stats.sent += 1
            else:
                stats.dropped += 1
    finally:
        if source is not None:
            source.close()
    return stats


def _camera_error(
    stage: CaptureStage, stats: CaptureStats, health: CameraHealth, exc: CameraError, retry_s: float
) -> None:
    stats.camera_errors += 1
    log.error("camera %s: %s; reopening in %.1f s", stage.camera_id, exc, retry_s)
    health.failed(f"{exc}; check the camera and cameras[].source in the config; retrying every {retry_s:g} s")


class _StatusSender:
    """Sends the camera's status downstream when it changes, and again every ``every_s`` (a status the
    non-blocking sink dropped, or one a stage started later never saw, is sent again)."""

    def __init__(self, stage: CaptureStage, health: CameraHealth, sink: Sink, stats: CaptureStats, every_s: float):
        self.stage, self.health, self.sink, self.stats, self.every_s = stage, health, sink, stats, every_s
        self._due = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if not self.health.changed and now < self._due:
            return
        message = self.health.message(self.stage.seq, self.stats.frames)
        if self.sink.send(topic_of(message), message, []):
            self.health.changed = False
            self._due = now + self.every_s


def grab(
    camera: CameraSettings,
    count: int,
    every_s: float,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[U8]:
    """``count`` frames of ``camera`` as the capture stage sends them (resized to ``frame_size``), at least
    ``every_s`` apart: the good frames a golden reference is averaged from (``reference grab``).

    Raises ``CameraError`` when the camera cannot be opened or has not delivered ``count`` frames within
    ``timeout_s`` (a live stream that is reconnecting delivers none for a while).
    """
    stage = CaptureStage(camera)
    source = open_source(camera.source)
    frames: list[U8] = []
    deadline = clock() + timeout_s
    try:
        while len(frames) < count:
            if clock() > deadline:
                raise CameraError(
                    f"camera {camera.id}: expected {count} frames within {timeout_s:g} s, found {len(frames)}"
                )
            frame = source.read()
            if frame is None:
                if source.finished:
                    raise CameraError(
                        f"camera {camera.id}: expected {count} frames, found {len(frames)} before the source ended"
                    )
                sleep(_IDLE_S)
                continue
            frames.append(np.asarray(stage.frame_message(frame, None, 0)[2][0], np.uint8).copy())
            if len(frames) < count:
                sleep(every_s)
    finally:
        source.close()
    return frames


def open_camera(camera: CameraSettings) -> Callable[[], FrameSource]:
    """The opener ``run_capture`` calls (again after a ``CameraError``) for ``camera``."""
    return lambda: open_source(camera.source)
