"""Local refinement of a registration: what one global warp leaves of a locally distorted board.

A tested board can be stretched or bent against its template by a pixel or three in one region and not
in another (film, lamination, a flexed panel). One translation or affine warp for the whole frame then
leaves a band as wide as the residual along every edge of that region: hundreds of pixels of difference
on a good part, which no pixel opening removes when the band is 2-3 px wide.

``refine_local`` looks, in every ``tile`` x ``tile`` tile of the aligned frame, for the whole-pixel shift
of at most ``px`` pixels each way that lowers the tile's absolute difference to the reference the most.
A shift is kept only when it removes at least ``LOCAL_MIN_GAIN`` of the tile's difference and at least
``LOCAL_MIN_PIXELS`` pixels' worth: a defect is not a uniform offset of every edge in its tile, so no shift
explains it (moving one edge onto a spur or into a bite misaligns the tile's other edges), and a tile
without structure (bare copper, empty laminate) stays as it is. The tile shifts, placed at the tile
centres, are interpolated bilinearly into a smooth displacement field that resamples the frame, so the
refined frame has no seams where neighbouring tiles chose different shifts. Pixels the field would
fetch from outside the frame, or from its invalid region, are the reference's: never evidence.

Arrays in, arrays out: (H, W) float32 in [0, 1].
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.errors import FrameShapeError, InputError
from stream_service.vision.arrays import F32

LOCAL_TILE_PX = 32
# A shift must remove this share of its tile's difference, and this many pixels' worth of it.
LOCAL_MIN_GAIN = 0.3
LOCAL_MIN_PIXELS = 8.0
LOCAL_MAX_PX = 3


def local_shifts(reference_hw: F32, aligned_hw: F32, px: int, tile: int = LOCAL_TILE_PX) -> F32:
    """(ceil(H / tile), ceil(W / tile), 2) float32: each tile's (dx, dy), the refined frame's pixel (x, y)
    read from the aligned frame at (x + dx, y + dy); (0, 0) where no shift passes the gains."""
    h, w = reference_hw.shape
    grid = (-(-h // tile), -(-w // tile))
    padded = cv2.copyMakeBorder(aligned_hw, px, px, px, px, cv2.BORDER_REPLICATE)
    # Tiles past the frame's last whole tile are padded with zero difference, so every tile's cost is a
    # sum over its own pixels only (an area resize of a whole multiple is exactly the tile mean).
    canvas = np.zeros((grid[0] * tile, grid[1] * tile), np.float32)
    offsets = [(dx, dy) for dy in range(-px, px + 1) for dx in range(-px, px + 1)]
    costs = np.empty((len(offsets), *grid), np.float32)
    for k, (dx, dy) in enumerate(offsets):
        canvas[:h, :w] = cv2.absdiff(padded[px + dy : px + dy + h, px + dx : px + dx + w], reference_hw)
        costs[k] = cv2.resize(canvas, (grid[1], grid[0]), interpolation=cv2.INTER_AREA) * np.float32(tile * tile)
    steps = np.array([abs(dx) + abs(dy) for dx, dy in offsets], np.float32)
    # Among equal costs the smallest shift wins (the order of offsets alone would favour the top left).
    best = np.argmin(costs + steps[:, None, None] * np.float32(1e-4), axis=0)
    still = costs[offsets.index((0, 0))]
    gain = still - np.take_along_axis(costs, best[None], axis=0)[0]
    keep = (gain >= LOCAL_MIN_GAIN * still) & (gain >= LOCAL_MIN_PIXELS)
    chosen = np.asarray(offsets, np.float32)[best]
    return np.where(keep[..., None], chosen, np.float32(0.0)).astype(np.float32)


def refine_local(
    reference_hw: F32,
    aligned_hw: F32,
    px: int,
    invalid_hw: npt.NDArray[np.bool_] | None = None,
    tile: int = LOCAL_TILE_PX,
) -> F32:
    """The aligned frame resampled by the smooth field of its tiles' local shifts (``local_shifts``);
    the frame itself when no tile moves. ``invalid_hw``: pixels of the aligned frame that are no
    evidence (``registration.invalid_region``); whatever the field fetches from them, or from outside
    the frame, is the reference's."""
    if reference_hw.shape != aligned_hw.shape:
        raise FrameShapeError(
            f"local refinement frame shape: expected the reference's {reference_hw.shape}, found {aligned_hw.shape}"
        )
    if not 0 <= px <= LOCAL_MAX_PX:
        raise InputError(f"local refinement px: expected 0 to {LOCAL_MAX_PX}, found {px}")
    if px == 0:
        return aligned_hw
    shifts = local_shifts(reference_hw, aligned_hw, px, tile)
    if not shifts.any():
        return aligned_hw
    h, w = reference_hw.shape
    grid_h, grid_w = shifts.shape[:2]
    # Tile centres sit at (i + 0.5) tile - 0.5: a bilinear resize to the padded canvas puts them there.
    field = cv2.resize(shifts, (grid_w * tile, grid_h * tile), interpolation=cv2.INTER_LINEAR)[:h, :w]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x, map_y = xs + field[..., 0], ys + field[..., 1]
    refined = cv2.remap(aligned_hw, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # Any bilinear tap outside the frame or on an invalid pixel makes the pixel no evidence.
    bad = np.zeros((h, w), np.float32) if invalid_hw is None else invalid_hw.astype(np.float32)
    fetched = cv2.remap(bad, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=1.0)
    lost = fetched > 1e-3
    if invalid_hw is not None:
        lost |= invalid_hw
    return np.asarray(np.where(lost, reference_hw, refined), np.float32)
