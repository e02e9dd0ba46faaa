"""The classical method, so that users can see the gain on their own data.

|frame - reference| > threshold, a morphological opening with an ``open_px`` square, and connected
regions of at least ``min_area`` pixels: a frame fails when one is left. Its score is the largest
region's area (0 when none), and its highlight is every region kept. Tuned on the training split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.vision.arrays import F32
from stream_service.vision.tokens import open_mask


@dataclass(frozen=True)
class BaselineParams:
    threshold: float = 0.3
    open_px: int = 3
    min_area: int = 20


@dataclass(frozen=True)
class BaselineResult:
    verdict: str
    score: float
    mask_hw: npt.NDArray[np.bool_]


def baseline(reference_hw: F32, aligned_hw: F32, params: BaselineParams) -> BaselineResult:
    """Classical verdict of a registered frame (both (H, W) float32 in [0, 1])."""
    diff = (np.abs(aligned_hw - reference_hw) > params.threshold).astype(np.uint8)
    if params.open_px > 1:
        diff = open_mask(diff, params.open_px)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(diff, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    big = np.flatnonzero(areas >= params.min_area) + 1
    mask = np.isin(labels, big) if big.size else np.zeros(diff.shape, bool)
    largest = float(areas.max()) if areas.size else 0.0
    return BaselineResult("fail" if big.size else "pass", largest, mask)


def tune_baseline(
    pairs: Sequence[tuple[F32, F32, bool]],
    thresholds: Sequence[float] = (0.2, 0.3, 0.4, 0.5),
    opens: Sequence[int] = (1, 2, 3, 4),
    max_miss: float = 0.01,
) -> BaselineParams:
    """Parameters with the fewest false alarms at a miss rate <= max_miss on (reference, frame, is_fail) pairs.

    For each (threshold, opening) the minimum area is the largest that keeps misses within bounds.
    """
    labels = np.array([p[2] for p in pairs])
    best: tuple[float, BaselineParams] | None = None
    for t in thresholds:
        for k in opens:
            areas = np.array([baseline(r, f, BaselineParams(t, k, 1)).score for r, f, _ in pairs])
            fail_areas = np.sort(areas[labels])
            if fail_areas.size == 0:
                continue
            idx = int(np.floor(max_miss * fail_areas.size))
            min_area = max(int(fail_areas[idx]), 1)
            false_alarm = float((areas[~labels] >= min_area).mean()) if (~labels).any() else 0.0
            if best is None or false_alarm < best[0]:
                best = (false_alarm, BaselineParams(t, k, min_area))
    return best[1] if best is not None else BaselineParams()
