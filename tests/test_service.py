"""Stage-process wiring without a pipeline: endpoints, camera choice, heartbeats, the lazily sized sender."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from stream_service.errors import ConfigError, SharedMemoryError
from stream_service.runtime.service import (
    Heartbeat,
    LazySender,
    camera_at,
    connectable,
    header_limits,
    receive_bound,
)
from stream_service.settings import CameraSettings, Settings
from stream_service.sources.camera import open_source
from stream_service.stages.capture import CaptureStage, CaptureStats, run_capture
from stream_service.wire.messages import FrameHeader, HeaderLimits, Message
from stream_service.wire.shm_ring import ring_directory
from stream_service.wire.transport import FrameReceiver

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("tcp://*:57300", "tcp://127.0.0.1:57300"),
        ("tcp://0.0.0.0:57300", "tcp://127.0.0.1:57300"),
        ("tcp://10.0.0.20:57300", "tcp://10.0.0.20:57300"),
        ("ipc:///tmp/x.ipc", "ipc:///tmp/x.ipc"),
    ],
)
def test_peers_connect_to_loopback_instead_of_a_wildcard(endpoint: str, expected: str) -> None:
    assert connectable(endpoint) == expected


def two_cameras(**transport: object) -> Settings:
    cameras = [{"id": c, "source": {"kind": "synthetic"}} for c in ("left", "right")]
    return Settings.model_validate({"cameras": cameras, "transport": transport})


def test_a_stage_picks_its_camera_by_id() -> None:
    settings = two_cameras()
    assert camera_at(settings, "right")[0] == 1
    with pytest.raises(ConfigError, match=r"--camera: expected one of \['left', 'right'\].*found none"):
        camera_at(settings, None)
    with pytest.raises(ConfigError, match="found 'middle'"):
        camera_at(settings, "middle")


def test_heartbeats_are_written_atomically_at_their_interval_and_watch_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, stop = tmp_path / "soartc-0.json", threading.Event()
    beat = Heartbeat(path, "soartc-0", "soartc", 60.0, stop, exit_with_parent=True)
    beat.snapshot = lambda: {"stage": {"received": 3}}
    beat.write()
    assert json.loads(path.read_text())["state"] == "starting"
    beat.running()
    record = json.loads(path.read_text())
    assert (record["name"], record["state"], record["stats"]) == ("soartc-0", "running", {"stage": {"received": 3}})
    path.unlink()
    beat()  # within the interval: nothing written
    assert not path.exists() and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr("os.getppid", lambda: 1)  # the supervisor died: re-parented
    beat.running()
    assert stop.is_set()


def test_the_lazy_sender_sizes_its_ring_to_the_first_message(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/frames.ipc"
    settings = two_cameras(shared_memory=True, shm_slots=2)
    frame = np.arange(120 * 100, dtype=np.uint16).reshape(120, 100)
    header = FrameHeader(camera_id="left", seq=0, capture_ns=0, shape=frame.shape, dtype="uint16")
    with FrameReceiver(endpoint, bind=True, hwm=4, linger_ms=0) as receiver:
        sender = LazySender(endpoint, bind=False, hwm=4, settings=settings)
        assert sender.counters() == {"sent": 0, "sent_in_place": 0, "dropped": {}}
        try:
            assert sender.send("frames.left", header, [frame])
            message = receiver.receive(10.0)
            assert message is not None
            np.testing.assert_array_equal(message.arrays[0], frame)
            assert receiver.ring_counts.total() == 0 and sender.counters()["sent"] == 1
            assert list(ring_directory().glob(f"stream-service-ring-{os.getpid()}-*"))  # pixels went through shm
        finally:
            sender.close()


@pytest.mark.parametrize("frame_size", [None, (48, 40)], ids=["as-read", "resized"])
def test_the_capture_writes_each_frame_once_straight_into_a_shared_memory_slot(
    tmp_path: Path, frame_size: tuple[int, int] | None
) -> None:
    rng = np.random.default_rng(5)
    colour = [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8) for _ in range(3)]
    (tmp_path / "frames").mkdir()
    for i, image in enumerate(colour):
        assert cv2.imwrite(str(tmp_path / "frames" / f"{i}.png"), image)
    camera = CameraSettings.model_validate(
        {
            "id": "left",
            "source": {"kind": "folder", "path": str(tmp_path / "frames"), "fps": 100, "loop": False},
            "reference": str(tmp_path),
            "frame_size": frame_size,
        }
    )
    expected = [cv2.imread(str(tmp_path / "frames" / f"{i}.png"), cv2.IMREAD_GRAYSCALE) for i in range(3)]
    if frame_size is not None:
        expected = [cv2.resize(e, frame_size, interpolation=cv2.INTER_AREA) for e in expected]
    endpoint = f"ipc://{tmp_path}/frames.ipc"
    settings = two_cameras(shared_memory=True, shm_slots=4)
    stop, stats = threading.Event(), CaptureStats()
    received: list[Message] = []
    with FrameReceiver(endpoint, bind=True, hwm=8, linger_ms=0) as receiver:
        sender = LazySender(endpoint, bind=False, hwm=8, settings=settings)
        worker = threading.Thread(
            target=run_capture,
            args=(CaptureStage(camera), lambda: open_source(camera.source), sender, stop),
            kwargs={"retry_s": 0.05, "stats": stats, "slots": sender.reserve_frame},
        )
        worker.start()
        try:
            deadline = time.monotonic() + 20
            while len(received) < len(colour) and time.monotonic() < deadline:
                message = receiver.receive(0.2)
                if message is not None and isinstance(message.header, FrameHeader):  # statuses share the socket
                    received.append(message)
        finally:
            stop.set()
            worker.join(5)
            sender.close()
    assert not worker.is_alive()
    assert [m.header.seq for m in received] == [0, 1, 2]  # type: ignore[union-attr]
    for message, gray in zip(received, expected, strict=True):
        np.testing.assert_array_equal(message.arrays[0], gray)
    # The first frame sizes the ring (copied in); every later one was converted straight into its slot.
    # 3 frames and the camera's 2 statuses (starting, then online at the first frame).
    assert sender.counters() == {"sent": 3 + 2, "sent_in_place": 2, "dropped": {}}


@pytest.mark.parametrize(
    ("endpoint", "on_this_host"),
    [
        ("tcp://127.0.0.1:57100", True),
        ("tcp://localhost:57100", True),
        ("tcp://[::1]:57100", True),
        ("ipc:///tmp/frames.ipc", True),
        ("tcp://10.0.0.20:57200", False),
        ("tcp://*:57100", False),  # bound for peers on other hosts
    ],
)
def test_shared_memory_auto_is_on_only_for_hops_within_this_host(endpoint: str, on_this_host: bool) -> None:
    assert two_cameras().transport.uses_shared_memory(endpoint) is on_this_host
    assert two_cameras(shared_memory=False).transport.uses_shared_memory(endpoint) is False
    assert two_cameras(shared_memory=True).transport.uses_shared_memory(endpoint) is True


def test_without_room_for_a_ring_auto_falls_back_to_zeromq_and_true_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_room(*args: object) -> None:
        raise SharedMemoryError("create shm ring /dev/shm/x: expected 4096 bytes of RAM, found [Errno 28] No space")

    monkeypatch.setattr("stream_service.wire.transport.ShmRing", no_room)
    frame = np.ones((8, 8), np.uint8)
    header = FrameHeader(camera_id="left", seq=0, capture_ns=0, shape=frame.shape, dtype="uint8")
    endpoint = f"ipc://{tmp_path}/frames.ipc"
    with FrameReceiver(endpoint, bind=True, hwm=4, linger_ms=0) as receiver:
        auto = LazySender(endpoint, bind=False, hwm=4, settings=two_cameras(shared_memory="auto"))
        try:
            assert auto.shared_memory and auto.send("frames.left", header, [frame])
            message = receiver.receive(10.0)
            assert message is not None and not auto.shared_memory
            np.testing.assert_array_equal(message.arrays[0], frame)
            assert "No space; its pixels go over ZeroMQ instead" in caplog.text
        finally:
            auto.close()
        forced = LazySender(endpoint, bind=False, hwm=4, settings=two_cameras(shared_memory=True))
        with pytest.raises(SharedMemoryError, match="No space"):
            forced.send("frames.left", header, [frame])
        forced.close()


def test_each_receiving_socket_is_bounded_by_its_cameras_frame_size() -> None:
    settings = Settings.model_validate(
        {
            "cameras": [
                {"id": "small", "source": {"kind": "synthetic", "width": 200, "height": 100}},
                {"id": "usb", "source": {"kind": "device"}, "reference": "refs/usb"},
                {"id": "sized", "source": {"kind": "device"}, "reference": "refs/x", "frame_size": [1920, 1080]},
            ],
            "limits": {"message_margin_bytes": 1000, "unsized_frame_bytes": 5_000_000},
        }
    )
    small, usb, sized = settings.cameras
    assert receive_bound(settings, [small]) == 65536 + 1000  # a 20,000-byte frame: the header bound is larger
    assert receive_bound(settings, [sized]) == 1920 * 1080 + 1000
    assert receive_bound(settings, [usb]) == 5_000_000 + 1000  # a size the settings do not fix
    assert receive_bound(settings, [small, sized], token_bytes_per_pixel=4.0) == 4 * 1920 * 1080 + 1000
    assert receive_bound(settings, [small, sized]) < 200 * 2**20  # a 200 MB message is refused
    assert header_limits(settings) == HeaderLimits(max_bytes=65536, max_depth=32)


def test_start_up_work_beats_from_a_thread_and_the_loop_takes_over_after(tmp_path: Path) -> None:
    path, stop = tmp_path / "soartc-0.json", threading.Event()
    beat = Heartbeat(path, "soartc-0", "soartc", 0.05, stop)
    with beat.beating():  # a long first compile: the stage's loop is held for 0.5 s
        time.sleep(0.1)
        first = json.loads(path.read_text())["t"]
        time.sleep(0.4)
        last = json.loads(path.read_text())["t"]
    assert last - first >= 0.25  # written all along, not once
    path.unlink()
    time.sleep(0.2)
    assert not path.exists()  # the thread stopped with the block: a hang after start-up is still a hang
