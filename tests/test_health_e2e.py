"""Camera health end to end: real stage processes under `stream-service run`, and cameras that are missing,
come back, vanish, cannot be reached or send frames of the wrong size.

One pipeline runs four cameras side by side: a synthetic camera (always fine; its fails fill the
dashboard's list of recent fails), a video file that does not exist yet, an RTSP URL on a closed port,
and a folder of frames whose size is not the reference's. What a line engineer relies on is checked
where they would look: `/api/status`, `/healthz` (503 naming the camera), the `status.<camera>` messages
on the PUB socket, the dashboard in a browser, its /metrics, and recovery without restarting anything.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_pipeline_e2e import CLI, MODEL_DIR, STARTUP_S, alive, free_ports, rendered_page

from stream_service.model.references import build_reference, save_reference
from stream_service.runtime.summary import missed_between
from stream_service.sources.synthetic import SyntheticCamera
from stream_service.wire.messages import CameraStatus, Verdict
from stream_service.wire.transport import FrameReceiver

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "model.onnx").is_file(), reason=f"the bundled model is missing ({MODEL_DIR})"),
]
SIZE = 256
WAIT_S = 90.0


@dataclass
class Line:
    process: subprocess.Popen[str]
    directory: Path
    dashboard: str
    video: Path
    subscriber: FrameReceiver
    statuses: list[CameraStatus]
    mjpeg_port: int

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.dashboard + path, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())
        except urllib.error.URLError:
            return 0, {}  # not serving yet

    def camera(self, camera_id: str) -> dict[str, Any]:
        return dict(self.get("api/status")[1].get("health", {}).get("cameras", {}).get(camera_id, {}))

    def until(self, what: str, check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert self.process.poll() is None, f"`run` exited with {self.process.returncode}\n{self.logs()}"
            assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}\n{self.logs()}"
            self.drain()
            time.sleep(0.3)

    def drain(self) -> None:
        while (message := self.subscriber.receive(0.05)) is not None:
            if isinstance(message.header, CameraStatus):
                self.statuses.append(message.header)

    def logs(self) -> str:
        out = [f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.directory / "run").glob("*.log"))]
        return "\n".join([*out, f"--- run\n{(self.directory / 'run.out').read_text()[-3000:]}"])


def write_video(path: Path, frames: list[np.ndarray], fps: float = 8.0) -> None:
    tmp = path.with_name("writing-" + path.name)
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), fps, (SIZE, SIZE), False)
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    tmp.rename(path)  # the camera sees the whole file at once, as a line PC's copy would land


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    directory = tmp_path_factory.mktemp("line")
    board = SyntheticCamera(width=SIZE, height=SIZE, seed=11, defect_rate=0.0)
    save_reference(
        build_reference([board.reference()], reference_id="board", polarity="dark-object"), directory / "ref"
    )
    small = directory / "small"
    small.mkdir()
    for i in range(3):  # frames of 200x200 against a 256x256 reference
        assert cv2.imwrite(str(small / f"{i}.png"), cv2.resize(board.next_frame()[0], (200, 200)))
    capture, features, verdicts, http, rtsp, mjpeg = free_ports(6)
    ref = str(directory / "ref")
    cameras = [
        {"id": "synth", "source": {"kind": "synthetic", "width": SIZE, "height": SIZE, "fps": 4, "seed": 11}},
        {"id": "file", "source": {"kind": "file", "path": str(directory / "line.avi"), "loop": True}, "reference": ref},
        {
            "id": "rtsp",
            "source": {"kind": "url", "url": f"rtsp://127.0.0.1:{rtsp}/line", "retry_backoff_s": 0.2, "max_retries": 3},
            "reference": ref,
        },
        {"id": "small", "source": {"kind": "folder", "path": str(small), "fps": 4, "loop": True}, "reference": ref},
        {
            "id": "net",  # an HTTP MJPEG camera (OpenCV's FFmpeg backend, like RTSP) that is not there yet
            "source": {
                "kind": "url",
                "url": f"http://127.0.0.1:{mjpeg}/stream.mjpg",
                "retry_backoff_s": 0.2,
                "retry_backoff_max_s": 1.0,
                "max_retries": 1000,
                "open_timeout_ms": 2000,
                "read_timeout_ms": 2000,
            },
            "reference": ref,
        },
    ]
    config = {
        "cameras": cameras,
        "transport": {
            "capture_out": "tcp://127.0.0.1:{port}",
            "capture_port": capture,
            "features_out": f"tcp://127.0.0.1:{features}",
            "verdicts_pub": f"tcp://127.0.0.1:{verdicts}",
        },
        "soartc": {"device": "cpu"},
        "inference": {"device": "cpu", "threads": 1},
        "supervisor": {"heartbeat_s": 0.2, "heartbeat_timeout_s": 30.0, "startup_timeout_s": STARTUP_S},
        "dashboard": {"enabled": True, "host": "127.0.0.1", "port": http},
        "health": {"camera_stale_s": 3.0, "status_every_s": 1.0},
    }
    path = directory / "line.yaml"
    path.write_text(json.dumps(config))
    with (directory / "run.out").open("w") as out:
        process = subprocess.Popen(
            [*CLI, "run", "--config", str(path), "--run-dir", str(directory / "run"), "--summary-every", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    subscriber = FrameReceiver(f"tcp://127.0.0.1:{verdicts}", kind="sub", topics=["status."], hwm=1000, linger_ms=0)
    started = Line(process, directory, f"http://127.0.0.1:{http}/", directory / "line.avi", subscriber, [], mjpeg)
    try:
        started.until(
            "the synthetic camera online", lambda: started.camera("synth").get("state") == "online", STARTUP_S
        )
        yield started
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        for beat in (directory / "run").glob("*.json"):
            pid = int(json.loads(beat.read_text())["pid"])
            if alive(pid):
                subprocess.run(["kill", "-9", str(pid)], check=False)
        subscriber.close()


def test_a_missing_video_file_is_a_failed_camera_everywhere_a_person_or_a_machine_looks(line: Line) -> None:
    line.until("camera file failed", lambda: line.camera("file").get("state") == "failed")
    reason = line.camera("file")["reason"]
    assert str(line.video) in reason and "expected a video file" in reason and "retrying" in reason
    code, health = line.get("healthz")
    assert code == 503 and not health["ok"]
    assert any(p.startswith("camera file failed:") and str(line.video) in p for p in health["problems"]), health
    line.until(
        "a status.file message", lambda: any(s.camera_id == "file" and s.state == "failed" for s in line.statuses)
    )
    status = next(s for s in line.statuses if s.camera_id == "file" and s.state == "failed")
    assert status.reason == reason and status.last_frame_ns is None
    assert line.camera("synth")["state"] == "online"  # one camera's trouble is not the others'


def test_a_closed_rtsp_port_is_reported_with_its_reason(line: Line) -> None:
    line.until("camera rtsp not online", lambda: line.camera("rtsp").get("state") in ("reconnecting", "failed"))
    assert "rtsp://127.0.0.1:" in line.camera("rtsp")["reason"] or "cannot be opened" in line.camera("rtsp")["reason"]
    assert any(p.startswith("camera rtsp ") for p in line.get("healthz")[1]["problems"])


def test_frames_of_the_wrong_size_are_refused_at_the_capture_with_the_reason(line: Line) -> None:
    line.until("camera small failed", lambda: line.camera("small").get("state") == "failed")
    reason = line.camera("small")["reason"]
    assert "frames of 200x200 px, expected 256x256 px" in reason and "frame_size" in reason
    assert "reference grab" in reason
    soartc = json.loads((line.directory / "run" / "soartc-0.json").read_text())
    assert not soartc["stats"]["stage"].get("errors"), soartc  # never fed onward to fail there
    capture = json.loads((line.directory / "run" / "capture-small.json").read_text())
    assert capture["stats"]["capture"]["refused"] > 0 and capture["stats"]["capture"]["sent"] == 0


def metric(line: Line, name: str, **labels: str) -> float | None:
    """One sample of the dashboard's /metrics (None when it is not there)."""
    with urllib.request.urlopen(line.dashboard + "metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
    return next((s.value for s in samples if s.labels == labels), None)


def test_the_metrics_say_which_cameras_are_up_and_count_the_refused_frames(line: Line) -> None:
    line.until("camera small failed", lambda: line.camera("small").get("state") == "failed")
    line.until("camera file failed", lambda: line.camera("file").get("state") == "failed")
    up = {camera: metric(line, "stream_service_camera_up", camera=camera) for camera in ("synth", "file", "small")}
    assert up == {"synth": 1.0, "file": 0.0, "small": 0.0}
    line.until("rtsp down on /metrics", lambda: metric(line, "stream_service_camera_up", camera="rtsp") == 0.0)
    refused = {"stage": "capture", "process": "capture-small", "camera": "small", "reason": "wrong_size"}
    line.until(
        "refused frames on /metrics", lambda: (metric(line, "stream_service_frames_dropped_total", **refused) or 0) > 0
    )
    assert (metric(line, "stream_service_camera_errors_total", camera="file") or 0) > 0  # it could not be opened


def test_a_file_that_appears_brings_its_camera_online_and_one_that_is_deleted_fails_it(line: Line) -> None:
    board = SyntheticCamera(width=SIZE, height=SIZE, seed=11, defect_rate=0.0)
    write_video(line.video, [board.next_frame()[0] for _ in range(16)])
    line.until("camera file online", lambda: line.camera("file").get("state") == "online")
    line.until("status.file online", lambda: any(s.camera_id == "file" and s.state == "online" for s in line.statuses))
    line.video.unlink()
    line.until("camera file failed again", lambda: line.camera("file").get("state") == "failed")
    assert "gone" in line.camera("file")["reason"] or "found nothing" in line.camera("file")["reason"]


def test_the_dashboard_shows_the_failed_camera_card_and_the_recent_fails(line: Line, tmp_path: Path) -> None:
    line.until(
        "a recent fail with its picture", lambda: any(f["picture"] for f in line.get("api/status")[1]["recent_fails"])
    )
    dom = rendered_page(line.dashboard, tmp_path / "profile")
    card = re.search(r'<section class="camera down" id="camera-small">(.*?)</section>', dom, re.S)
    assert card is not None, dom[-4000:]
    assert 'data-state="failed"' in card.group(1) and "frames of 200x200 px" in card.group(1)
    assert "it is retried on its own" in card.group(1)  # what to do
    assert re.search(r'<section class="camera" id="camera-synth">.*?data-state="online"', dom, re.S)
    fails = re.search(r'<div id="fails">(.*?)</div>', dom, re.S)
    assert fails is not None and "FAIL score" in fails.group(1), dom[-4000:]
    assert re.search(r'<img alt="highlight of synth #\d+" src="/api/fails/[^"]+\.jpg">', fails.group(1))
    caption = re.search(r'data-field="caption">(synth #\d+ (PASS|FAIL) score [0-9.]+ .*?Z)<', dom)
    assert caption is not None, dom[-4000:]


def test_a_second_run_on_the_same_endpoints_is_refused_and_the_first_is_undisturbed(line: Line) -> None:
    def capture_drops() -> int:
        return int(
            json.loads((line.directory / "run" / "capture-synth.json").read_text())["stats"]["capture"]["dropped"]
        )

    endpoint = json.loads((line.directory / "line.yaml").read_text())["transport"]["verdicts_pub"]
    with FrameReceiver(endpoint, kind="sub", topics=["verdicts.synth"], hwm=1000, linger_ms=0) as verdicts:
        time.sleep(0.5)  # subscribed
        before = capture_drops()
        started = time.monotonic()
        second = subprocess.run(
            [*CLI, "run", "--config", str(line.directory / "line.yaml"), "--run-dir", str(line.directory / "second")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0 and time.monotonic() - started < 10, second.stderr
        pattern = r"transport\.\w+.*: expected a free endpoint, found tcp://127\.0\.0\.1:\d+ in use"
        assert re.search(pattern, second.stderr) and "another `stream-service run`" in second.stderr, second.stderr
        time.sleep(2)  # frames a second pipeline pulled away would be missing from here on
        got = []
        while (message := verdicts.receive(0.2)) is not None:
            if isinstance(message.header, Verdict):
                got.append(message.header)
    # Every frame the synthetic camera took in that time got its verdict here: none was pulled away.
    assert len(got) >= 4
    assert sum(missed_between(a.seq, b.seq, b.dropped) for a, b in itertools.pairwise(got)) == 0
    assert capture_drops() == before
    assert line.camera("synth")["state"] == "online"


class MjpegCamera:
    """An HTTP MJPEG network camera on loopback (multipart/x-mixed-replace), serving one board frame at 5 fps."""

    def __init__(self, port: int) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        board = SyntheticCamera(width=SIZE, height=SIZE, seed=11, defect_rate=0.0).next_frame()[0]
        picture = cv2.imencode(".jpg", board)[1].tobytes()
        self.stop = threading.Event()
        stop = self.stop

        class Stream(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while not stop.is_set():
                        head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(picture)}\r\n\r\n"
                        self.wfile.write(head.encode() + picture + b"\r\n")
                        time.sleep(0.2)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Stream)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_network_camera_that_comes_back_is_online_again_without_a_restart(line: Line) -> None:
    line.until("camera net not online", lambda: line.camera("net").get("state") in ("reconnecting", "failed"))
    assert "cannot be opened" in line.camera("net")["reason"]
    restarts = {p["name"]: p["restarts"] for p in line.get("api/status")[1]["processes"]}
    camera = MjpegCamera(line.mjpeg_port)
    try:
        line.until("camera net online", lambda: line.camera("net").get("state") == "online")
    finally:
        camera.close()
    line.until("camera net lost", lambda: line.camera("net").get("state") in ("reconnecting", "failed"))
    assert {p["name"]: p["restarts"] for p in line.get("api/status")[1]["processes"]} == restarts  # no restart
