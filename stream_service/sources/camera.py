"""Camera sources: the only module that opens cameras.

``open_source(settings)`` turns a source section of the settings into a ``FrameSource``:

- ``device`` (OpenCV device index) and ``url`` (RTSP/HTTP, FFmpeg backend): live streams that are
  reopened with exponential backoff when they fail or vanish, and raise ``CameraError`` naming the
  source after ``max_retries`` failed attempts in a row;
- ``file``: a video file paced at its frame rate, optionally looping;
- ``folder``: the sorted image files of a folder replayed at a set rate; unreadable files are skipped,
  counted and logged with the reason;
- ``synthetic``: the synthetic PCB camera, which also supplies its reference and the truth of each frame.

``read()`` returns a uint8 gray ``(H, W)`` frame, or None when there is none this time (a live stream
reconnecting, a finished file or folder: see ``finished``). ``read(out)`` writes the frame into the
array ``out((H, W))`` returns (the capture passes a reserved shared-memory slot, so the pixels are
written once, by the colour conversion, and never copied again) and returns that array; when ``out``
returns None the source allocates the frame itself. Pacing uses the monotonic clock and never
blocks the caller longer than one frame interval, so the capture loop stays responsive.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from stream_service.errors import CameraError
from stream_service.settings import DeviceSource, FileSource, FolderSource, Source, SyntheticSource, UrlSource
from stream_service.sources.synthetic import SyntheticCamera, Truth
from stream_service.vision.arrays import U8

log = logging.getLogger(__name__)


# Where a source writes a gray (H, W) frame: a writable uint8 array of that shape, or None (allocate).
Allocator = Callable[[tuple[int, int]], U8 | None]
Clock = Callable[[], float]
Sleep = Callable[[float], None]
# A reconnecting live stream sleeps at most this long per read() call, so that its caller keeps beating.
RECONNECT_POLL_S = 0.05
# Used when a video file does not state a usable frame rate.
FALLBACK_FPS = 25.0


@dataclass
class SourceCounters:
    """What happened to a source since it was opened."""

    frames: int = 0  # frames delivered
    skipped: int = 0  # image files that could not be read, skipped
    lost: int = 0  # times a live stream stopped delivering
    failed_opens: int = 0  # failed (re)opening attempts
    reconnects: int = 0  # successful reopenings after a loss or a failed open


class FrameSource(Protocol):
    name: str
    counters: SourceCounters
    # Why the source delivers nothing right now (a live stream reconnecting), None while it delivers.
    problem: str | None

    @property
    def finished(self) -> bool: ...

    def read(self, out: Allocator | None = None) -> U8 | None: ...

    def close(self) -> None: ...


def to_gray(image: Any, out: Allocator | None = None) -> U8:
    """A uint8 gray ``(H, W)`` copy of an OpenCV image (gray, BGR or BGRA; 16-bit scaled down).

    The copy goes into ``out((H, W))`` when that returns an array (the colour conversion writes it
    there directly), into a new array otherwise.
    """
    frame = np.asarray(image)
    if frame.dtype == np.uint16:
        frame = (frame >> 8).astype(np.uint8)
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim not in (2, 3) or frame.dtype != np.uint8 or (frame.ndim == 3 and frame.shape[2] not in (3, 4)):
        raise CameraError(f"camera frame: expected a gray or colour 8-bit image, found {frame.dtype} {frame.shape}")
    dst = out((frame.shape[0], frame.shape[1])) if out is not None else None
    if frame.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if frame.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        return np.asarray(cv2.cvtColor(frame, code) if dst is None else cv2.cvtColor(frame, code, dst=dst))
    if dst is None:
        return np.ascontiguousarray(frame)
    np.copyto(dst, frame)
    return dst


class Pacer:
    """Spaces calls to ``wait()`` one interval apart on a monotonic clock, sleeping at most one interval.

    A caller that falls behind is not made to catch up with a burst: the schedule restarts from now.
    """

    def __init__(self, fps: float, clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> None:
        self.interval = 1.0 / fps
        self._clock, self._sleep = clock, sleep
        self._due: float | None = None

    def wait(self) -> None:
        now = self._clock()
        if self._due is not None and now < self._due:
            self._sleep(min(self._due - now, self.interval))
            now = self._clock()
        late = self._due is None or now - self._due > self.interval
        self._due = (now if late or self._due is None else self._due) + self.interval


class _Source:
    def __init__(self, name: str) -> None:
        self.name = name
        self.counters = SourceCounters()
        self.problem: str | None = None
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def close(self) -> None:
        self._finished = True

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LiveStream(_Source):
    """A device or network stream, reopened with exponential backoff when it fails."""

    def __init__(
        self,
        name: str,
        opener: Callable[[], Any],
        settings: DeviceSource | UrlSource,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
    ) -> None:
        super().__init__(name)
        self._opener, self._settings = opener, settings
        self._clock, self._sleep = clock, sleep
        self._cap: Any = None
        self._failures = 0  # failed attempts in a row
        self._next_try = clock()
        self._ever_opened = False
        self._delivered = False  # a frame was read since the last opening

    def read(self, out: Allocator | None = None) -> U8 | None:
        if self._finished:
            return None
        if self._cap is None:
            self._reopen()
            if self._cap is None:
                return None
        ok, image = self._cap.read()
        if not ok or image is None:
            self._release()
            if not self._delivered:
                # Opened but never delivered: a failed attempt, with backoff, not a tight reopen loop.
                self._fail("it opened but delivered no frame")
                return None
            self.counters.lost += 1
            self.problem = "the stream stopped delivering frames; reconnecting"
            log.warning("camera %s: the stream stopped delivering frames; reconnecting", self.name)
            self._next_try = self._clock()
            return None
        self._failures, self._delivered, self.problem = 0, True, None
        self.counters.frames += 1
        return to_gray(image, out)

    def _reopen(self) -> None:
        now = self._clock()
        if now < self._next_try:
            self._sleep(min(self._next_try - now, RECONNECT_POLL_S))
            return
        try:
            cap = self._opener()
            opened = bool(cap.isOpened())
        except cv2.error as exc:
            cap, opened = None, False
            log.warning("camera %s: opening failed: %s", self.name, exc)
        if not opened:
            if cap is not None:
                cap.release()
            self._fail("it cannot be opened")
            return
        self._cap, self._delivered = cap, False
        if self._ever_opened or self._failures:
            self.counters.reconnects += 1
        self._ever_opened = True
        log.info("camera %s: opened", self.name)

    def _fail(self, reason: str) -> None:
        """Count a failed attempt; schedule the next one with exponential backoff, or give up."""
        self.counters.failed_opens += 1
        self._failures += 1
        s = self._settings
        if self._failures > s.max_retries:
            self._finished = True
            raise CameraError(
                f"camera {self.name}: expected frames, found that {reason}, after {s.max_retries} retries"
            )
        backoff = min(s.retry_backoff_s * 2 ** (self._failures - 1), s.retry_backoff_max_s)
        self.problem = f"{reason} (attempt {self._failures} of {s.max_retries + 1}); retrying"
        log.warning(
            "camera %s: %s (attempt %d of %d), retrying in %.2f s",
            self.name,
            reason,
            self._failures,
            s.max_retries + 1,
            backoff,
        )
        self._next_try = self._clock() + backoff

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def close(self) -> None:
        self._release()
        super().close()


class VideoFile(_Source):
    """A video file at its own frame rate (or ``fps``), looping when asked."""

    def __init__(self, settings: FileSource, clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> None:
        super().__init__(f"file:{settings.path}")
        if not settings.path.is_file():
            raise CameraError(f"camera {self.name}: expected a video file, found nothing at {settings.path}")
        self._cap = cv2.VideoCapture(str(settings.path))
        if not self._cap.isOpened():
            raise CameraError(f"camera {self.name}: expected a readable video, found a file OpenCV cannot open")
        native = float(self._cap.get(cv2.CAP_PROP_FPS))
        fps = settings.fps or (native if math.isfinite(native) and native > 0 else FALLBACK_FPS)
        self._loop = settings.loop
        self._pacer = Pacer(fps, clock, sleep)
        self._path = settings.path

    def read(self, out: Allocator | None = None) -> U8 | None:
        if self._finished:
            return None
        # An open file that is deleted stays readable through its descriptor (POSIX): without this check
        # a camera whose file is gone would go on "playing" what was buffered, or loop over it forever.
        if not self._path.exists():
            raise CameraError(f"camera {self.name}: expected the video file {self._path}, found it gone")
        ok, image = self._cap.read()
        if not ok and self._loop:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._cap.read()
            if not ok:
                raise CameraError(f"camera {self.name}: expected frames to loop over, found none")
        if not ok:
            self._finished = True
            return None
        self._pacer.wait()
        self.counters.frames += 1
        return to_gray(image, out)

    def close(self) -> None:
        self._cap.release()
        super().close()


class ImageFolder(_Source):
    """The sorted image files of a folder matching ``pattern``, replayed at ``fps``."""

    def __init__(self, settings: FolderSource, clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> None:
        super().__init__(f"folder:{settings.path}")
        if not settings.path.is_dir():
            raise CameraError(f"camera {self.name}: expected a folder, found nothing at {settings.path}")
        self.files = sorted(p for p in settings.path.glob(settings.pattern) if p.is_file())
        if not self.files:
            raise CameraError(f"camera {self.name}: expected image files matching {settings.pattern!r}, found none")
        self._loop = settings.loop
        self._next = 0
        self._pacer = Pacer(settings.fps, clock, sleep)

    def read(self, out: Allocator | None = None) -> U8 | None:
        for _ in range(len(self.files)):
            if self._next >= len(self.files):
                if not self._loop:
                    self._finished = True
                if self._finished:
                    return None
                self._next = 0
            path = self.files[self._next]
            self._next += 1
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if image is None:
                self.counters.skipped += 1
                reason = "it vanished" if not path.exists() else "it cannot be decoded as an image"
                log.warning("camera %s: skipping %s: %s", self.name, path.name, reason)
                continue
            self._pacer.wait()
            self.counters.frames += 1
            return to_gray(image, out)
        if self._finished:
            return None
        raise CameraError(f"camera {self.name}: expected a readable image among {len(self.files)} files, found none")


def synthetic_camera(settings: SyntheticSource) -> SyntheticCamera:
    """The synthetic PCB camera a ``synthetic`` source section describes (its board, defects, drift)."""
    return SyntheticCamera(
        width=settings.width,
        height=settings.height,
        seed=settings.seed,
        defect_rate=settings.defect_rate,
        max_defects=settings.max_defects,
        shift_px=settings.shift_px,
        jitter=settings.jitter,
        lighting_drift=settings.lighting_drift,
        noise=settings.noise,
    )


class SyntheticStream(_Source):
    """The synthetic PCB camera at ``fps``; ``truth`` is the ground truth of the last frame read."""

    def __init__(self, settings: SyntheticSource, clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> None:
        super().__init__(f"synthetic:{settings.seed}")
        self.camera = synthetic_camera(settings)
        self._pacer = Pacer(settings.fps, clock, sleep)
        self.truth: Truth | None = None

    def reference(self) -> U8:
        return self.camera.reference()

    def read(self, out: Allocator | None = None) -> U8 | None:
        if self._finished:
            return None
        frame, self.truth = self.camera.next_frame()
        self._pacer.wait()
        self.counters.frames += 1
        return to_gray(frame, out) if out is not None else frame


def open_source(settings: Source, clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> FrameSource:
    """Open the camera described by ``settings`` (a source section of ``CameraSettings``)."""
    if isinstance(settings, SyntheticSource):
        return SyntheticStream(settings, clock, sleep)
    if isinstance(settings, FolderSource):
        return ImageFolder(settings, clock, sleep)
    if isinstance(settings, FileSource):
        return VideoFile(settings, clock, sleep)
    if isinstance(settings, DeviceSource):
        device = settings

        def open_device() -> Any:
            cap = cv2.VideoCapture(device.index)
            for prop, value in (
                (cv2.CAP_PROP_FRAME_WIDTH, device.width),
                (cv2.CAP_PROP_FRAME_HEIGHT, device.height),
                (cv2.CAP_PROP_FPS, device.fps),
            ):
                if value is not None and cap.isOpened():
                    cap.set(prop, float(value))
            return cap

        return LiveStream(f"device:{device.index}", open_device, device, clock, sleep)
    url = settings
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, url.open_timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, url.read_timeout_ms]
    # Never log credentials embedded in the URL.
    shown = re.sub(r"//[^/@]*@", "//***@", url.url)
    return LiveStream(f"url:{shown}", lambda: cv2.VideoCapture(url.url, cv2.CAP_FFMPEG, params), url, clock, sleep)
