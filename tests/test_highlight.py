"""The highlight filter: attention gating, SOARTC magnitude, defect-shaped pieces, regions, overlay."""

from __future__ import annotations

import numpy as np
import pytest

from stream_service.vision.highlight import Pieces, highlight, overlay, regions, token_relevance
from stream_service.vision.tokens import N_CHANNELS
from stream_service.vision.windows import WindowLayout

BLOCK = 16


def frame_with(blob: bool = True, band: bool = True) -> np.ndarray:
    """A 64x64 opened-difference mask: a compact 6x6 blob and/or a 3 px thick band 60 px long."""
    mask = np.zeros((64, 64), np.uint8)
    if blob:
        mask[5:11, 5:11] = 1
    if band:
        mask[40:43, 2:62] = 1
    return mask


def tokens(value: float = 1.0) -> np.ndarray:
    return np.full((4, 4, N_CHANNELS), value, np.float32)


def test_pieces_measure_thickness_and_length() -> None:
    pieces = Pieces.of(frame_with())
    by_area = sorted(zip(pieces.area[1:], pieces.thickness[1:], pieces.long_side[1:], strict=True))
    (blob_area, blob_thick, blob_long), (band_area, band_thick, band_long) = by_area
    assert (blob_area, blob_long) == (36, 6) and blob_thick >= 4
    assert (band_area, band_long) == (180, 60) and band_thick <= 4


@pytest.mark.parametrize(
    ("max_elongation", "min_area", "blob_shown", "band_shown"),
    [
        (1e6, 0, True, True),  # no shape filter
        (8.0, 0, True, False),  # the band is 60 px long and ~3 px thick: a registration band
        (8.0, 40, False, False),  # the blob (36 px) is under the minimum area
    ],
)
def test_shape_filter_keeps_defect_like_pieces(
    max_elongation: float, min_area: int, blob_shown: bool, band_shown: bool
) -> None:
    mask = frame_with()
    relevance = np.full((4, 4), 5.0, np.float32)
    result = highlight(tokens(), relevance, Pieces.of(mask), relevance, BLOCK, 1.0, 0.0, max_elongation, min_area)
    assert bool(result.mask_hw[5:11, 5:11].all()) is blob_shown
    assert bool(result.mask_hw[40:43, 2:62].any()) is band_shown
    assert not (result.mask_hw & (mask == 0)).any()  # only difference pixels are ever shown


def test_attention_and_magnitude_gate_tokens() -> None:
    mask = frame_with(band=False)
    relevance = np.zeros((4, 4), np.float32)
    relevance[0, 0] = 4.0  # the token holding the blob
    pieces = Pieces.of(mask)
    shown = highlight(tokens(), relevance, pieces, relevance, BLOCK, 3.0, 0.5, 1e6, 0)
    assert shown.keep_hw.sum() == 1 and shown.mask_hw.sum() == 36
    assert not highlight(tokens(), relevance, pieces, relevance, BLOCK, 5.0, 0.5, 1e6, 0).mask_hw.any()
    assert not highlight(tokens(0.1), relevance, pieces, relevance, BLOCK, 3.0, 0.5, 1e6, 0).mask_hw.any()


def test_relevance_only_from_windows_judged_fail() -> None:
    layout = WindowLayout.cover((4, 8), 4, 4)  # two windows side by side
    attention = np.zeros((2, 4, 4), np.float32)
    attention[:, 1, 1] = 1.0
    relevance = token_relevance(layout, np.array([0.9, 0.2], np.float32), attention, threshold=0.5)
    assert relevance[1, 1] == 16.0  # 16 tokens per window: all attention on one token = 16x uniform
    assert relevance[1, 5] == 0.0  # the second window passed: nothing of it is highlighted


def test_regions_merge_close_pieces_and_score_them() -> None:
    mask = np.zeros((64, 64), bool)
    mask[10:14, 10:14] = True
    mask[10:14, 18:22] = True  # 4 px apart: the same defect
    mask[50:54, 50:54] = True
    score = np.zeros((4, 4), np.float32)
    score[3, 3] = 0.8
    found = regions(mask, score, BLOCK)
    assert len(found) == 2
    assert (found[0].x1, found[0].x2, found[0].area) == (10, 21, 32)
    assert found[1].score == pytest.approx(0.8)
    picture = overlay(np.full((64, 64), 128, np.uint8), mask, tuple(found), failed=True)
    assert picture.shape == (64, 64, 3) and picture[11, 11, 2] > picture[11, 11, 0]


@pytest.mark.parametrize(("draw_boxes", "alpha"), [(True, 1.0), (False, 0.5)])
def test_overlay_follows_the_highlight_settings(draw_boxes: bool, alpha: float) -> None:
    frame = np.full((64, 64), 100, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:30, 20:30] = True
    found = (regions(mask, np.ones((4, 4), np.float32), BLOCK)[0],)
    picture = overlay(frame, mask, found, True, color_bgr=(255, 0, 0), alpha=alpha, draw_boxes=draw_boxes)
    expected = np.round((1 - alpha) * 100 + alpha * np.array([255, 0, 0])).astype(int)
    assert np.abs(picture[25, 25].astype(int) - expected).max() <= 1
    box_pixel = picture[17, 25]  # on the box drawn 3 px outside the region
    assert (box_pixel.tolist() == [255, 0, 0]) is draw_boxes
