"""`stream-service reference grab`: a golden reference built straight from a configured camera.

A folder camera replays good frames (the synthetic board, shifted and noisy like a line camera); the
command runs as a process, as a user would run it, and the reference it writes is what the soartc
stage then loads for that camera.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from stream_service.model.references import load_reference
from stream_service.settings import CameraSettings
from stream_service.sources.synthetic import SyntheticCamera
from stream_service.stages.features import camera_reference

pytestmark = pytest.mark.timeout(120)
CLI = [sys.executable, "-m", "stream_service.cli"]


def line_config(tmp_path: Path, frames: int, **camera: Any) -> Path:
    board = SyntheticCamera(192, 160, seed=4, defect_rate=0.0).reference()
    rng = np.random.default_rng(0)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(frames):
        shifted = np.roll(board, (i % 3 - 1, (i * 2) % 3 - 1), axis=(0, 1)).astype(np.float32)
        noisy = np.clip(shifted + rng.normal(0, 3, shifted.shape), 0, 255).astype(np.uint8)
        assert cv2.imwrite(str(folder / f"{i:02d}.png"), noisy)
    source = {"kind": "folder", "path": str(folder), "fps": 50, "loop": False}
    cam = {"id": "line", "source": source, "reference": str(tmp_path / "refs" / "line"), "polarity": "dark-object"}
    path = tmp_path / "line.yaml"
    path.write_text(json.dumps({"cameras": [cam | camera]}))
    return path


def grab(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "reference", "grab", "--config", str(config), *args], capture_output=True, text=True, timeout=90
    )


def test_grab_writes_the_reference_the_camera_config_points_at(tmp_path: Path) -> None:
    config = line_config(tmp_path, frames=6, frame_size=[96, 80])
    done = grab(config, "--frames", "5", "--every", "0")
    assert done.returncode == 0, done.stderr
    assert "5 frames of camera line, shape 80x96 (H x W), dark-object" in done.stdout
    ref = load_reference(tmp_path / "refs" / "line", expected_shape=(80, 96))  # frames as the capture sends them
    assert (ref.meta.id, ref.meta.frame_count, ref.meta.polarity) == ("line", 5, "dark-object")
    assert [s.path for s in ref.meta.sources] == [f"camera:line#{i}" for i in range(5)]
    camera = CameraSettings.model_validate(json.loads(config.read_text())["cameras"][0])
    loaded = camera_reference(camera)  # what the soartc stage uses for this camera
    assert loaded.image_hw.shape == (80, 96) and loaded.reference_id == "line"
    # Registered to the first frame (the board shifted by (-1, -1) px) and averaged: the board, its noise
    # averaged away; only edges differ a little (half-pixel shifts after the resize).
    first = np.roll(SyntheticCamera(192, 160, seed=4).reference(), (-1, -1), axis=(0, 1))
    expected = cv2.resize(first, (96, 80), interpolation=cv2.INTER_AREA).astype(int)
    error = np.abs(loaded.image_hw.astype(int) - expected)[2:-2, 2:-2]
    assert np.median(error) <= 2 and error.mean() < 4


def test_grab_says_what_went_wrong(tmp_path: Path) -> None:
    config = line_config(tmp_path, frames=3)
    done = grab(config, "--frames", "10", "--every", "0")
    assert done.returncode == 1
    assert "camera line: expected 10 frames, found 3 before the source ended" in done.stderr
    assert not (tmp_path / "refs" / "line").exists()
    done = grab(config, "--camera", "left")
    assert done.returncode == 1 and "--camera: expected one of ['line'], found 'left'" in done.stderr
