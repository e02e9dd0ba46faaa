"""Training windows: labels, token targets, symmetries, the group split, sampling, and real windows.

stream_service.training.dataset is pure NumPy/OpenCV: none of this needs torch.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_service.quality.manifest import ManifestItem
from stream_service.training.dataset import (
    AMBIGUOUS,
    FAIL,
    NO_AUGMENT,
    PASS,
    Augment,
    _box_symmetry,
    _symmetry,
    align,
    clean_frame,
    etch,
    good_block_mask,
    make_window,
    regional_move,
    sample_origins,
    split_by_group,
    token_targets,
    window_label,
)
from stream_service.vision.tokens import CHANNEL_NAMES, N_CHANNELS, FeatureSpec

# The window at (100, 100) of side 256 covers pixels 100..355 in both directions.
X0, Y0, SIZE = 100, 100, 256


@pytest.mark.parametrize(
    ("boxes", "expected"),
    [
        ([], PASS),
        ([(150, 150, 200, 200, 1)], FAIL),  # wholly inside
        ([(100, 100, 355, 355, 2)], FAIL),  # touching all four edges: corners are inclusive
        ([(100, 120, 130, 355, 3)], FAIL),  # touching the left and bottom edges
        ([(340, 100, 355, 110, 4)], FAIL),  # touching the right and top edges
        ([(99, 150, 120, 170, 5)], AMBIGUOUS),  # one pixel over the left edge
        ([(350, 340, 356, 350, 6)], AMBIGUOUS),  # one pixel over the right edge
        ([(200, 340, 210, 356, 1)], AMBIGUOUS),  # one pixel over the bottom edge
        ([(50, 50, 400, 400, 2)], AMBIGUOUS),  # bigger than the window
        ([(80, 150, 92, 160, 3)], AMBIGUOUS),  # x2 + 8 = 100: within the margin
        ([(80, 150, 91, 160, 3)], PASS),  # x2 + 8 = 99: just clear
        ([(363, 150, 380, 160, 4)], AMBIGUOUS),  # x1 - 8 = 355
        ([(364, 150, 380, 160, 4)], PASS),  # x1 - 8 = 356
        ([(150, 80, 160, 92, 5)], AMBIGUOUS),  # y2 + 8 = 100
        ([(150, 364, 160, 380, 5)], PASS),  # y1 - 8 = 356
        ([(80, 80, 91, 91, 6)], PASS),  # diagonal, clear in both
        ([(0, 0, 20, 20, 1), (600, 600, 630, 630, 2)], PASS),  # far
        ([(90, 150, 105, 160, 1), (150, 150, 200, 200, 2)], FAIL),  # one near, one inside
        ([(90, 150, 105, 160, 1), (600, 600, 630, 630, 2)], AMBIGUOUS),  # one near, one far
    ],
)
def test_window_label_table(boxes: list[tuple[int, int, int, int, int]], expected: int) -> None:
    assert window_label(boxes, X0, Y0, SIZE) == expected


def test_window_label_margin_is_a_parameter() -> None:
    box = [(80, 150, 95, 160, 3)]  # 5 px left of the window
    assert window_label(box, X0, Y0, SIZE, margin=4) == PASS
    assert window_label(box, X0, Y0, SIZE, margin=5) == AMBIGUOUS


def targets_from(rows: int, cols: int, *tokens: tuple[int, int, int, int]) -> np.ndarray:
    """(rows, cols) uint8 with the inclusive token rectangles (r1, c1, r2, c2) set."""
    out = np.zeros((rows, cols), np.uint8)
    for r1, c1, r2, c2 in tokens:
        out[r1 : r2 + 1, c1 : c2 + 1] = 1
    return out


@pytest.mark.parametrize(
    ("boxes", "x0", "y0", "expected"),
    [
        ([], 0, 0, targets_from(4, 4)),
        ([(0, 0, 15, 15, 1)], 0, 0, targets_from(4, 4, (0, 0, 0, 0))),  # exactly token (0, 0)
        ([(15, 15, 16, 16, 1)], 0, 0, targets_from(4, 4, (0, 0, 1, 1))),  # a 2x2 box on a token corner
        ([(20, 40, 50, 45, 2)], 0, 0, targets_from(4, 4, (2, 1, 2, 3))),  # rows 40..45 -> 2; cols 20..50 -> 1..3
        ([(120, 110, 130, 140, 3)], 100, 100, targets_from(4, 4, (0, 1, 2, 1))),  # window-relative
        ([(90, 90, 105, 105, 4)], 100, 100, targets_from(4, 4, (0, 0, 0, 0))),  # clipped at the top-left
        ([(150, 150, 400, 400, 4)], 100, 100, targets_from(4, 4, (3, 3, 3, 3))),  # clipped at the bottom-right
        ([(0, 0, 99, 99, 5)], 100, 100, targets_from(4, 4)),  # wholly before the window
        ([(164, 164, 200, 200, 5)], 100, 100, targets_from(4, 4)),  # wholly after the window
        ([(0, 0, 3, 3, 1), (60, 60, 63, 63, 6)], 0, 0, targets_from(4, 4, (0, 0, 0, 0), (3, 3, 3, 3))),
    ],
)
def test_token_targets_table(
    boxes: list[tuple[int, int, int, int, int]], x0: int, y0: int, expected: np.ndarray
) -> None:
    targets = token_targets(boxes, x0, y0, grid=4, block=16)
    assert targets.dtype == np.uint8
    np.testing.assert_array_equal(targets, expected)


SYMMETRIES = [(k, flip) for k in range(4) for flip in (False, True)]


def drawn_box(image: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(image)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


@pytest.mark.parametrize(("k", "flip"), SYMMETRIES)
@settings(max_examples=15, deadline=None)
@given(st.integers(0, 47), st.integers(0, 47), st.integers(0, 16), st.integers(0, 16))
def test_box_symmetry_matches_the_transformed_image(k: int, flip: bool, x1: int, y1: int, w: int, h: int) -> None:
    size = 64
    box = (x1, y1, x1 + w, y1 + h, 4)
    image = np.zeros((size, size), np.uint8)
    image[box[1] : box[3] + 1, box[0] : box[2] + 1] = 1
    (moved,) = _box_symmetry([box], size, k, flip)
    assert moved[:4] == drawn_box(_symmetry(image, k, flip))
    assert moved[4] == 4, "the defect type is kept"


def test_all_eight_symmetries_are_different() -> None:
    image = np.arange(16).reshape(4, 4)
    seen = {_symmetry(image, k, flip).tobytes() for k, flip in SYMMETRIES}
    assert len(seen) == 8


def item(number: int, group: str | None, boxes: list[Any] | None = None) -> ManifestItem:
    return ManifestItem(
        id=f"p{number}",
        reference=f"r{number}.png",
        frame=f"f{number}.png",
        label="fail",
        boxes=boxes or [],
        group=group,
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["g1", "g2", "g3", "g4", None]), max_size=30),
    st.lists(st.sampled_from(["g1", "g2", "g3", "g5"]), max_size=3),
)
def test_split_by_group_never_puts_a_group_on_both_sides(groups: list[str | None], val_groups: list[str]) -> None:
    items = [item(n, g) for n, g in enumerate(groups)]
    train, valid = split_by_group(items, val_groups)
    assert {i.group for i in train}.isdisjoint({i.group for i in valid})
    assert sorted(i.id for i in train + valid) == sorted(i.id for i in items)
    assert all(i.group in val_groups for i in valid)
    assert all(i.group not in val_groups for i in train)
    assert [i.id for i in train] == [i.id for i in items if i.group not in val_groups], "order is kept"


def test_sample_origins_finds_pass_windows_when_there_are_some() -> None:
    one_corner_box = item(0, "g", [[10, 10, 40, 40, 1]])
    rng = np.random.default_rng(0)
    origins = sample_origins(one_corner_box, (640, 640), 256, 12, rng)
    assert len(origins) == 12
    for n, (x0, y0) in enumerate(origins):
        assert 0 <= x0 <= 640 - 256 and 0 <= y0 <= 640 - 256
        label = window_label(one_corner_box.boxes, x0, y0, 256)
        if n % 3 == 0:
            assert label == FAIL, "every third window is around a box"
        if n % 3 == 1:
            assert label == PASS, "every third window is clear of boxes"


def test_sample_origins_without_pass_positions_still_returns_windows() -> None:
    # Boxes every 100 px: no 256 px window is clear of them.
    boxes = [[x, y, x + 10, y + 10, 1] for x in range(0, 640, 100) for y in range(0, 640, 100)]
    crowded = item(0, "g", boxes)
    origins = sample_origins(crowded, (640, 640), 256, 7, np.random.default_rng(1), tries=20)
    assert len(origins) == 7
    assert all(0 <= x0 <= 384 and 0 <= y0 <= 384 for x0, y0 in origins)
    assert all(window_label(boxes, x0, y0, 256) != PASS for x0, y0 in origins)


def test_sample_origins_skips_boxes_larger_than_the_window() -> None:
    huge = item(0, "g", [[0, 0, 300, 300, 2]])
    origins = sample_origins(huge, (640, 640), 256, 3, np.random.default_rng(2))
    assert len(origins) == 3
    assert all(window_label(huge.boxes, x0, y0, 256) != FAIL for x0, y0 in origins)


@pytest.mark.parametrize(
    ("boxes", "good"),
    [
        ([], [[True] * 4] * 4),
        ([(20, 20, 23, 23, 1)], [[False, False, True, True], [False, False, True, True], [True] * 4, [True] * 4]),
        ([(30, 0, 30, 0, 1)], [[True, False, False, True], [True] * 4, [True] * 4, [True] * 4]),
    ],
)
def test_good_block_mask(boxes: list[tuple[int, int, int, int, int]], good: list[list[bool]]) -> None:
    np.testing.assert_array_equal(good_block_mask(boxes, (64, 70), 16), np.array(good))


@pytest.fixture(scope="module")
def first_pair(deeppcb_items: list[ManifestItem]) -> tuple[np.ndarray, np.ndarray, ManifestItem]:
    from stream_service.quality.manifest import read_gray

    chosen = deeppcb_items[0]
    return read_gray(chosen.reference), read_gray(chosen.frame), chosen


def origin_around(box: tuple[int, ...], size: int = 256) -> tuple[int, int]:
    """The window origin that centres a box (clamped to a 640 px frame)."""
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    return min(max(cx - size // 2, 0), 640 - size), min(max(cy - size // 2, 0), 640 - size)


@pytest.mark.parametrize("aug", [NO_AUGMENT, Augment(), Augment(etch_px=1.0)], ids=["plain", "augmented", "etched"])
def test_make_window_on_a_real_pair(first_pair: tuple[np.ndarray, np.ndarray, ManifestItem], aug: Augment) -> None:
    reference, frame, chosen = first_pair
    spec = FeatureSpec()
    box = chosen.boxes[0]
    x0, y0 = origin_around(box)
    window = make_window(reference, frame, chosen.boxes, x0, y0, spec, 16, aug, np.random.default_rng(3))
    assert window.tokens.shape == (16, 16, N_CHANNELS) and window.tokens.dtype == np.float16
    assert window.targets.shape == (16, 16) and window.targets.dtype == np.uint8
    assert window.label == FAIL
    assert float(window.tokens.min()) >= 0.0 and float(window.tokens.max()) <= 1.0
    plain_targets = token_targets(chosen.boxes, x0, y0, 16, spec.block)
    if aug is NO_AUGMENT:
        np.testing.assert_array_equal(window.targets, plain_targets)
    else:
        # Rotations and flips of a 256 px window move whole tokens: the count of target tokens is kept.
        assert window.targets.sum() == plain_targets.sum()
    # The target tokens hold the defect: its difference survives the opening there.
    open_diff = [n for n, name in enumerate(CHANNEL_NAMES) if name.endswith(".open_diff")]
    diff = window.tokens[..., open_diff].astype(np.float32).max(axis=2)
    assert diff[window.targets > 0].max() > 0.0


def test_make_window_clear_of_boxes_is_a_pass(first_pair: tuple[np.ndarray, np.ndarray, ManifestItem]) -> None:
    reference, frame, chosen = first_pair
    origins = [(x, y) for x in range(0, 385, 16) for y in range(0, 385, 16)]
    clear = [o for o in origins if window_label(chosen.boxes, *o, 256) == PASS]
    if not clear:
        pytest.skip("no window of this pair is clear of its boxes")
    x0, y0 = clear[0]
    window = make_window(reference, frame, chosen.boxes, x0, y0, FeatureSpec(), 16, NO_AUGMENT, np.random.default_rng())
    assert window.label == PASS
    assert not window.targets.any()


@pytest.mark.parametrize("grow", [True, False], ids=["grown", "etched-back"])
def test_etch_moves_only_the_edges_by_the_fraction_asked(grow: bool) -> None:
    frame = np.zeros((40, 40), np.float32)
    frame[10:30, 12:28] = 1.0  # a copper pad
    full, half = etch(frame, 1.0, grow), etch(frame, 0.5, grow)
    changed = np.abs(full - frame) > 0
    # One pixel ring outside the pad (grown) or inside its border (etched back), nothing else.
    ring = np.zeros_like(changed)
    if grow:
        ring[9:31, 11:29] = True
        ring[9, 11] = ring[9, 28] = ring[30, 11] = ring[30, 28] = False  # a 3x3 cross does not reach corners
        ring[10:30, 12:28] = False
    else:
        ring[10:30, 12:28] = True
        ring[11:29, 13:27] = False
    np.testing.assert_array_equal(changed, ring)
    np.testing.assert_allclose(half[changed], 0.5)
    assert float(full.sum()) > float(frame.sum()) if grow else float(full.sum()) < float(frame.sum())
    np.testing.assert_array_equal(etch(frame, 0.0, grow), frame)


def test_etched_windows_of_a_clear_region_are_still_passes(
    first_pair: tuple[np.ndarray, np.ndarray, ManifestItem],
) -> None:
    """Etching is a harmless difference: it never turns a pass window into a fail (labels come from boxes)."""
    reference, frame, chosen = first_pair
    origins = [(x, y) for x in range(0, 385, 16) for y in range(0, 385, 16)]
    clear = [o for o in origins if window_label(chosen.boxes, *o, 256) == PASS]
    if not clear:
        pytest.skip("no window of this pair is clear of its boxes")
    rng = np.random.default_rng(5)
    windows = [
        make_window(reference, frame, chosen.boxes, *clear[0], FeatureSpec(), 16, Augment(etch_px=1.0), rng)
        for _ in range(4)
    ]
    assert all(w.label == PASS and not w.targets.any() for w in windows)


def test_clean_frame_removes_the_defects_and_keeps_the_rest(
    first_pair: tuple[np.ndarray, np.ndarray, ManifestItem],
) -> None:
    """A defect-free window: inside the boxes (grown by 8 px) the reference, registered into the frame's place;
    outside them the tested board's own pixels, untouched. The classical baseline finds nothing left."""
    from stream_service.vision.baseline import BaselineParams, baseline
    from stream_service.vision.soartc import to_unit

    reference, frame, chosen = first_pair
    x0, y0 = origin_around(chosen.boxes[0])
    local = [(x1 - x0, y1 - y0, x2 - x0, y2 - y0, t) for x1, y1, x2, y2, t in chosen.boxes]
    ref = to_unit(reference[y0 : y0 + 256, x0 : x0 + 256], True)
    raw = to_unit(frame[y0 : y0 + 256, x0 : x0 + 256], True)
    spec = FeatureSpec(registration="affine", valid_region=True)
    cleaned = clean_frame(ref, raw, local, spec)
    fill = np.zeros(ref.shape, bool)
    for x1, y1, x2, y2, _ in local:
        fill[max(y1 - 8, 0) : max(y2 + 9, 0), max(x1 - 8, 0) : max(x2 + 9, 0)] = True
    np.testing.assert_array_equal(cleaned[~fill], raw[~fill])
    params = BaselineParams(threshold=0.3, open_px=3, min_area=20)
    assert baseline(ref, align(ref, raw, spec), params).verdict == "fail"  # the defect is there before
    assert baseline(ref, align(ref, cleaned, spec), params).verdict == "pass"


def test_clean_windows_are_passes_without_targets(first_pair: tuple[np.ndarray, np.ndarray, ManifestItem]) -> None:
    reference, frame, chosen = first_pair
    origin = origin_around(chosen.boxes[0])
    assert window_label(chosen.boxes, *origin, 256) == FAIL
    rng = np.random.default_rng(3)
    win = make_window(reference, frame, chosen.boxes, *origin, FeatureSpec(), 16, Augment(), rng, clean=True)
    assert win.label == PASS and not win.targets.any()
    dirty = make_window(reference, frame, chosen.boxes, *origin, FeatureSpec(), 16, NO_AUGMENT, rng)
    assert dirty.label == FAIL and dirty.targets.any()


def test_clean_frame_leaves_the_frame_as_it_is_for_boxes_outside_the_window() -> None:
    """A window's boxes in its own coordinates can lie wholly left of or above it: nothing is filled."""
    rng = np.random.default_rng(4)
    ref = rng.random((64, 64)).astype(np.float32)
    frame = rng.random((64, 64)).astype(np.float32)
    outside = [(-40, 2, -20, 10, 1), (3, -50, 9, -30, 2)]
    np.testing.assert_array_equal(clean_frame(ref, frame, outside, FeatureSpec()), frame)


def test_calibration_keeps_the_front_end_and_measures_the_tolerant_frames(deeppcb_items: list[Any]) -> None:
    from stream_service.training.dataset import calibrate_spec

    items = deeppcb_items[:4]
    plain = calibrate_spec(items, FeatureSpec(registration="affine", valid_region=True))
    tolerant = calibrate_spec(items, FeatureSpec(registration="affine", valid_region=True, tolerance_px=1))
    assert (tolerant.registration, tolerant.valid_region, tolerant.tolerance_px) == ("affine", True, 1)
    assert plain.tolerance_px == 0
    # Edge jitter is most of what good blocks differ by: forgiving it lowers every shear constant.
    assert tolerant.calibration.constants[2] < plain.calibration.constants[2]
    assert tolerant.sub_calibration.constants[2] < plain.sub_calibration.constants[2]


def _bar_mask() -> np.ndarray:
    mask = np.zeros((96, 96), bool)
    mask[20:76, 30:50] = True  # a 20 px trace
    mask[20:76, 60:66] = True  # and a 6 px one, 10 px away
    return mask


def test_regional_move_grows_and_etches_edges_by_at_most_the_amplitude() -> None:
    mask = _bar_mask()
    moved = regional_move(mask, 2.5, [], np.random.default_rng(4))
    grown, etched = moved & ~mask, mask & ~moved
    assert grown.any() or etched.any()
    to_copper = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 3)
    to_gap = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    assert (to_copper[grown] <= 3.0).all() and (to_gap[etched] <= 3.0).all()
    fields = [regional_move(mask, 2.5, [], np.random.default_rng(s)) for s in range(8)]
    assert any((f & ~mask).any() for f in fields) and any((mask & ~f).any() for f in fields)


def test_regional_move_leaves_boxes_alone_and_draws_nothing_when_off() -> None:
    mask = _bar_mask()
    box = (26, 16, 54, 80, 1)
    moved = regional_move(mask, 2.5, [box], np.random.default_rng(4))
    np.testing.assert_array_equal(moved[12:85, 22:59], mask[12:85, 22:59])
    rng = np.random.default_rng(9)
    assert regional_move(mask, 0.0, [], rng) is mask
    assert rng.random() == np.random.default_rng(9).random()


def test_regionally_etched_windows_keep_their_labels_and_targets(
    first_pair: tuple[np.ndarray, np.ndarray, ManifestItem],
) -> None:
    """The regional etching changes the features of some windows and never a label or a token target."""
    import dataclasses

    reference, frame, chosen = first_pair
    x0, y0 = origin_around(chosen.boxes[0])
    aug = dataclasses.replace(NO_AUGMENT, regional_etch_px=3.0)
    plain = make_window(reference, frame, chosen.boxes, x0, y0, FeatureSpec(), 16, NO_AUGMENT, np.random.default_rng())
    etched = [
        make_window(reference, frame, chosen.boxes, x0, y0, FeatureSpec(), 16, aug, np.random.default_rng(s))
        for s in range(6)
    ]
    assert all(w.label == plain.label and np.array_equal(w.targets, plain.targets) for w in etched)
    assert any(not np.array_equal(w.tokens, plain.tokens) for w in etched)
