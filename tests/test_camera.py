"""Camera sources: image folder, video file, synthetic camera, live-stream reconnection and pacing."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from stream_service.errors import CameraError
from stream_service.settings import DeviceSource, FileSource, FolderSource, SyntheticSource, UrlSource
from stream_service.sources.camera import ImageFolder, LiveStream, Pacer, SyntheticStream, open_source, to_gray


class FakeClock:
    """A monotonic clock that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def drain(source: Any) -> list[np.ndarray]:
    """Every frame up to the first None."""
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    return frames


def write_folder(tmp_path: Path, n: int = 4) -> Path:
    for i in range(n):
        image = np.full((24, 32), 10 * (i + 1), np.uint8)
        if i % 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)  # colour files come out gray too
        cv2.imwrite(str(tmp_path / f"frame{i:03d}.png"), image)
    return tmp_path


def test_folder_replays_sorted_images_as_gray(tmp_path: Path) -> None:
    folder = write_folder(tmp_path)
    source = open_source(FolderSource(kind="folder", path=folder, fps=1000, loop=False))
    frames = [source.read() for _ in range(4)]
    assert [int(f[0, 0]) for f in frames if f is not None] == [10, 20, 30, 40]
    assert all(f is not None and f.shape == (24, 32) and f.dtype == np.uint8 for f in frames)
    assert source.read() is None and source.finished
    assert source.counters.frames == 4


def test_folder_skips_and_counts_unreadable_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_folder(tmp_path, 2)
    (folder / "frame000b.png").write_bytes(b"not a png at all")
    source = open_source(FolderSource(kind="folder", path=folder, fps=1000, loop=False))
    values = [int(f[0, 0]) for f in drain(source)]
    assert values == [10, 20]
    assert source.counters.skipped == 1
    assert "frame000b.png" in caplog.text and "cannot be decoded" in caplog.text


def test_folder_loops(tmp_path: Path) -> None:
    source = open_source(FolderSource(kind="folder", path=write_folder(tmp_path, 2), fps=1000, loop=True))
    assert [int(source.read()[0, 0]) for _ in range(5)] == [10, 20, 10, 20, 10]  # type: ignore[index]


def test_folder_of_only_unreadable_files_raises(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"junk")
    source = open_source(FolderSource(kind="folder", path=tmp_path, fps=1000))
    with pytest.raises(CameraError, match="readable image"):
        source.read()


@pytest.mark.parametrize(("pattern", "message"), [("*.png", "matching '\\*.png', found none"), ("*", "")])
def test_folder_errors_name_the_folder(tmp_path: Path, pattern: str, message: str) -> None:
    path = tmp_path if message else tmp_path / "missing"
    with pytest.raises(CameraError, match=re.escape(str(path))):
        open_source(FolderSource(kind="folder", path=path, pattern=pattern))


def test_folder_replay_rate_on_a_fake_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    source = ImageFolder(FolderSource(kind="folder", path=write_folder(tmp_path), fps=5), clock, clock.sleep)
    start = clock.now
    for _ in range(4):
        source.read()
    assert clock.now - start == pytest.approx(3 * 0.2)
    assert max(clock.sleeps) <= 0.2 + 1e-9


def test_folder_replay_rate_in_real_time(tmp_path: Path) -> None:
    source = open_source(FolderSource(kind="folder", path=write_folder(tmp_path), fps=50, loop=True))
    start = time.monotonic()
    for _ in range(6):
        source.read()
    assert 5 * 0.02 * 0.9 <= time.monotonic() - start < 1.0


def test_pacer_never_blocks_longer_than_one_interval_and_does_not_burst() -> None:
    clock = FakeClock()
    pacer = Pacer(10, clock, clock.sleep)
    pacer.wait()
    clock.now += 5.0  # the caller stalled for 50 intervals
    pacer.wait()
    pacer.wait()
    assert clock.sleeps == [pytest.approx(0.1)]


def write_video(path: Path, n: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (64, 48))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((48, 64, 3), 20 * i + 10, np.uint8))
    writer.release()


def test_video_file_is_read_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    write_video(path, 5)
    source = open_source(FileSource(kind="file", path=path, fps=1000))
    frames = drain(source)
    assert len(frames) == 5 and all(f.shape == (48, 64) and f.dtype == np.uint8 for f in frames)
    assert [int(f.mean()) for f in frames] == pytest.approx([10, 30, 50, 70, 90], abs=3)
    assert source.finished


def test_video_file_loops(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    write_video(path, 3)
    source = open_source(FileSource(kind="file", path=path, loop=True, fps=1000))
    frames = [source.read() for _ in range(7)]
    assert all(f is not None for f in frames) and not source.finished
    source.close()
    assert source.read() is None


def test_video_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match=r"nope\.avi"):
        open_source(FileSource(kind="file", path=tmp_path / "nope.avi"))
    (tmp_path / "junk.avi").write_bytes(b"junk" * 100)
    with pytest.raises(CameraError, match=r"junk\.avi"):
        open_source(FileSource(kind="file", path=tmp_path / "junk.avi"))


def test_synthetic_source_exposes_reference_and_truth() -> None:
    settings = SyntheticSource(kind="synthetic", width=128, height=96, fps=1000, defect_rate=1.0, seed=3)
    source = open_source(settings)
    assert isinstance(source, SyntheticStream)
    frame = source.read()
    assert frame is not None and frame.shape == (96, 128) and source.reference().shape == (96, 128)
    assert source.truth is not None and source.truth["label"] in ("pass", "fail")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_url_on_a_closed_port_raises_after_retries() -> None:
    port = closed_port()
    settings = UrlSource(
        kind="url", url=f"http://127.0.0.1:{port}/video", max_retries=2, retry_backoff_s=0.01, retry_backoff_max_s=0.02
    )
    source = open_source(settings)
    start = time.monotonic()
    with pytest.raises(CameraError, match=rf"127\.0\.0\.1:{port}.*after 2 retries"):
        for _ in range(1000):
            assert source.read() is None
    assert time.monotonic() - start < 5
    assert source.counters.failed_opens == 3


class FakeCapture:
    """Delivers ``frames`` colour frames, then reports the stream gone."""

    def __init__(self, frames: int, opened: bool = True) -> None:
        self.left, self.opened, self.released = frames, opened, False

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.opened

    def read(self) -> tuple[bool, Any]:
        if self.left == 0:
            return False, None
        self.left -= 1
        return True, np.zeros((8, 8, 3), np.uint8)

    def release(self) -> None:
        self.released = True


def test_live_stream_reconnects_with_backoff_and_counts() -> None:
    clock = FakeClock()
    captures = iter([FakeCapture(2), FakeCapture(0, opened=False), FakeCapture(0, opened=False), FakeCapture(99)])
    settings = DeviceSource(kind="device", index=0, max_retries=3, retry_backoff_s=0.5, retry_backoff_max_s=0.8)
    stream = LiveStream("device:0", lambda: next(captures), settings, clock, clock.sleep)
    frames = [stream.read() for _ in range(60)]
    assert frames[0] is not None and frames[0].shape == (8, 8) and frames[2] is None
    assert frames[-1] is not None  # back after two failed reopenings
    assert (stream.counters.lost, stream.counters.failed_opens, stream.counters.reconnects) == (1, 2, 1)
    assert stream.counters.frames == sum(f is not None for f in frames)
    assert max(clock.sleeps) <= 0.05 + 1e-9  # one read() never blocks longer than the poll interval
    assert sum(clock.sleeps) == pytest.approx(0.5 + 0.8)  # backoff doubled, capped


def test_live_stream_that_opens_but_never_delivers_gives_up() -> None:
    clock = FakeClock()
    settings = DeviceSource(kind="device", index=2, max_retries=2, retry_backoff_s=0.1, retry_backoff_max_s=0.1)
    stream = LiveStream("device:2", lambda: FakeCapture(0), settings, clock, clock.sleep)
    with pytest.raises(CameraError, match=r"device:2: .*delivered no frame, after 2 retries"):
        for _ in range(100):
            assert stream.read() is None
    assert stream.counters.failed_opens == 3 and stream.finished


def test_to_gray_handles_bgra_and_16_bit() -> None:
    assert to_gray(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5)
    assert to_gray(np.full((4, 5), 65535, np.uint16)).max() == 255


@pytest.mark.parametrize("shape", [(6, 7, 3), (6, 7, 4), (6, 7), (6, 7, 1)], ids=["bgr", "bgra", "gray", "gray1"])
def test_to_gray_writes_into_the_array_it_is_given(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    slot = np.zeros(64, np.uint8)  # a frame's bytes inside a larger buffer, like a shared-memory slot
    asked: list[tuple[int, int]] = []

    def out(frame_shape: tuple[int, int]) -> np.ndarray:
        asked.append(frame_shape)
        return slot[:42].reshape(frame_shape)

    gray = to_gray(image, out)
    assert asked == [(6, 7)] and np.shares_memory(gray, slot)
    np.testing.assert_array_equal(gray, to_gray(image))
    np.testing.assert_array_equal(to_gray(image, lambda _: None), to_gray(image))  # no slot: allocated


def test_to_gray_rejects_what_is_not_an_8_bit_image() -> None:
    with pytest.raises(CameraError, match=r"expected a gray or colour 8-bit image, found float32 \(4, 5\)"):
        to_gray(np.zeros((4, 5), np.float32))
    with pytest.raises(CameraError, match=r"found uint8 \(4, 5, 2\)"):
        to_gray(np.zeros((4, 5, 2), np.uint8), lambda shape: np.zeros(shape, np.uint8))
