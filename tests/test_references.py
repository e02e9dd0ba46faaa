"""Golden references: build from real DeepPCB templates, store, load and validate, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from stream_service.cli import app
from stream_service.errors import (
    FrameShapeError,
    GoldenReferenceError,
    ImageReadError,
    InputError,
    RegistrationError,
)
from stream_service.model.references import (
    IMAGE_FILE,
    META_FILE,
    Reference,
    build_reference,
    build_reference_from_files,
    load_reference,
    save_reference,
)

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = ("00041000", "20085000", "92000000")
SHIFTS = ((0.0, 0.0), (3.25, -1.5), (-7.6, 4.4), (12.3, 9.9), (-2.4, -5.7))
CREATED = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


@pytest.fixture(scope="module")
def deeppcb() -> Path:
    """The DeepPCB folder: $STREAM_SERVICE_DATASETS/deeppcb, or <repo>/../shared/datasets/deeppcb."""
    root = Path(os.environ.get("STREAM_SERVICE_DATASETS", REPO.parent / "shared" / "datasets")) / "deeppcb"
    if not root.is_dir():
        pytest.skip(f"DeepPCB data set not found at {root} (set STREAM_SERVICE_DATASETS to its parent folder)")
    return root


def template_path(deeppcb: Path, pair_id: str) -> Path:
    return deeppcb / "PCBData" / f"group{pair_id[:5]}" / pair_id[:5] / f"{pair_id}_temp.jpg"


@pytest.fixture(scope="module")
def templates(deeppcb: Path) -> dict[str, np.ndarray]:
    """id -> DeepPCB template, (640, 640) float32 in [0, 1]."""
    out = {}
    for pair_id in TEMPLATES:
        image = cv2.imread(str(template_path(deeppcb, pair_id)), cv2.IMREAD_GRAYSCALE)
        assert image is not None, f"DeepPCB template {pair_id} missing"
        out[pair_id] = image.astype(np.float32) / 255
    return out


def shifted(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    h, w = image.shape
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def good_frames(template: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Five 'good frames': the template shifted by SHIFTS, with gain, offset and pixel noise."""
    rng = np.random.default_rng(seed)
    gains = (1.0, 0.92, 1.08, 0.96, 1.04)
    offsets = (0.0, 0.03, -0.03, 0.02, -0.02)
    frames = []
    for (dx, dy), gain, offset in zip(SHIFTS, gains, offsets, strict=True):
        noisy = gain * shifted(template, dx, dy) + offset + rng.normal(0, 0.05, template.shape)
        frames.append(np.clip(noisy, 0, 1).astype(np.float32))
    return frames


@pytest.fixture
def saved(templates: dict[str, np.ndarray], tmp_path: Path) -> tuple[Reference, Path]:
    frames = good_frames(templates["00041000"])[:3]
    ref = build_reference(frames, reference_id="cam1", version=2, polarity="dark-object", created=CREATED)
    return ref, save_reference(ref, tmp_path / "ref")


def write_png(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8))
    return path


@pytest.mark.parametrize("pair_id", TEMPLATES)
def test_mean_of_shifted_noisy_frames_is_close_to_the_template(templates: dict, pair_id: str) -> None:
    template = templates[pair_id]
    frames = good_frames(template)
    ref = build_reference(frames, reference_id=pair_id, created=CREATED)
    inner = (slice(24, -24), slice(24, -24))

    def mismatch(image: np.ndarray) -> float:
        return float(((image > 0.5) != (template > 0.5))[inner].mean())

    # Binarised, the mean is the template; each shifted frame is not.
    assert mismatch(ref.image) < 1e-3 and mismatch(frames[3]) > 1e-2
    # Away from edges, averaging five frames lowers the noise (clipping at 0 and 1 leaves a small bias).
    kernel = np.ones((5, 5), np.uint8)
    bright = cv2.erode((template > 0.5).astype(np.uint8), kernel)
    dark = cv2.erode((template < 0.5).astype(np.uint8), kernel)
    flat = (bright | dark).astype(bool)[inner]
    assert (ref.image - template)[inner][flat].std() < 0.8 * (frames[0] - template)[inner][flat].std()
    assert np.abs(ref.image - template)[inner].mean() < 0.035
    assert ref.image.shape == template.shape and ref.image.dtype == np.float32
    assert ref.meta.frame_count == 5 and ref.meta.shape == (640, 640)
    assert ref.meta.max_shift_px == pytest.approx(np.hypot(12.3, 9.9), abs=0.3)


def test_build_with_registration_none_keeps_misalignment(templates: dict) -> None:
    template = templates["20085000"]
    frames = good_frames(template)
    aligned = build_reference(frames, reference_id="a", created=CREATED)
    unaligned = build_reference(frames, reference_id="a", registration="none", created=CREATED)
    inner = (slice(24, -24), slice(24, -24))
    assert np.abs(aligned.image - template)[inner].mean() < np.abs(unaligned.image - template)[inner].mean()
    assert unaligned.meta.max_shift_px == 0.0 and unaligned.meta.registration == "none"


def test_save_and_load_round_trip(saved: tuple[Reference, Path]) -> None:
    ref, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == sorted([IMAGE_FILE, META_FILE])
    png = cv2.imread(str(directory / IMAGE_FILE), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and png.shape == (640, 640)
    loaded = load_reference(directory, expected_shape=(640, 640))
    assert loaded.meta == ref.meta
    assert np.array_equal(loaded.image, ref.image)
    assert np.array_equal(loaded.unit(), 1.0 - ref.image)  # dark-object: inverted for the kernel
    meta = json.loads((directory / META_FILE).read_text())
    assert meta["format_version"] == 1 and meta["created"] == "2025-03-04T05:06:07Z"
    assert meta["shape"] == [640, 640] and meta["polarity"] == "dark-object"


def test_build_from_files_records_sources(templates: dict, tmp_path: Path) -> None:
    paths = [write_png(tmp_path / f"good{i}.png", f) for i, f in enumerate(good_frames(templates["92000000"])[:3])]
    ref = build_reference_from_files(paths, tmp_path / "line3", polarity="bright-object", version=4)
    assert ref.meta.id == "line3" and ref.meta.version == 4 and ref.meta.frame_count == 3
    assert [s.path for s in ref.meta.sources] == [str(p) for p in paths]
    assert [s.sha256 for s in ref.meta.sources] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert load_reference(tmp_path / "line3").meta == ref.meta


def test_build_from_dataset_files_directly(deeppcb: Path, tmp_path: Path) -> None:
    path = template_path(deeppcb, "20085000")
    ref = build_reference_from_files([path, path], tmp_path / "ref", reference_id="t")
    assert ref.meta.max_shift_px == 0.0
    assert np.abs(ref.image - cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) / 255).max() < 1e-4


def _remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _edit_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        meta = json.loads((directory / META_FILE).read_text())
        change(meta)
        (directory / META_FILE).write_text(json.dumps(meta))

    return edit


def _tamper_pixel(directory: Path) -> None:
    pixels = cv2.imread(str(directory / IMAGE_FILE), cv2.IMREAD_UNCHANGED)
    pixels[100, 100] ^= 0xFF
    cv2.imwrite(str(directory / IMAGE_FILE), pixels)


def _as_8bit(directory: Path) -> None:
    pixels = cv2.imread(str(directory / IMAGE_FILE), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(directory / IMAGE_FILE), (pixels >> 8).astype(np.uint8))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_remove(IMAGE_FILE), ["expected the file reference.png, found none"]),
        (_remove(META_FILE), ["expected the file reference.json, found none"]),
        (_tamper_pixel, ["sha256", "was modified"]),
        (_as_8bit, ["expected a 16-bit single-channel PNG", "uint8"]),
        (lambda d: (d / IMAGE_FILE).write_bytes(b"not a png"), ["16-bit", "undecodable"]),
        (lambda d: (d / META_FILE).write_text("{not json"), ["reference.json", "Invalid JSON"]),
        (_edit_json(lambda m: m.update(version=0)), ["version", "greater than or equal to 1", "found 0"]),
        (_edit_json(lambda m: m.pop("image_sha256")), ["image_sha256", "Field required"]),
        (_edit_json(lambda m: m.update(colour="red")), ["colour", "Extra inputs are not permitted"]),
        (_edit_json(lambda m: m.update(polarity="grey")), ["polarity", "'grey'"]),
        (_edit_json(lambda m: m.update(format_version=2)), ["format_version"]),
        (_edit_json(lambda m: m.update(created="2025-03-04T05:06:07")), ["created", "timezone"]),
        (_edit_json(lambda m: m.update(shape=[640, 641])), ["expected shape (640, 641)", "found (640, 640)"]),
    ],
)
def test_load_rejects_damaged_references(
    saved: tuple[Reference, Path], damage: Callable[[Path], None], words: list[str]
) -> None:
    _, directory = saved
    damage(directory)
    with pytest.raises(GoldenReferenceError) as info:
        load_reference(directory)
    for word in words:
        assert word in str(info.value)


def test_load_rejects_a_reference_of_another_frame_size(saved: tuple[Reference, Path]) -> None:
    _, directory = saved
    with pytest.raises(
        GoldenReferenceError, match=r"expected the camera's frame shape .* \(480, 640\), found \(640, 640\)"
    ):
        load_reference(directory, expected_shape=(480, 640))


def test_load_rejects_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(GoldenReferenceError, match=re.escape("expected the file reference.json")):
        load_reference(tmp_path / "nowhere")


def test_build_errors(templates: dict, tmp_path: Path) -> None:
    template = templates["00041000"]
    with pytest.raises(InputError, match="expected at least 1 frame, found 0"):
        build_reference([], reference_id="x")
    with pytest.raises(InputError, match="expected at least 1 image file, found 0"):
        build_reference_from_files([], tmp_path / "out")
    with pytest.raises(FrameShapeError, match=r"frame 1: expected the first frame's shape \(640, 640\), found"):
        build_reference([template, template[:320]], reference_id="x")
    with pytest.raises(RegistrationError, match=re.escape("frame 1: registration shift: expected at most 32.0 px")):
        build_reference([template, shifted(template, 45.0, 0.0)], reference_id="x")
    with pytest.raises(InputError, match="id"):
        build_reference([template], reference_id="")


def test_build_from_files_errors(templates: dict, tmp_path: Path) -> None:
    template = templates["00041000"]
    good = write_png(tmp_path / "a.png", template)
    small = write_png(tmp_path / "b.png", template[:480, :600])
    garbage = tmp_path / "c.png"
    garbage.write_bytes(b"\x89PNG broken")
    with pytest.raises(FrameShapeError) as info:
        build_reference_from_files([good, small], tmp_path / "out")
    assert all(w in str(info.value) for w in (str(small), "expected size 640x640", "found 600x480", str(good)))
    with pytest.raises(ImageReadError, match=re.escape(f"image {garbage}: expected an image OpenCV can decode")):
        build_reference_from_files([good, garbage], tmp_path / "out")
    with pytest.raises(ImageReadError, match=re.escape("missing.png: expected a readable image file")):
        build_reference_from_files([good, tmp_path / "missing.png"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_build_and_show(templates: dict, tmp_path: Path) -> None:
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i, frame in enumerate(good_frames(templates["20085000"])[:3]):
        write_png(frames_dir / f"{i}.png", frame)
    out = tmp_path / "ref"
    runner = CliRunner()
    args = ["reference", "build", str(frames_dir), "--out", str(out), "--id", "cam7", "--version", "3"]
    result = runner.invoke(app, [*args, "--polarity", "dark-object", "--registration", "translation"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("reference cam7 v3: 3 frames, shape 640x640 (H x W), translation registration")
    applied = float(result.output.split("max shift applied ")[1].split(" px")[0])
    assert applied == pytest.approx(np.hypot(7.6, 4.4), abs=0.3)  # the (-7.6, 4.4) frame moved the most
    shown = runner.invoke(app, ["reference", "show", str(out)])
    assert shown.exit_code == 0, shown.output
    meta = json.loads(shown.output)
    assert (meta["id"], meta["version"], meta["frame_count"], meta["polarity"]) == ("cam7", 3, 3, "dark-object")


def test_cli_errors_exit_1_with_a_message(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["reference", "build", str(tmp_path / "nope.png"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert f"error: image {tmp_path / 'nope.png'}: expected a readable image file" in result.output
    assert "Traceback" not in result.output
    shown = runner.invoke(app, ["reference", "show", str(tmp_path)])
    assert shown.exit_code == 1 and "expected the file reference.json, found none" in shown.output
