"""The classical baseline on real DeepPCB pairs, and its tuning."""

from __future__ import annotations

import numpy as np
import pytest

from stream_service.training.dataset import align
from stream_service.vision.baseline import BaselineParams, baseline, tune_baseline


def background_spot(reference: np.ndarray, side: int, start: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(y, x) of the first side x side square, with 2 px around it, where the reference has no copper."""
    h, w = reference.shape
    for y in range(max(start[0], 2), h - side - 2, 4):
        for x in range(max(start[1], 2), w - side - 2, 4):
            if reference[y - 2 : y + side + 2, x - 2 : x + side + 2].max() < 0.05:
                return y, x
    raise AssertionError(f"no {side}x{side} background spot")


def test_identical_frame_passes_with_an_empty_mask(real_pair: tuple[np.ndarray, np.ndarray, list]) -> None:
    reference, _, _ = real_pair
    result = baseline(reference, reference.copy(), BaselineParams())
    assert result.verdict == "pass" and result.score == 0.0
    assert result.mask_hw.shape == reference.shape and result.mask_hw.dtype == bool
    assert not result.mask_hw.any()


@pytest.mark.parametrize("params", [BaselineParams(), BaselineParams(0.5, 1, 20), BaselineParams(0.2, 4, 50)])
def test_a_pasted_blob_fails_and_the_mask_covers_it(
    real_pair: tuple[np.ndarray, np.ndarray, list], params: BaselineParams
) -> None:
    reference, _, _ = real_pair
    y, x = background_spot(reference, 10)
    frame = reference.copy()
    frame[y : y + 10, x : x + 10] = 1.0
    result = baseline(reference, frame, params)
    assert result.verdict == "fail" and result.score == 100.0
    expected = np.zeros(reference.shape, bool)
    expected[y : y + 10, x : x + 10] = True
    np.testing.assert_array_equal(result.mask_hw, expected)


def test_regions_below_min_area_pass(real_pair: tuple[np.ndarray, np.ndarray, list]) -> None:
    reference, _, _ = real_pair
    y, x = background_spot(reference, 4)
    frame = reference.copy()
    frame[y : y + 4, x : x + 4] = 1.0  # 16 px < min_area 20
    result = baseline(reference, frame, BaselineParams())
    assert result.verdict == "pass" and result.score == 16.0 and not result.mask_hw.any()


def test_edge_jitter_is_opened_away(real_pair: tuple[np.ndarray, np.ndarray, list]) -> None:
    reference, _, _ = real_pair
    result = baseline(reference, np.roll(reference, 1, axis=1), BaselineParams(open_px=3, min_area=1))
    assert result.verdict == "pass" and not result.mask_hw.any()
    raw = baseline(reference, np.roll(reference, 1, axis=1), BaselineParams(open_px=1, min_area=1))
    assert raw.verdict == "fail", "without an opening, jitter is a defect"


def test_a_real_defective_frame_fails_with_highlights_on_its_boxes(
    real_pair: tuple[np.ndarray, np.ndarray, list],
) -> None:
    reference, frame, boxes = real_pair
    result = baseline(reference, align(reference, frame), BaselineParams())
    assert result.verdict == "fail"
    hit = [bool(result.mask_hw[y1 : y2 + 1, x1 : x2 + 1].any()) for x1, y1, x2, y2, _ in boxes]
    assert sum(hit) >= 0.8 * len(boxes)


@pytest.fixture(scope="module")
def tuning_pairs(deeppcb_items: list) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """256 px crops of real references: fails with pasted blobs of 5 to 14 px, passes with 1-px jitter."""
    from stream_service.quality.manifest import read_gray
    from stream_service.vision.soartc import to_unit

    pairs = []
    for n, chosen in enumerate(deeppcb_items[:4]):
        full = to_unit(read_gray(chosen.reference), dark_object=True)
        for k, (y0, x0) in enumerate(((0, 0), (384, 384), (0, 384))):
            reference = np.ascontiguousarray(full[y0 : y0 + 256, x0 : x0 + 256])
            side = 5 + (3 * n + k) % 10
            y, x = background_spot(reference, side)
            failing = reference.copy()
            failing[y : y + side, x : x + side] = 1.0
            pairs.append((reference, failing, True))
            pairs.append((reference, np.roll(reference, (k % 2) * 2 - 1, axis=k % 2), False))
    return pairs


def rates(pairs: list[tuple[np.ndarray, np.ndarray, bool]], params: BaselineParams) -> tuple[float, float]:
    """(miss rate, false-alarm rate) of the baseline with params on the pairs."""
    verdicts = np.array([baseline(r, f, params).verdict == "fail" for r, f, _ in pairs])
    labels = np.array([p[2] for p in pairs])
    return float((~verdicts[labels]).mean()), float(verdicts[~labels].mean())


def test_tune_baseline_keeps_misses_within_one_percent(tuning_pairs: list) -> None:
    params = tune_baseline(tuning_pairs)
    assert params.threshold in (0.2, 0.3, 0.4, 0.5) and params.open_px in (1, 2, 3, 4)
    miss, false_alarm = rates(tuning_pairs, params)
    assert miss <= 0.01
    assert false_alarm == 0.0, "blobs and opened-away jitter are separable"
    assert params.open_px >= 2 and params.min_area <= 25


@pytest.mark.parametrize("max_miss", [0.0, 0.1, 0.25])
def test_tune_baseline_honours_max_miss(tuning_pairs: list, max_miss: float) -> None:
    params = tune_baseline(tuning_pairs, max_miss=max_miss)
    miss, _ = rates(tuning_pairs, params)
    assert miss <= max_miss


def test_tune_baseline_without_fail_pairs_gives_the_defaults(tuning_pairs: list) -> None:
    passes = [p for p in tuning_pairs if not p[2]]
    assert tune_baseline(passes) == BaselineParams()
