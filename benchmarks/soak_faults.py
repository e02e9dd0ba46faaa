"""The faults of ``bench_soak.py --faults``: what is done to the pipeline, when, and how it is accounted.

A schedule over the soak (fractions of its length): kill each stage in turn (SIGKILL), remove and restore
the folder camera's frames, stall a second subscriber for 30 s, and send a burst of hostile messages to
the infer stage's features endpoint. At the end, the journal is compared with the frames captured and with
what the benchmark's subscriber received.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

from stream_service.model.references import build_reference, save_reference
from stream_service.sources.synthetic import SyntheticCamera
from stream_service.wire.transport import FrameReceiver, open_socket

STALL_S = 30.0


def folder_camera(folder: Path, fps: float, frames: int = 40) -> dict[str, Any]:
    """A folder camera replaying pre-rendered synthetic 640x640 frames, with the clean render as reference."""
    camera = SyntheticCamera(width=640, height=640, seed=5, defect_rate=0.3)
    (folder / "frames").mkdir()
    for i in range(frames):
        cv2.imwrite(str(folder / "frames" / f"{i:03d}.png"), camera.next_frame()[0])
    save_reference(build_reference([camera.reference()], reference_id="replay", polarity="dark-object"), folder / "ref")
    return {
        "id": "cam1",
        "source": {"kind": "folder", "path": str(folder / "frames"), "fps": fps, "loop": True},
        "reference": str(folder / "ref"),
    }


def hostile_parts() -> list[list[bytes]]:
    """Messages a faulty or hostile peer sends: malformed, deeply nested, absurd numbers, wrong shapes."""
    frame = {"schema_version": "1.2", "kind": "features", "camera_id": "cam0", "capture_ns": 0, "dtype": "uint8"}
    return [
        [b"features.cam0", b"{not json"],
        [b"features.cam0", b"[" * 100_000],
        [b"features.cam0", json.dumps(frame | {"seq": int("9" * 4000), "shape": [2, 2]}).encode()[:60_000]],
        [b"features.cam0", json.dumps(frame | {"seq": 1, "shape": [4]}).encode()],
        [b"features.cam0", json.dumps({"kind": "verdict", "schema_version": "1.2"}).encode()],
        [b"features.cam0"],
    ]


@dataclass
class Faults:
    """Runs the schedule; ``log`` records what was done and when (seconds into the soak)."""

    run_dir: Path
    frames_dir: Path
    features_endpoint: str
    verdicts_endpoint: str
    minutes: float
    log: list[dict[str, Any]] = field(default_factory=list)
    stalled_missed: int | None = None
    _done: set[str] = field(default_factory=set)

    def schedule(self) -> list[tuple[float, str, Callable[[], None]]]:
        return [
            (0.10, "kill soartc-0", lambda: self._kill("soartc-0")),
            (0.25, "kill infer", lambda: self._kill("infer")),
            (0.40, "kill capture-cam0", lambda: self._kill("capture-cam0")),
            (0.50, "remove cam1's frames", lambda: self.frames_dir.rename(self.frames_dir.with_name("frames-away"))),
            (0.55, "restore cam1's frames", lambda: self.frames_dir.with_name("frames-away").rename(self.frames_dir)),
            (0.65, "stall a subscriber 30 s", self._stall),
            (0.80, "hostile burst", self._hostile),
        ]

    def due(self, elapsed_s: float) -> None:
        for at, name, action in self.schedule():
            if name not in self._done and elapsed_s >= at * self.minutes * 60:
                self._done.add(name)
                action()
                self.log.append({"t_s": round(elapsed_s, 1), "fault": name})

    def _kill(self, name: str) -> None:
        pid = int(json.loads((self.run_dir / f"{name}.json").read_text())["pid"])
        os.kill(pid, signal.SIGKILL)

    def _stall(self) -> None:
        def stall() -> None:
            with FrameReceiver(self.verdicts_endpoint, kind="sub", topics=["verdicts."], hwm=10, linger_ms=0) as sub:
                time.sleep(1.0)
                got = 0
                time.sleep(STALL_S)  # reading nothing: the PUB drops for this subscriber past its queue of 10
                while sub.receive(0.5) is not None:
                    got += 1
                self.stalled_missed = max(0, int(STALL_S * 20) - got)  # 2 cameras x 10 fps offered

        threading.Thread(target=stall, daemon=True).start()

    def _hostile(self) -> None:
        sock = open_socket("push", self.features_endpoint, bind=False, hwm=10_000, linger_ms=2000)
        try:
            for _ in range(100):
                for parts in hostile_parts():
                    sock.send_multipart(parts)
        finally:
            sock.close()


def account(journal: Path, captured: int, received_ids: set[str]) -> dict[str, Any]:
    """The journal against the frames captured and the verdicts this benchmark received."""
    with sqlite3.connect(journal) as db:
        rows = [(vid, json.loads(body)) for vid, body in db.execute("SELECT verdict_id, body FROM verdicts")]
    journaled = {vid for vid, _ in rows}
    reported_dropped = sum(int(body.get("dropped", 0)) for _, body in rows)
    return {
        "frames_captured": captured,
        "journaled_verdicts": len(rows),
        "reported_dropped": reported_dropped,
        "unaccounted_frames": captured - len(rows) - reported_dropped,
        "received_not_journaled": len(received_ids - journaled),
    }
