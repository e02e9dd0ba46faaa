"""The highlight: what people are shown, where the ViT's attention and the SOARTC magnitude are both high.

Raw SOARTC lights up every bit of edge jitter and registration error; the class token's attention
(trained to point at defects) is the filter. A token is kept when
- a window over it was judged a fail (its fail probability >= the threshold),
- its attention in such a window, relative to uniform (attention * tokens per window), is >= ``attention``,
- its SOARTC magnitude (the largest mosaic channel of the block or its sub-blocks) is >= ``magnitude``.
Inside kept tokens the mask is the opened difference (defect pixels, edge jitter removed), or the raw
difference where opening left nothing. Regions are the connected parts of that mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.soartc import F32, U8
from stream_service.windows import WindowLayout

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


def token_relevance(layout: WindowLayout, probs_n: F32, attention_ngg: F32, threshold: float) -> F32:
    """(h, w) relative attention (1 = uniform) of each token in the windows judged fail; 0 elsewhere."""
    tokens = float(layout.size * layout.size)
    gated = attention_ngg * tokens * (probs_n >= threshold)[:, None, None]
    return layout.paste_max(gated.astype(np.float32))


def highlight(
    tokens_hwc: F32,
    relevance_hw: F32,
    open_diff_hw: U8,
    diff_hw: U8,
    token_score_hw: F32,
    block: int,
    attention: float,
    magnitude: float,
) -> HighlightResult:
    """Filter the SOARTC evidence by attention; see the module docstring. token_score_hw scores regions."""
    magnitude_hw = tokens_hwc[..., MAGNITUDE_CHANNELS].max(axis=2)
    keep = (relevance_hw >= attention) & (magnitude_hw >= magnitude) & (relevance_hw > 0)
    h, w = keep.shape
    shape = open_diff_hw.shape
    mask = np.zeros(shape, bool)
    if keep.any():
        kept_px = np.zeros(shape, bool)
        kept_px[: h * block, : w * block] = np.repeat(np.repeat(keep, block, axis=0), block, axis=1)
        opened = kept_px & (open_diff_hw > 0)
        # Tokens where opening removed everything (a one-pixel-wide open, say) show their raw difference.
        has_open = opened[: h * block, : w * block].reshape(h, block, w, block).any(axis=(1, 3))
        bare = np.zeros(shape, bool)
        bare[: h * block, : w * block] = np.repeat(np.repeat(keep & ~has_open, block, axis=0), block, axis=1)
        mask = opened | (bare & (diff_hw > 0))
    return HighlightResult(keep, mask, tuple(regions(mask, token_score_hw, block)))


def regions(mask_hw: npt.NDArray[np.bool_], token_score_hw: F32, block: int) -> list[Region]:
    """Connected regions of a pixel mask (pieces closer than MERGE_PX joined), largest first."""
    if not mask_hw.any():
        return []
    merged = cv2.dilate(mask_hw.astype(np.uint8), np.ones((MERGE_PX, MERGE_PX), np.uint8))
    count, labels, _, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
    out: list[Region] = []
    for k in range(1, count):
        part = (labels == k) & mask_hw
        ys, xs = np.nonzero(part)
        if ys.size == 0:
            continue
        rows = np.clip(ys // block, 0, token_score_hw.shape[0] - 1)
        cols = np.clip(xs // block, 0, token_score_hw.shape[1] - 1)
        score = float(token_score_hw[rows, cols].max())
        out.append(Region(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()), score, int(ys.size)))
    out.sort(key=lambda r: r.area, reverse=True)
    return out


def overlay(frame_hw: U8, mask_hw: npt.NDArray[np.bool_], found: tuple[Region, ...], failed: bool) -> U8:
    """(H, W, 3) uint8 BGR picture for people: the frame, highlighted pixels in red, regions boxed."""
    image = cv2.cvtColor(frame_hw, cv2.COLOR_GRAY2BGR)
    image[mask_hw] = (0.35 * image[mask_hw] + 0.65 * np.array([0, 0, 255])).astype(np.uint8)
    colour = (0, 0, 255) if failed else (0, 180, 0)
    for r in found:
        cv2.rectangle(image, (r.x1 - 3, r.y1 - 3), (r.x2 + 3, r.y2 + 3), colour, 1)
    return np.asarray(image, np.uint8)
