"""The highlight: what people are shown, where the ViT's attention and the SOARTC magnitude are both high.

Raw SOARTC lights up every bit of edge jitter and registration error; the class token's attention
(trained to point at defects) is the filter. A token is kept when
- a window over it was judged a fail (its fail probability >= the threshold),
- its attention in such a window, relative to uniform (attention * tokens per window), is >= ``attention``,
- its SOARTC magnitude (the largest mosaic channel of the block or its sub-blocks) is >= ``magnitude``.
Inside kept tokens the mask is the opened difference (edge jitter removed), keeping only the connected
pieces shaped like defects: residual registration error leaves bands a few pixels thick along whole
edges, so a piece whose long side exceeds ``max_elongation`` times its thickness (twice its largest
inscribed radius), or whose area is under ``min_area``, is not shown. Regions are the connected parts
of the mask. (On the validation boards a raw-difference fallback for kept tokens that opening emptied
added no box and cost highlight precision, so there is none.)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.vision.arrays import F32, U8
from stream_service.vision.windows import WindowLayout

MAGNITUDE_CHANNELS = slice(0, 15)
# Pieces of one defect closer than this (pixels) are reported as one region.
MERGE_PX = 9


@dataclass(frozen=True)
class Region:
    """A highlighted region in frame pixels: inclusive box corners, score in [0, 1], area in pixels."""

    x1: int
    y1: int
    x2: int
    y2: int
    score: float
    area: int


@dataclass(frozen=True)
class HighlightResult:
    """keep_hw: (h, w) bool kept tokens; mask_hw: (H, W) bool highlighted pixels; regions, largest first."""

    keep_hw: npt.NDArray[np.bool_]
    mask_hw: npt.NDArray[np.bool_]
    regions: tuple[Region, ...]


def _pixels(mask_hw: U8) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """(rows, cols) of a mask's nonzero pixels; cv2.findNonZero is about twice as fast as np.nonzero."""
    points = cv2.findNonZero(mask_hw)
    if points is None:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    xy = points.reshape(-1, 2).astype(np.intp)
    return xy[:, 1], xy[:, 0]


def token_relevance(layout: WindowLayout, probs_n: F32, attention_ngg: F32, threshold: float) -> F32:
    """(h, w) relative attention (1 = uniform) of each token in the windows judged fail; 0 elsewhere."""
    tokens = float(layout.size * layout.size)
    gated = attention_ngg * tokens * (probs_n >= threshold)[:, None, None]
    return layout.paste_max(gated.astype(np.float32))


def _extent(piece: npt.NDArray[np.intp], coords: npt.NDArray[np.intp], count: int) -> npt.NDArray[np.int32]:
    """Per piece: max - min + 1 of the coordinates of its pixels (0 for a piece without pixels)."""
    low, high = np.full(count, np.iinfo(np.intp).max, np.intp), np.full(count, -1, np.intp)
    np.minimum.at(low, piece, coords)
    np.maximum.at(high, piece, coords)
    return np.where(high >= 0, high - low + 1, 0).astype(np.int32)


@dataclass(frozen=True)
class Pieces:
    """Connected pieces of an opened difference mask and their shape, computed once per frame.

    labels_hw: (H, W) int32 piece index (0 = none); thickness, long_side, area: per piece, index 0 unused.
    """

    labels_hw: npt.NDArray[np.int32]
    thickness: F32
    long_side: npt.NDArray[np.int32]
    area: npt.NDArray[np.int32]

    @classmethod
    def of(cls, open_diff_hw: U8) -> Pieces:
        # Labels alone, then the shape of each piece from the mask's own pixels: OpenCV's statistics pass
        # scans the whole frame again (5 ms more at 1080p for a mask of a few thousand pixels).
        count, labels = cv2.connectedComponents(open_diff_hw, connectivity=8, ltype=cv2.CV_32S)
        radius = np.zeros(count, np.float32)
        long_side, area = np.zeros(count, np.int32), np.zeros(count, np.int32)
        if count > 1:
            dist = cv2.distanceTransform(open_diff_hw, cv2.DIST_L2, 3)
            ys, xs = _pixels(open_diff_hw)  # ufunc.at is slow per element: visit only the mask's pixels
            piece = np.asarray(labels[ys, xs], np.intp)
            np.maximum.at(radius, piece, dist[ys, xs])
            area = np.bincount(piece, minlength=count).astype(np.int32)
            long_side = np.maximum(_extent(piece, xs, count), _extent(piece, ys, count))
            long_side[0] = area[0] = 0
        return cls(np.asarray(labels, np.int32), 2 * radius, long_side, area)

    @classmethod
    def none(cls, shape: tuple[int, ...]) -> Pieces:
        """No pieces: for frames where no window failed, so nothing can be highlighted anyway."""
        zero = np.zeros(1, np.int32)
        return cls(np.zeros(shape[:2], np.int32), np.zeros(1, np.float32), zero, zero)

    def defect_like(self, max_elongation: float, min_area: int) -> npt.NDArray[np.bool_]:
        """Per piece: True when compact enough and large enough to be shown (index 0 is False)."""
        ok = (self.long_side <= max_elongation * np.maximum(self.thickness, 1.0)) & (self.area >= min_area)
        ok[0] = False
        return np.asarray(ok, bool)


def highlight_mask(
    tokens_hwc: F32,
    relevance_hw: F32,
    pieces: Pieces,
    block: int,
    attention: float,
    magnitude: float,
    max_elongation: float,
    min_area: int,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(kept tokens (h, w), highlighted pixels (H, W)): the filter of the module docstring, no regions."""
    magnitude_hw = tokens_hwc[..., MAGNITUDE_CHANNELS].max(axis=2)
    keep = (relevance_hw >= attention) & (magnitude_hw >= magnitude) & (relevance_hw > 0)
    h, w = keep.shape
    shape = pieces.labels_hw.shape
    if not keep.any():
        return keep, np.zeros(shape, bool)
    kept_px = np.zeros(shape, bool)
    kept_px[: h * block, : w * block] = np.repeat(np.repeat(keep, block, axis=0), block, axis=1)
    return keep, kept_px & pieces.defect_like(max_elongation, min_area)[pieces.labels_hw]


def highlight(
    tokens_hwc: F32,
    relevance_hw: F32,
    pieces: Pieces,
    token_score_hw: F32,
    block: int,
    attention: float,
    magnitude: float,
    max_elongation: float,
    min_area: int,
) -> HighlightResult:
    """The filtered highlight and its regions; ``pieces`` is ``Pieces.of(open_diff_hw)`` of the frame.

    token_score_hw (h, w) scores the regions (the highest score of a window over their pixels).
    """
    keep, mask = highlight_mask(tokens_hwc, relevance_hw, pieces, block, attention, magnitude, max_elongation, min_area)
    return HighlightResult(keep, mask, tuple(regions(mask, token_score_hw, block)))


def regions(mask_hw: npt.NDArray[np.bool_], token_score_hw: F32, block: int) -> list[Region]:
    """Connected regions of a pixel mask (pieces closer than MERGE_PX joined), largest first."""
    if not mask_hw.any():
        return []
    merged = cv2.dilate(mask_hw.astype(np.uint8), np.ones((MERGE_PX, MERGE_PX), np.uint8))
    count, labels = cv2.connectedComponents(merged, connectivity=8, ltype=cv2.CV_32S)
    ys, xs = _pixels(mask_hw.view(np.uint8))
    lab = np.asarray(labels[ys, xs], np.intp)
    rows = np.clip(ys // block, 0, token_score_hw.shape[0] - 1)
    cols = np.clip(xs // block, 0, token_score_hw.shape[1] - 1)
    big = np.iinfo(np.int64).max
    x1, y1 = np.full(count, big, np.int64), np.full(count, big, np.int64)
    x2, y2 = np.full(count, -1, np.int64), np.full(count, -1, np.int64)
    score = np.zeros(count, np.float32)
    np.minimum.at(x1, lab, xs)
    np.minimum.at(y1, lab, ys)
    np.maximum.at(x2, lab, xs)
    np.maximum.at(y2, lab, ys)
    np.maximum.at(score, lab, token_score_hw[rows, cols])
    area = np.bincount(lab, minlength=count)
    out = [
        Region(int(x1[k]), int(y1[k]), int(x2[k]), int(y2[k]), float(score[k]), int(area[k]))
        for k in range(1, count)
        if area[k] > 0
    ]
    out.sort(key=lambda r: r.area, reverse=True)
    return out


def overlay(
    frame_hw: U8,
    mask_hw: npt.NDArray[np.bool_],
    found: tuple[Region, ...],
    failed: bool,
    color_bgr: tuple[int, int, int] = (0, 0, 255),
    alpha: float = 0.65,
    draw_boxes: bool = True,
    box_thickness: int = 1,
) -> U8:
    """(H, W, 3) uint8 BGR picture for people: the frame, highlighted pixels tinted with ``color_bgr``
    at opacity ``alpha``, and (``draw_boxes``) each region boxed, in that colour on a fail and green on a pass.
    """
    image = cv2.cvtColor(frame_hw, cv2.COLOR_GRAY2BGR)
    tint = np.array(color_bgr, np.float32)
    # Visit only the highlighted pixels: a boolean index scans the whole frame twice (8 ms at 1080p).
    ys, xs = _pixels(np.ascontiguousarray(mask_hw).view(np.uint8))
    image[ys, xs] = ((1.0 - alpha) * image[ys, xs] + alpha * tint).astype(np.uint8)
    if draw_boxes:
        colour = color_bgr if failed else (0, 180, 0)
        for r in found:
            cv2.rectangle(image, (r.x1 - 3, r.y1 - 3), (r.x2 + 3, r.y2 + 3), colour, box_thickness)
    return np.asarray(image, np.uint8)


def translate(image: npt.NDArray[np.uint8], ox: int, oy: int) -> npt.NDArray[np.uint8]:
    """``image`` ((H, W) or (H, W, 3) uint8) moved by whole pixels: pixel (x, y) goes to (x + ox, y + oy);
    what moves in from outside is black. Moves a picture drawn on the registered frame into the
    captured frame's pixels, where the verdict's regions are (``stages.inference.to_frame_regions``)."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    if abs(ox) >= w or abs(oy) >= h:
        return out
    src_y, dst_y = slice(max(0, -oy), h - max(0, oy)), slice(max(0, oy), h - max(0, -oy))
    src_x, dst_x = slice(max(0, -ox), w - max(0, ox)), slice(max(0, ox), w - max(0, -ox))
    out[dst_y, dst_x] = image[src_y, src_x]
    return out
