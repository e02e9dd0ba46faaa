"""Token features: what the ViT reads for every SOARTC block of a registered frame.

One token is one SOARTC block of ``block`` pixels (16 by default). Its channels, all in [0, 1]:

====  =====================================================================================
0-2   the SOARTC mosaic of the block (R = gain deviation, G = volume, B = shear), as u_c
3-14  the SOARTC mosaic of its four half-size sub-blocks (row-major TL, TR, BL, BR; R, G, B each)
15    the reference's mean in the block (copper density: where a defect can be at all)
16-19 the fraction of each sub-block covered by the *opened* difference mask
20-23 the same after a wider opening (``open_large_px``)
====  =====================================================================================

The opened difference mask is ``|frame - reference| > diff_threshold`` after a morphological opening
with a ``open_px`` square: binarisation jitter along copper edges is one or two pixels wide and
vanishes, while opens, shorts, bites, spurs, spurious copper and pin-holes survive. Residual
registration error leaves bands as wide as the error along whole edges; the wider opening removes
those too and keeps the compact defects, and the model weighs the two. The ``open_px`` mask is also
what the highlight draws, pixel by pixel, inside the tokens the model keeps.

Everything here is pure: arrays in, arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.errors import FrameShapeError, InputError
from stream_service.vision.arrays import F32, U8
from stream_service.vision.refinement import LOCAL_MAX_PX
from stream_service.vision.soartc import (
    Calibration,
    Device,
    SoartcKernel,
    Variant,
    dark_blocks,
    deviations,
    grid_shape,
    soartc_metrics,
)

N_CHANNELS = 24
CHANNEL_NAMES: tuple[str, ...] = (
    "R",
    "G",
    "B",
    *(f"{corner}.{c}" for corner in ("tl", "tr", "bl", "br") for c in "RGB"),
    "ref_mean",
    *(f"{corner}.open_diff" for corner in ("tl", "tr", "bl", "br")),
    *(f"{corner}.open_diff_large" for corner in ("tl", "tr", "bl", "br")),
)


# Constants of 1 before calibration (calibrate_spec in training computes the real ones).
UNCALIBRATED = Calibration((1.0, 1.0, 1.0))


@dataclass(frozen=True)
class FeatureSpec:
    """The feature definition a model was trained with; stored in (and loaded from) its model card."""

    block: int = 16
    variant: Variant = "v1.1"
    calibration: Calibration = UNCALIBRATED
    sub_calibration: Calibration = UNCALIBRATED
    diff_threshold: float = 0.3
    open_px: int = 3
    open_large_px: int = 5
    # The front end: how a frame is registered to its reference (None: not recorded, the configured
    # method applies), and whether the pixels the warp moved in from outside the frame are replaced by
    # the reference's (never evidence).
    registration: Literal["translation", "affine", "none"] | None = None
    valid_region: bool = False
    # Edge-jitter tolerance in pixels (``forgive_jitter``): 0 compares pixel to pixel. The highlight's
    # pixel masks may use another (None: the same); they are not model inputs, so it needs no retraining.
    tolerance_px: int = 0
    highlight_tolerance_px: int | None = None
    # Local refinement of the registration (``refinement.refine_local``): tiles shifted by up to this many
    # pixels where one warp for the whole frame leaves a locally distorted board misaligned; 0: none.
    local_px: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.local_px <= LOCAL_MAX_PX:
            raise InputError(f"feature local_px: expected 0 to {LOCAL_MAX_PX}, found {self.local_px}")
        if self.tolerance_px not in (0, 1, 2):
            raise InputError(f"feature tolerance_px: expected 0, 1 or 2, found {self.tolerance_px}")
        if self.highlight_tolerance_px not in (None, 0, 1, 2):
            raise InputError(
                f"feature highlight_tolerance_px: expected none, 0, 1 or 2, found {self.highlight_tolerance_px}"
            )
        if self.block not in (8, 16):
            raise InputError(f"feature block size: expected 8 or 16 (sub-blocks of 4 or 8), found {self.block}")
        if not 0.0 < self.diff_threshold < 1.0:
            raise InputError(f"feature diff_threshold: expected a value in (0, 1), found {self.diff_threshold}")
        if not 1 <= self.open_px < self.open_large_px:
            raise InputError(
                f"feature openings: expected 1 <= open_px < open_large_px, found {self.open_px}, {self.open_large_px}"
            )

    @property
    def highlight_tolerance(self) -> int:
        return self.tolerance_px if self.highlight_tolerance_px is None else self.highlight_tolerance_px

    @property
    def sub_block(self) -> int:
        return self.block // 2


@dataclass(frozen=True)
class TokenFeatures:
    """Features of one registered frame.

    tokens_hwc: (H // block, W // block, N_CHANNELS) float32 in [0, 1];
    open_diff_hw: (H, W) uint8, 1 where the opened difference mask is set;
    diff_hw: (H, W) uint8, 1 where |frame - reference| > diff_threshold (before opening).
    """

    tokens_hwc: F32
    open_diff_hw: U8
    diff_hw: U8


def _block_means(image_hw: npt.NDArray[np.floating], block: int) -> F32:
    """Means of whole ``block`` x ``block`` blocks (the remainder cropped), float32.

    An area resize by a whole factor is exactly the block mean (OpenCV's fast path: one sum per block
    times 1/block^2), 5x faster than NumPy's reduction over a reshaped view at 1080p.
    """
    h, w = grid_shape(image_hw.shape, block)
    crop = np.asarray(image_hw[: h * block, : w * block], np.float32)
    return np.asarray(cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA), np.float32).reshape(h, w)


def _unit(e_hw3: F32, calibration: Calibration) -> F32:
    scale = np.asarray(calibration.constants, np.float32) / np.float32(calibration.gain)
    return np.clip(e_hw3 / scale, 0.0, 1.0).astype(np.float32)


def _split_subblocks(sub_hwc: F32, h: int, w: int) -> F32:
    """(2h, 2w, C) sub-block grid -> (h, w, 4 * C), sub-blocks row-major (TL, TR, BL, BR)."""
    c = sub_hwc.shape[2]
    grid = sub_hwc[: 2 * h, : 2 * w].reshape(h, 2, w, 2, c).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(grid.reshape(h, w, 4 * c))


def open_mask(mask_hw: U8, px: int) -> U8:
    """Morphological opening of a uint8 mask with a ``px`` square, not moved for any px (odd or even).

    cv2.morphologyEx(MORPH_OPEN) erodes and dilates with the same anchor, which moves the result by
    one pixel down and right when px is even; dilating with the reflected anchor undoes the erosion's shift.
    """
    kernel = np.ones((px, px), np.uint8)
    eroded = cv2.erode(mask_hw, kernel)
    back = px - 1 - px // 2
    return np.asarray(cv2.dilate(eroded, kernel, anchor=(back, back)), np.uint8)


def forgive_jitter(reference_hw: F32, frame_hw: F32, px: int) -> F32:
    """The registered frame as the features see it: what a shift of up to ``px`` pixels explains is forgiven.

    Each frame pixel is compared with the range of the reference within ``px`` pixels (its erosion and
    dilation by a (2 px + 1) square); only what lies outside that range is kept, added to the reference
    value. A copper edge that moved by a pixel, or was etched or grown by one, stays inside the range and
    leaves no difference. A pin-hole, a spur or a short stays whole wherever the copper (or the gap) around
    it is wider than ``px``, and loses at most ``px`` pixels where it touches an edge. ``px`` = 0 returns
    the frame unchanged.
    """
    if px == 0:
        return frame_hw
    kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    low, high = cv2.erode(reference_hw, kernel), cv2.dilate(reference_hw, kernel)
    return np.asarray(reference_hw + (frame_hw - np.clip(frame_hw, low, high)), np.float32)


def difference_masks(reference_hw: F32, frame_hw: F32, spec: FeatureSpec) -> tuple[U8, U8]:
    """(diff_hw, open_diff_hw) uint8 0/1 masks of a registered frame against its reference."""
    diff = (cv2.absdiff(frame_hw, reference_hw) > spec.diff_threshold).astype(np.uint8)
    return diff, open_mask(diff, spec.open_px)


def raw_deviations(reference_hw: F32, frame_hw: F32, block: int, variant: Variant) -> F32:
    """(h, w, 3) float32 SOARTC deviation scores at one block size (for calibration and features)."""
    beta, rho, y3 = soartc_metrics(reference_hw, frame_hw, block, variant)
    return deviations(beta, rho, y3, dark_blocks(reference_hw, block))


def token_features(
    reference_hw: F32,
    frame_hw: F32,
    spec: FeatureSpec,
    kernels: tuple[SoartcKernel, SoartcKernel] | None = None,
) -> TokenFeatures:
    """Token features of a registered frame (both (H, W) float32 in [0, 1], polarity applied), with the
    spec's jitter tolerance (``forgive_jitter``) applied first; the returned pixel masks (what the highlight
    draws) use the spec's ``highlight_tolerance``.

    ``kernels`` are SOARTC kernels bound to this reference at (block, sub-block) size, on the CPU or
    the GPU (see ``feature_kernels``); without them the CPU function is used. The frame must be at
    least one block in each direction; the remainder past the last whole block is cropped, as in SOARTC.
    """
    if reference_hw.shape != frame_hw.shape:
        raise FrameShapeError(
            f"token features frame shape: expected the reference's {reference_hw.shape}, found {frame_hw.shape}"
        )
    h, w = grid_shape(reference_hw.shape, spec.block)
    if h == 0 or w == 0:
        raise FrameShapeError(
            f"token features frame shape: expected at least {spec.block}x{spec.block}, found {reference_hw.shape}"
        )
    seen = forgive_jitter(reference_hw, frame_hw, spec.tolerance_px)
    tokens = np.empty((h, w, N_CHANNELS), np.float32)
    if kernels is None:
        e_block = raw_deviations(reference_hw, seen, spec.block, spec.variant)
        e_sub = raw_deviations(reference_hw, seen, spec.sub_block, spec.variant)
    else:
        e_block, e_sub = kernels[0].deviations(seen), kernels[1].deviations(seen)
    tokens[..., 0:3] = _unit(e_block, spec.calibration)
    sub = _unit(e_sub, spec.sub_calibration)
    tokens[..., 3:15] = _split_subblocks(sub, h, w)
    tokens[..., 15] = _block_means(reference_hw, spec.block)
    diff, opened = difference_masks(reference_hw, seen, spec)
    tokens[..., 16:20] = _split_subblocks(_block_means(opened.astype(np.float32), spec.sub_block)[..., None], h, w)
    large = open_mask(opened, spec.open_large_px)
    tokens[..., 20:24] = _split_subblocks(_block_means(large.astype(np.float32), spec.sub_block)[..., None], h, w)
    if spec.highlight_tolerance != spec.tolerance_px:
        diff, opened = difference_masks(
            reference_hw, forgive_jitter(reference_hw, frame_hw, spec.highlight_tolerance), spec
        )
    return TokenFeatures(tokens, opened, diff)


def feature_kernels(reference_hw: F32, spec: FeatureSpec, device: Device = "auto") -> tuple[SoartcKernel, SoartcKernel]:
    """SOARTC kernels bound to a reference at the spec's block and sub-block sizes, on ``device``."""
    return (
        SoartcKernel(reference_hw, spec.block, spec.variant, device),
        SoartcKernel(reference_hw, spec.sub_block, spec.variant, device),
    )
