"""Stage-process wiring without a pipeline: endpoints, camera choice, heartbeats, the lazily sized sender."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from stream_service.errors import ConfigError
from stream_service.messages import FrameHeader
from stream_service.service import Heartbeat, LazySender, camera_at, connectable
from stream_service.settings import Settings
from stream_service.shm_ring import ring_directory
from stream_service.transport import FrameReceiver

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
        assert sender.counters() == {"sent": 0, "dropped": {}}
        try:
            assert sender.send("frames.left", header, [frame])
            message = receiver.receive(10.0)
            assert message is not None
            np.testing.assert_array_equal(message.arrays[0], frame)
            assert receiver.ring_counts.total() == 0 and sender.counters()["sent"] == 1
            assert list(ring_directory().glob(f"stream-service-ring-{os.getpid()}-*"))  # pixels went through shm
        finally:
            sender.close()
