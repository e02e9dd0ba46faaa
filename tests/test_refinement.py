"""Local refinement of a registration: a locally distorted board is aligned tile by tile, defects are not."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest

from stream_service.errors import FrameShapeError, InputError
from stream_service.vision.arrays import F32
from stream_service.vision.refinement import LOCAL_MAX_PX, local_shifts, refine_local
from stream_service.vision.registration import Registrar, invalid_region, mask_invalid
from stream_service.vision.tokens import FeatureSpec, forgive_jitter

SIDE = 160


def board() -> F32:
    """Copper (1) traces on laminate (0): horizontal bars and vertical traces crossing them."""
    image = np.zeros((SIDE, SIDE), np.float32)
    for y in range(12, SIDE - 12, 24):
        image[y : y + 8, 8 : SIDE - 8] = 1.0
    for x in range(20, SIDE - 20, 40):
        image[8 : SIDE - 8, x : x + 6] = 1.0
    return image


def bent(image: F32, dy_px: float) -> F32:
    """The board with its right part sitting ``dy_px`` lower: 0 left of x = 64, dy_px right of x = 96, a
    linear ramp between (a film stretched in one region only)."""
    xs, ys = np.meshgrid(np.arange(SIDE, dtype=np.float32), np.arange(SIDE, dtype=np.float32))
    dy = np.clip((xs - 64.0) / 32.0, 0.0, 1.0) * np.float32(dy_px)
    return np.asarray(cv2.remap(image, xs, ys - dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), np.float32)


def evidence(reference: F32, frame: F32) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Pixels the features (1 px edge-jitter tolerance) still see as different."""
    return np.asarray(np.abs(forgive_jitter(reference, frame, 1) - reference) > 0.3, bool)


def with_defects(image: F32) -> tuple[F32, list[tuple[slice, slice]]]:
    """A pin-hole in a bar and a spur from a bar into the laminate, both in the right (bent) part."""
    out = image.copy()
    pin = (slice(38, 42), slice(120, 124))  # inside the bar at rows 36-43
    spur = (slice(68, 73), slice(112, 118))  # below the bar at rows 60-67, between two traces
    out[pin] = 0.0
    out[spur] = 1.0
    return out, [pin, spur]


def test_a_locally_distorted_board_is_aligned_by_tile() -> None:
    reference = board()
    frame = bent(reference, 2.0)
    before = evidence(reference, frame).sum()
    refined = refine_local(reference, frame, 2)
    assert before > 300  # one warp cannot fix a board bent in one region: bands along every bar
    assert evidence(reference, refined).sum() <= 0.05 * before
    # The left part was aligned already: its tiles keep their pixels.
    np.testing.assert_array_equal(refined[:, :40], frame[:, :40])


def test_an_aligned_board_with_defects_is_left_as_it_is() -> None:
    reference = board()
    frame, _ = with_defects(reference)
    assert not local_shifts(reference, frame, 2).any()
    assert refine_local(reference, frame, 2) is frame


def test_defects_survive_the_refinement_of_a_distorted_board() -> None:
    reference = board()
    defective, boxes = with_defects(reference)
    refined = refine_local(reference, bent(defective, 2.0), 2)
    seen = evidence(reference, refined)
    for rows, cols in boxes:
        area = (rows.stop - rows.start) * (cols.stop - cols.start)
        # The defect moved with its bar by up to 2 px: look for its pixels in the box grown by 2.
        grown = seen[rows.start - 2 : rows.stop + 2, cols.start - 2 : cols.stop + 2]
        assert grown.sum() >= 0.8 * area
    assert seen.sum() <= 3 * sum((r.stop - r.start) * (c.stop - c.start) for r, c in boxes)


def test_pixels_fetched_from_outside_the_frame_or_its_invalid_region_are_the_references() -> None:
    reference = board()
    frame = bent(reference, 2.0)
    invalid = np.zeros(reference.shape, bool)
    invalid[:, -12:] = True
    refined = refine_local(reference, np.where(invalid, reference, frame).astype(np.float32), 2, invalid)
    np.testing.assert_array_equal(refined[invalid], reference[invalid])
    # The bent part reads 2 rows further down: the last 2 rows would come from below the frame.
    np.testing.assert_array_equal(refined[-2:, 100:], reference[-2:, 100:])


@pytest.mark.parametrize(
    ("px", "error", "match"),
    [
        (-1, InputError, r"local refinement px: expected 0 to 3, found -1"),
        (LOCAL_MAX_PX + 1, InputError, r"local refinement px: expected 0 to 3, found 4"),
    ],
)
def test_bad_settings_are_refused_with_the_value_found(px: int, error: type[Exception], match: str) -> None:
    reference = board()
    with pytest.raises(error, match=match):
        refine_local(reference, reference, px)
    with pytest.raises(InputError, match=rf"feature local_px: expected 0 to 3, found {px}"):
        FeatureSpec(local_px=px)


def test_a_frame_of_another_shape_is_refused() -> None:
    with pytest.raises(FrameShapeError, match=r"expected the reference's \(160, 160\), found \(160, 150\)"):
        refine_local(board(), board()[:, :150], 2)


def test_zero_px_returns_the_frame_itself() -> None:
    reference = board()
    frame = bent(reference, 2.0)
    assert refine_local(reference, frame, 0) is frame


def test_the_front_end_is_align_mask_then_refine() -> None:
    reference = board()
    frame = np.roll(bent(reference, 2.0), (3, -2), axis=(0, 1))
    registrar = Registrar(reference, "translation")
    aligned, reg = registrar.align(frame)
    plain, plain_reg = registrar.front_end(frame)
    np.testing.assert_array_equal(plain, aligned)
    masked, _ = registrar.front_end(frame, valid_region=True)
    np.testing.assert_array_equal(masked, mask_invalid(reference, aligned, reg))
    refined, refined_reg = registrar.front_end(frame, valid_region=True, local_px=2)
    assert refined_reg == reg == plain_reg  # the global registration, whatever the tiles did
    invalid = invalid_region(aligned.shape, reg)
    np.testing.assert_array_equal(refined, refine_local(reference, masked, 2, invalid))


def test_the_error_gallery_shows_the_difference_the_refined_features_see() -> None:
    from stream_service.quality.gallery import panel

    reference = (board() * 255).astype(np.uint8)
    frame = (bent(board(), 2.0) * 255).round().astype(np.uint8)

    def difference(local_px: int) -> int:
        picture = panel(reference, frame, None, [], "x", registration="none", tolerance_px=1, local_px=local_px)
        return int((picture[-SIDE:, 2 * (SIDE + 4) : 2 * (SIDE + 4) + SIDE, 0] > 76).sum())

    assert difference(0) > 300 and difference(2) <= 0.05 * difference(0)
