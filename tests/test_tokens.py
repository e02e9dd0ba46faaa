"""Token features: shapes and ranges on a real DeepPCB pair, drawn defects, sub-block order, spec errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stream_service.errors import FrameShapeError, InputError
from stream_service.vision.tokens import (
    CHANNEL_NAMES,
    N_CHANNELS,
    FeatureSpec,
    feature_kernels,
    forgive_jitter,
    open_mask,
    token_features,
)

CORNERS = ("tl", "tr", "bl", "br")
SPEC = FeatureSpec()
# Channels by name, so that channels added after these keep the tests meaningful.
SOARTC = [n for n, name in enumerate(CHANNEL_NAMES) if name.split(".")[-1] in ("R", "G", "B")]
OPEN_DIFF = [n for n, name in enumerate(CHANNEL_NAMES) if name.split(".")[-1].startswith("open_diff")]
DIFFERENCE = [n for n, name in enumerate(CHANNEL_NAMES) if name != "ref_mean"]


def channel(name: str) -> int:
    return CHANNEL_NAMES.index(name)


def find_spot(reference: np.ndarray, kind: str) -> tuple[int, int]:
    """(y, x) of a sub-block for a 6x6 blob at its offset (1, 1), in a token with some copper.

    "add": the sub-block and one pixel around it are background (so a 1-px roll keeps them so);
    "remove": the blob's 6x6 pixels are copper.
    """
    sub, block = SPEC.sub_block, SPEC.block
    for y in range(block, reference.shape[0] - block, sub):
        for x in range(block, reference.shape[1] - block, sub):
            ty, tx = y // block * block, x // block * block
            copper = reference[ty : ty + block, tx : tx + block].mean()
            if not 0.15 < copper < 0.85:
                continue
            if kind == "add" and reference[y - 1 : y + sub + 1, x - 1 : x + sub + 1].max() < 0.05:
                return y, x
            if kind == "remove" and reference[y + 1 : y + 7, x + 1 : x + 7].min() > 0.95:
                return y, x
    raise AssertionError(f"no sub-block for a {kind!r} blob in the reference")


def with_blob(image: np.ndarray, y: int, x: int, kind: str) -> np.ndarray:
    out = image.copy()
    out[y + 1 : y + 7, x + 1 : x + 7] = 1.0 if kind == "add" else 0.0
    return out


def test_shapes_dtypes_and_ranges_on_a_real_pair(real_pair: tuple[np.ndarray, np.ndarray, list]) -> None:
    reference, frame, _ = real_pair
    feats = token_features(reference, frame, SPEC)
    h, w = reference.shape[0] // SPEC.block, reference.shape[1] // SPEC.block
    assert feats.tokens_hwc.shape == (h, w, N_CHANNELS) == (40, 40, len(CHANNEL_NAMES))
    assert len(SOARTC) == 15 and len(OPEN_DIFF) >= 4
    assert feats.tokens_hwc.dtype == np.float32
    assert feats.tokens_hwc.min() >= 0.0 and feats.tokens_hwc.max() <= 1.0
    for mask in (feats.open_diff_hw, feats.diff_hw):
        assert mask.shape == reference.shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
    assert not (feats.open_diff_hw & ~feats.diff_hw.astype(bool)).any(), "opening only removes pixels"
    # A DeepPCB test image has defects: both masks and the SOARTC channels see something.
    assert feats.open_diff_hw.any() and feats.tokens_hwc[..., SOARTC].max() > 0
    ref_means = reference.reshape(h, SPEC.block, w, SPEC.block).mean(axis=(1, 3))
    np.testing.assert_allclose(feats.tokens_hwc[..., channel("ref_mean")], ref_means, atol=1e-6)
    sub = SPEC.sub_block
    opened = feats.open_diff_hw.astype(np.float64).reshape(h, 2, sub, w, 2, sub).mean(axis=(2, 5))
    for corner, (r, c) in zip(CORNERS, ((0, 0), (0, 1), (1, 0), (1, 1)), strict=True):
        np.testing.assert_allclose(feats.tokens_hwc[..., channel(f"{corner}.open_diff")], opened[:, r, :, c], atol=1e-6)


def test_identical_frame_gives_zero_difference_channels(real_pair: tuple[np.ndarray, np.ndarray, list]) -> None:
    reference, _, _ = real_pair
    feats = token_features(reference, reference.copy(), SPEC)
    assert not feats.tokens_hwc[..., DIFFERENCE].any()
    assert not feats.open_diff_hw.any() and not feats.diff_hw.any()
    assert feats.tokens_hwc[..., channel("ref_mean")].any()


# Spurious copper changes volume and shear, not gain; missing copper changes all three. The "add" blob
# sits in an all-background sub-block, a dark block at that level, where only shear can show.
@pytest.mark.parametrize(("kind", "lit", "sub_lit"), [("add", "GB", "B"), ("remove", "RGB", "RGB")])
def test_a_drawn_blob_lights_its_token_and_sub_block(
    real_pair: tuple[np.ndarray, np.ndarray, list], kind: str, lit: str, sub_lit: str
) -> None:
    reference, _, _ = real_pair
    y, x = find_spot(reference, kind)
    feats = token_features(reference, with_blob(reference, y, x, kind), SPEC)
    ty, tx = y // SPEC.block, x // SPEC.block
    corner = CORNERS[2 * ((y % SPEC.block) // SPEC.sub_block) + (x % SPEC.block) // SPEC.sub_block]
    token = feats.tokens_hwc[ty, tx]
    for c in "RGB":
        assert (token[channel(c)] > 0.05) == (c in lit), (c, token[channel(c)])
        assert (token[channel(f"{corner}.{c}")] > 0.05) == (c in sub_lit), (corner, c)
        for other in CORNERS:
            if other != corner:
                assert token[channel(f"{other}.{c}")] == 0.0, (other, c)
    assert token[channel(f"{corner}.open_diff")] == pytest.approx(36 / 64)
    for n in OPEN_DIFF:
        if not CHANNEL_NAMES[n].startswith(f"{corner}."):
            assert token[n] == 0.0, CHANNEL_NAMES[n]
    others = feats.tokens_hwc.copy()
    others[ty, tx] = 0.0
    others[..., channel("ref_mean")] = 0.0
    assert not others.any(), "only the blob's token differs"
    expected = np.zeros(reference.shape, np.uint8)
    expected[y + 1 : y + 7, x + 1 : x + 7] = 1
    np.testing.assert_array_equal(feats.open_diff_hw, expected)


@pytest.mark.parametrize(("axis", "shift"), [(0, 1), (0, -1), (1, 1), (1, -1)])
def test_one_pixel_edge_jitter_does_not_survive_the_opening(
    real_pair: tuple[np.ndarray, np.ndarray, list], axis: int, shift: int
) -> None:
    reference, _, _ = real_pair
    y, x = find_spot(reference, "add")
    jittered = np.roll(reference, shift, axis=axis)
    feats = token_features(reference, with_blob(jittered, y, x, "add"), SPEC)
    assert feats.diff_hw.sum() > 36 * 5, "the jitter shows in the raw difference"
    assert feats.tokens_hwc[..., SOARTC].astype(bool).sum() > 10, "and in SOARTC"
    expected = np.zeros(reference.shape, np.uint8)
    expected[y + 1 : y + 7, x + 1 : x + 7] = 1
    np.testing.assert_array_equal(feats.open_diff_hw, expected)
    lit = np.argwhere(feats.tokens_hwc[..., OPEN_DIFF].max(axis=2) > 0)
    np.testing.assert_array_equal(lit, [[y // SPEC.block, x // SPEC.block]])


TOLERANT = FeatureSpec(tolerance_px=1)


@pytest.mark.parametrize(("axis", "shift"), [(0, 1), (0, -1), (1, 1), (1, -1)])
def test_tolerance_forgives_one_pixel_jitter_in_every_channel_and_keeps_the_blob(
    real_pair: tuple[np.ndarray, np.ndarray, list], axis: int, shift: int
) -> None:
    reference, _, _ = real_pair
    y, x = find_spot(reference, "add")
    frame = with_blob(np.roll(reference, shift, axis=axis), y, x, "add")
    # The roll wraps the far edge round to the near one: that row or column is a real change.
    inner = (slice(2, -2), slice(2, -2))
    plain, tolerant = token_features(reference, frame, SPEC), token_features(reference, frame, TOLERANT)
    assert plain.diff_hw[inner].sum() > 36 * 5
    expected = np.zeros(reference.shape, np.uint8)
    expected[y + 1 : y + 7, x + 1 : x + 7] = 1
    np.testing.assert_array_equal(tolerant.diff_hw[inner], expected[inner])
    token_inner = (slice(1, -1), slice(1, -1))
    lit = np.argwhere(tolerant.tokens_hwc[token_inner][..., SOARTC].max(axis=2) > 0) + 1
    np.testing.assert_array_equal(lit, [[y // SPEC.block, x // SPEC.block]])


@pytest.mark.parametrize("px", [1, 2])
def test_tolerance_keeps_a_three_pixel_pin_hole_and_speck_whole(px: int) -> None:
    reference = np.zeros((64, 64), np.float32)
    reference[8:40, 8:40] = 1.0  # wide copper
    frame = reference.copy()
    frame[20:23, 20:23] = 0.0  # a pin-hole well inside it
    frame[50:53, 50:53] = 1.0  # a speck of copper on the empty board
    frame[8:40, 40] = 1.0  # the copper's right edge grown by one pixel
    seen = forgive_jitter(reference, frame, px)
    diff = np.abs(seen - reference) > 0.5
    expected = np.zeros(reference.shape, bool)
    expected[20:23, 20:23] = expected[50:53, 50:53] = True
    np.testing.assert_array_equal(diff, expected)
    np.testing.assert_allclose(seen[diff], frame[diff])
    assert seen.min() >= 0.0 and seen.max() <= 1.0


def test_the_highlight_masks_can_use_another_tolerance_than_the_tokens(
    real_pair: tuple[np.ndarray, np.ndarray, list],
) -> None:
    reference, frame, _ = real_pair
    split = token_features(reference, frame, FeatureSpec(tolerance_px=2, highlight_tolerance_px=1))
    verdict, shown = (
        token_features(reference, frame, FeatureSpec(tolerance_px=2)),
        token_features(reference, frame, TOLERANT),
    )
    np.testing.assert_array_equal(split.tokens_hwc, verdict.tokens_hwc)
    np.testing.assert_array_equal(split.open_diff_hw, shown.open_diff_hw)
    np.testing.assert_array_equal(split.diff_hw, shown.diff_hw)
    assert shown.diff_hw.sum() > verdict.diff_hw.sum(), "1 px forgives less than 2 px on a real pair"
    assert FeatureSpec(tolerance_px=2).highlight_tolerance == 2


def test_tolerance_zero_is_the_frame_itself(real_pair: tuple[np.ndarray, np.ndarray, list]) -> None:
    reference, frame, _ = real_pair
    assert forgive_jitter(reference, frame, 0) is frame
    np.testing.assert_array_equal(
        token_features(reference, frame, SPEC).tokens_hwc,
        token_features(reference, frame, FeatureSpec(tolerance_px=0)).tokens_hwc,
    )


def sub_block_pair(kind: str, corner: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A 32x32 (2x2 tokens) reference with copper in every sub-block, and a frame changed in one sub-block
    of token (1, 0): returns (reference, frame, (y, x) of that sub-block)."""
    sub = SPEC.sub_block
    pattern = np.zeros((sub, sub), np.float32)
    if kind == "add":
        pattern[:, :2] = 1.0  # a stripe; the blob goes on the background beside it
    else:
        pattern[:, :] = 1.0  # copper all over; the blob makes a hole in it
    reference = np.tile(pattern, (4, 4))
    k = CORNERS.index(corner)
    y, x = SPEC.block + (k // 2) * sub, (k % 2) * sub
    frame = reference.copy()
    if kind == "add":
        frame[y + 1 : y + 7, x + 2 : x + 8] = 1.0
    else:
        frame[y + 1 : y + 7, x + 1 : x + 7] = 0.0
    return reference, frame, (y, x)


@pytest.mark.parametrize("corner", CORNERS)
@pytest.mark.parametrize(("kind", "lit"), [("add", "GB"), ("remove", "RGB")])
def test_sub_block_channels_are_tl_tr_bl_br(corner: str, kind: str, lit: str) -> None:
    reference, frame, _ = sub_block_pair(kind, corner)
    feats = token_features(reference, frame, SPEC)
    assert feats.tokens_hwc.shape == (2, 2, N_CHANNELS)
    others = np.delete(feats.tokens_hwc.reshape(4, N_CHANNELS), 2, axis=0)  # token (1, 0) is index 2
    assert not others[:, DIFFERENCE].any()
    token = dict(zip(CHANNEL_NAMES, feats.tokens_hwc[1, 0], strict=True))
    lit_names = {f"{corner}.{c}" for c in lit} | set(lit)
    for name, value in token.items():
        if name == "ref_mean":
            continue
        if "open_diff" in name:  # checked below for this corner; zero in the others
            assert name.startswith(f"{corner}.") or value == 0.0, (name, value)
            continue
        assert (value > 0.01) == (name in lit_names), (name, value)
    assert token[f"{corner}.open_diff"] == pytest.approx(36 / 64)


def test_kernels_give_the_same_tokens_as_the_cpu_function(real_pair: tuple[np.ndarray, np.ndarray, list]) -> None:
    reference, frame, _ = real_pair
    plain = token_features(reference, frame, SPEC)
    bound = token_features(reference, frame, SPEC, feature_kernels(reference, SPEC, device="cpu"))
    np.testing.assert_array_equal(plain.tokens_hwc, bound.tokens_hwc)


def test_remainder_past_the_last_whole_block_is_cropped() -> None:
    rng = np.random.default_rng(0)
    reference = rng.random((40, 50), dtype=np.float32)
    feats = token_features(reference, reference[::-1].copy(), SPEC)
    assert feats.tokens_hwc.shape == (2, 3, N_CHANNELS)
    assert feats.open_diff_hw.shape == (40, 50)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"block": 4}, ("block size", "8 or 16", "found 4")),
        ({"block": 32}, ("block size", "found 32")),
        ({"diff_threshold": 0.0}, ("diff_threshold", "(0, 1)", "found 0.0")),
        ({"diff_threshold": 1.0}, ("diff_threshold", "found 1.0")),
        ({"diff_threshold": -0.2}, ("diff_threshold", "found -0.2")),
        ({"open_px": 0}, ("open_px", "expected", "found 0")),
        ({"tolerance_px": 3}, ("tolerance_px", "0, 1 or 2", "found 3")),
        ({"tolerance_px": -1}, ("tolerance_px", "found -1")),
        ({"highlight_tolerance_px": 3}, ("highlight_tolerance_px", "none, 0, 1 or 2", "found 3")),
    ],
)
def test_feature_spec_errors(kwargs: dict[str, float], words: tuple[str, ...]) -> None:
    with pytest.raises(InputError) as info:
        FeatureSpec(**kwargs)  # type: ignore[arg-type]
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("ref_shape", "frame_shape", "words"),
    [
        ((64, 64), (64, 48), ("expected the reference's (64, 64)", "found (64, 48)")),
        ((8, 64), (8, 64), ("at least 16x16", "found (8, 64)")),
    ],
)
def test_token_features_shape_errors(
    ref_shape: tuple[int, int], frame_shape: tuple[int, int], words: tuple[str, ...]
) -> None:
    with pytest.raises(FrameShapeError) as info:
        token_features(np.zeros(ref_shape, np.float32), np.zeros(frame_shape, np.float32), SPEC)
    for word in words:
        assert word in str(info.value)


def test_sub_block_of_the_spec() -> None:
    assert FeatureSpec(block=8).sub_block == 4
    assert FeatureSpec(block=16).sub_block == 8


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, (24, 20), elements=st.integers(0, 1)), st.integers(1, 5))
def test_open_mask_is_an_opening_that_never_moves_pixels(mask: np.ndarray, px: int) -> None:
    opened = open_mask(mask, px)
    assert opened.dtype == np.uint8 and opened.shape == mask.shape
    assert not (opened & ~mask.astype(bool)).any(), "an opening only removes pixels (even px included)"
    np.testing.assert_array_equal(open_mask(opened, px), opened)  # idempotent
    if px % 2:
        np.testing.assert_array_equal(opened, cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((px, px), np.uint8)))


@pytest.mark.parametrize("px", [1, 2, 3, 4, 5])
def test_open_mask_keeps_a_square_of_its_size_where_it_is(px: int) -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[5 : 5 + px, 6 : 6 + px] = 1
    mask[1, 1:4] = 1  # a 1-px line: gone for px >= 2
    expected = mask.copy()
    if px > 1:
        expected[1] = 0
    np.testing.assert_array_equal(open_mask(mask, px), expected)
