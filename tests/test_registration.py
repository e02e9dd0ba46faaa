"""Registration on real DeepPCB pairs shifted by known sub-pixel amounts, and its error cases."""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_service.errors import FrameShapeError, InputError, RegistrationError
from stream_service.vision.registration import (
    Registrar,
    Registration,
    apply_registration,
    estimate_affine,
    estimate_shift,
    register,
)

REPO = Path(__file__).resolve().parents[1]
# One pair from each of five boards (groups).
PAIRS = ("00041000", "13000000", "20085000", "50600000", "92000000")
SHIFTS = ((3.25, -1.5), (-7.6, 4.4), (0.0, 0.0), (12.3, 9.9))


@pytest.fixture(scope="module")
def deeppcb() -> Path:
    """The DeepPCB folder: $STREAM_SERVICE_DATASETS/deeppcb, or <repo>/../shared/datasets/deeppcb."""
    root = Path(os.environ.get("STREAM_SERVICE_DATASETS", REPO.parent / "shared" / "datasets")) / "deeppcb"
    if not root.is_dir():
        pytest.skip(f"DeepPCB data set not found at {root} (set STREAM_SERVICE_DATASETS to its parent folder)")
    return root


@pytest.fixture(scope="module")
def pairs(deeppcb: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """id -> (template, tested), each (640, 640) float32 in [0, 1]."""
    out = {}
    for pair_id in PAIRS:
        folder = deeppcb / "PCBData" / f"group{pair_id[:5]}" / pair_id[:5]
        images = [cv2.imread(str(folder / f"{pair_id}_{kind}.jpg"), cv2.IMREAD_GRAYSCALE) for kind in ("temp", "test")]
        assert all(img is not None for img in images), f"DeepPCB pair {pair_id} missing in {folder}"
        out[pair_id] = (images[0].astype(np.float32) / 255, images[1].astype(np.float32) / 255)
    return out


def shifted(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """The image's content moved by (dx, dy) pixels (bilinear, edges replicated)."""
    h, w = image.shape
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def corner_error(a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> float:
    """Largest distance between where two 2x3 affine maps send the corners of an (H, W) frame."""
    h, w = shape
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], np.float64).T
    return float(np.max(np.abs(np.asarray(a, np.float64) @ corners - np.asarray(b, np.float64) @ corners)))


@pytest.mark.parametrize("pair_id", PAIRS)
@pytest.mark.parametrize(("dx", "dy"), SHIFTS)
def test_shifted_template_is_recovered(pairs: dict, pair_id: str, dx: float, dy: float) -> None:
    template, _ = pairs[pair_id]
    reg = estimate_shift(template, shifted(template, dx, dy))
    assert reg.method == "translation"
    assert abs(reg.dx - dx) < 0.5 and abs(reg.dy - dy) < 0.5, (reg.dx, reg.dy)
    assert abs(reg.dx - dx) < 0.1 and abs(reg.dy - dy) < 0.1  # what the estimator achieves on clean content
    assert 0.9 < reg.confidence <= 1.0
    assert reg.matrix_2x3 == ((1.0, 0.0, reg.dx), (0.0, 1.0, reg.dy))


@pytest.mark.parametrize("pair_id", PAIRS)
@pytest.mark.parametrize(("dx", "dy"), SHIFTS)
def test_shifted_tested_image_is_recovered(pairs: dict, pair_id: str, dx: float, dy: float) -> None:
    # DeepPCB tested images are only roughly registered to their templates (offsets of a few tenths of
    # a pixel up to ~5 px), so the known quantity is the shift added on top of the pair's own offset.
    template, tested = pairs[pair_id]
    base = estimate_shift(template, tested)
    reg = estimate_shift(template, shifted(tested, dx, dy))
    assert abs(reg.dx - base.dx - dx) < 0.5 and abs(reg.dy - base.dy - dy) < 0.5, (base, reg)
    assert reg.confidence > 0.3  # defects and jitter lower it; unrelated images stay below ~0.15


@pytest.mark.parametrize("pair_id", PAIRS[:3])
def test_register_aligns_the_frame_onto_the_reference(pairs: dict, pair_id: str) -> None:
    template, _ = pairs[pair_id]
    frame = shifted(template, 5.5, -3.25)
    aligned, reg = register(template, frame)
    assert aligned.shape == template.shape and aligned.dtype == np.float32
    inner = (slice(16, -16), slice(16, -16))
    # What remains is the blur of two bilinear resamplings at the binary edges.
    assert np.abs(aligned - template)[inner].mean() < 0.2 * np.abs(frame - template)[inner].mean()
    assert reg.max_displacement(template.shape) == pytest.approx(math.hypot(reg.dx, reg.dy))


def test_sign_convention_on_a_synthetic_square() -> None:
    reference = np.zeros((128, 160), np.float32)
    reference[40:60, 50:80] = 1.0
    frame = np.zeros_like(reference)
    frame[43:63, 55:85] = 1.0  # the content moved 5 px right and 3 px down
    reg = estimate_shift(cv2.GaussianBlur(reference, (0, 0), 1.5), cv2.GaussianBlur(frame, (0, 0), 1.5))
    assert reg.dx == pytest.approx(5.0, abs=0.1) and reg.dy == pytest.approx(3.0, abs=0.1)
    aligned = apply_registration(frame, reg)
    assert np.abs(aligned - reference).mean() < 0.01


@pytest.mark.parametrize(
    ("pair_id", "angle_deg", "scale", "dx", "dy"),
    [
        ("00041000", 0.8, 1.0, 4.3, -2.7),
        ("20085000", -1.2, 1.01, -6.1, 3.4),
        ("92000000", 0.5, 0.995, 1.75, 8.2),
    ],
)
def test_affine_recovers_a_small_rotation_and_shift(
    pairs: dict, pair_id: str, angle_deg: float, scale: float, dx: float, dy: float
) -> None:
    template, _ = pairs[pair_id]
    h, w = template.shape
    truth = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle_deg, scale)
    truth[:, 2] += (dx, dy)
    # frame(truth @ p) = template(p): the matrix maps reference coordinates to frame coordinates.
    frame = cv2.warpAffine(template, truth, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    reg = estimate_affine(template, frame)
    assert reg.method == "affine"
    assert corner_error(reg.matrix(), truth, (h, w)) < 0.5
    aligned, reg2 = register(template, frame, "affine")
    assert corner_error(reg2.matrix(), truth, (h, w)) < 0.5
    inner = (slice(32, -32), slice(32, -32))
    assert np.abs(aligned - template)[inner].mean() < 0.02


def test_large_frames_are_estimated_downscaled_with_sub_pixel_accuracy(pairs: dict) -> None:
    template, _ = pairs["20085000"]
    big = cv2.resize(template, (1280, 1280), interpolation=cv2.INTER_LINEAR)
    reg = estimate_shift(big, shifted(big, 9.3, -6.6), max_side=640)
    assert abs(reg.dx - 9.3) < 0.5 and abs(reg.dy + 6.6) < 0.5
    truth = cv2.getRotationMatrix2D((639.5, 639.5), 0.6, 1.0)
    truth[:, 2] += (5.0, -3.0)
    frame = cv2.warpAffine(big, truth, (1280, 1280), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    assert corner_error(estimate_affine(big, frame, max_side=640).matrix(), truth, (1280, 1280)) < 1.0


def test_uint8_input_gives_the_float_result(pairs: dict) -> None:
    template, _ = pairs["00041000"]
    frame = shifted(template, 2.5, 1.25)
    as_u8 = estimate_shift(np.rint(template * 255).astype(np.uint8), np.rint(frame * 255).astype(np.uint8))
    as_f32 = estimate_shift(template, frame)
    assert as_u8.dx == pytest.approx(as_f32.dx, abs=0.05) and as_u8.dy == pytest.approx(as_f32.dy, abs=0.05)


def test_registrar_matches_register_and_method_none_is_identity(pairs: dict) -> None:
    template, tested = pairs["50600000"]
    frame = shifted(tested, -4.2, 2.6)
    registrar = Registrar(template)
    aligned, reg = registrar.register(frame)
    aligned2, reg2 = register(template, frame)
    assert reg == reg2 and np.array_equal(aligned, aligned2)
    same, none = register(template, frame, "none")
    assert none == Registration(0.0, 0.0, 1.0, "none") and np.array_equal(same, frame)


@settings(max_examples=20, deadline=None)
@given(dx=st.floats(-15.0, 15.0), dy=st.floats(-15.0, 15.0), seed=st.integers(0, 2**16))
def test_any_sub_pixel_shift_of_a_texture_is_recovered(dx: float, dy: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    texture = cv2.GaussianBlur(rng.random((192, 256), dtype=np.float32), (0, 0), 2.0)
    reg = estimate_shift(texture, shifted(texture, dx, dy))
    assert abs(reg.dx - dx) < 0.1 and abs(reg.dy - dy) < 0.1


@pytest.mark.parametrize("shape", [(301, 457), (97, 130), (480, 640)])
def test_odd_and_non_square_frames(shape: tuple[int, int]) -> None:
    texture = cv2.GaussianBlur(np.random.default_rng(7).random(shape, dtype=np.float32), (0, 0), 2.0)
    aligned, reg = register(texture, shifted(texture, 3.3, -2.2))
    assert aligned.shape == shape
    assert abs(reg.dx - 3.3) < 0.1 and abs(reg.dy + 2.2) < 0.1


BLANK = np.zeros((640, 640), np.float32)


@pytest.mark.parametrize(
    ("make_frame", "kwargs", "error", "words"),
    [
        (lambda t: t[:600, :], {}, FrameShapeError, ["expected the reference's (640, 640)", "found (600, 640)"]),
        (lambda t: np.dstack([t, t, t]), {}, FrameShapeError, ["expected a 2-D gray image", "(640, 640, 3)"]),
        (lambda t: shifted(t, 40.0, -3.0), {}, RegistrationError, ["expected at most 32.0 px", "found 40.1"]),
        (lambda t: shifted(t, 6.0, 0.0), {"max_shift": 4.0}, RegistrationError, ["expected at most 4.0 px"]),
        (lambda t: BLANK, {}, RegistrationError, ["confidence", "expected at least 0.1", "found 0.000"]),
        (lambda t: np.full_like(t, 0.5), {}, RegistrationError, ["confidence"]),
        (lambda t: shifted(t, 2.0, 1.0), {"min_confidence": 1.01}, RegistrationError, ["expected at least 1.01"]),
        (lambda t: np.where(t > 0.5, np.nan, t), {}, InputError, ["finite"]),
        (lambda t: t, {"method": "projective"}, InputError, ["method", "'projective'"]),
        (lambda t: BLANK, {"method": "affine"}, RegistrationError, ["confidence"]),
    ],
)
def test_register_errors(pairs: dict, make_frame, kwargs: dict, error: type[Exception], words: list[str]) -> None:
    template, _ = pairs["00041000"]
    with pytest.raises(error) as info:
        register(template, make_frame(template), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_blank_frame_has_zero_confidence(pairs: dict) -> None:
    template, _ = pairs["00041000"]
    assert estimate_shift(template, BLANK).confidence == 0.0
    assert estimate_shift(BLANK, BLANK).confidence == 0.0


@pytest.mark.parametrize("frame_kind", ["blank", "flipped"])
def test_ecc_divergence_is_a_registration_error(pairs: dict, frame_kind: str) -> None:
    template, _ = pairs["00041000"]
    frame = BLANK if frame_kind == "blank" else np.ascontiguousarray(template[::-1])
    with pytest.raises(RegistrationError, match="ECC affine registration: expected convergence") as info:
        estimate_affine(template, frame, initial=Registration(0.0, 0.0, 1.0, "translation"))
    assert isinstance(info.value.__cause__, cv2.error)


# 256 px crops of DeepPCB pairs whose tested image sits a few pixels off its template there (origin x, y):
# one arc of a pad (ECC wanders off), and parallel bars (phase correlation sees only the shift across them).
OFF_CROPS = (("20085163", (378, 291)), ("13000014", (184, 368)))


@pytest.mark.parametrize(("pair", "origin"), OFF_CROPS)
def test_affine_align_falls_back_to_the_shift_where_ecc_fails(
    deeppcb: Path, pair: str, origin: tuple[int, int]
) -> None:
    folder = deeppcb / "PCBData" / f"group{pair[:5]}" / pair[:5]
    x, y = origin
    full = [cv2.imread(str(folder / f"{pair}_{kind}.jpg"), cv2.IMREAD_GRAYSCALE) for kind in ("temp", "test")]
    ref, frame = (image[y : y + 256, x : x + 256].astype(np.float32) / 255.0 for image in full)
    differing = float((np.abs(ref - frame) > 0.3).mean())
    aligned, reg = Registrar(ref, "affine", max_shift=16.0).align(frame)
    left = float((np.abs(ref - aligned) > 0.3).mean())
    assert differing > 0.009  # the crop is visibly off before registration
    assert reg.method != "none" and left < differing / 5, (reg, differing, left)
