"""SOARTC against an independent float64 per-block loop written from SOARTC.md, and its properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_service.errors import DeviceError, FrameShapeError, InputError
from stream_service.vision.soartc import (
    Calibration,
    SoartcKernel,
    calibrate,
    cuda_available,
    dark_blocks,
    deviations,
    mosaic,
    resolve_device,
    soartc_metrics,
    to_unit,
)

EPS_DARK = 1e-4
RHO_MAX = 10.0


def reference_loop(x_img: np.ndarray, y_img: np.ndarray, b: int, variant: str) -> tuple[np.ndarray, ...]:
    """SOARTC.md, literally: a plain float64 loop over blocks."""
    h, w = x_img.shape[0] // b, x_img.shape[1] // b
    out = np.zeros((3, h, w))
    n = b * b
    for i in range(h):
        for j in range(w):
            x = x_img[i * b : (i + 1) * b, j * b : (j + 1) * b].astype(np.float64).ravel()
            y = y_img[i * b : (i + 1) * b, j * b : (j + 1) * b].astype(np.float64).ravel()
            sxx, syy, sxy = x @ x, y @ y, x @ y
            if sxx / n <= EPS_DARK:
                out[:, i, j] = 1.0, 1.0, np.abs(y - x).mean()
                continue
            beta = sxy / sxx
            if variant == "v1.1":
                rho = RHO_MAX if abs(sxy) <= 1e-12 else max(math.sqrt(sxx * syy) / abs(sxy), 1.0)
                s = np.sign(beta) * math.sqrt(syy / sxx)
            elif variant == "v1":
                vol = abs(beta) * np.abs(x).sum()
                rho = np.abs(y).sum() / vol if vol > 1e-12 else RHO_MAX
                s = np.sign(beta) * np.abs(y).sum() / np.abs(x).sum()
            else:
                beta = 1.0
                rho = (syy / n + 1e-4) / (sxx / n + 1e-4)
                s = rho
            out[:, i, j] = beta, min(rho, RHO_MAX), np.abs(y - s * x).mean()
    return out[0], out[1], out[2]


def random_pair(rng: np.random.Generator, h: int, w: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Random reference and frame with dark, constant and copied blocks sprinkled in."""
    ref = rng.random((h, w), dtype=np.float32)
    frame = np.clip(ref + rng.normal(0, 0.2, (h, w)).astype(np.float32), 0, 1)
    gh, gw = h // b, w // b
    for _ in range(max(1, gh * gw // 4)):
        i, j = rng.integers(gh), rng.integers(gw)
        sl = np.s_[i * b : (i + 1) * b, j * b : (j + 1) * b]
        kind = rng.integers(4)
        if kind == 0:
            ref[sl] = 0.0  # dark reference block: something appearing on empty background
        elif kind == 1:
            ref[sl] = rng.random()  # constant blocks
            frame[sl] = rng.random()
        elif kind == 2:
            frame[sl] = ref[sl]  # identical block
        else:
            frame[sl] = 0.0  # copper vanished
    return ref, frame


@pytest.mark.parametrize("variant", ["v1.1", "v1", "soart2"])
@pytest.mark.parametrize("block", [4, 8, 16])
def test_matches_float64_loop_on_random_sizes(variant: str, block: int) -> None:
    rng = np.random.default_rng(block * 7 + len(variant))
    for _ in range(4):
        h, w = int(rng.integers(block, 9 * block)), int(rng.integers(block, 9 * block))
        ref, frame = random_pair(rng, h, w, block)
        got = soartc_metrics(ref, frame, block, variant)  # type: ignore[arg-type]
        want = reference_loop(ref, frame, block, variant)
        for g, ww in zip(got, want, strict=True):
            assert g.dtype == np.float32
            assert g.shape == (h // block, w // block)
            np.testing.assert_allclose(g, ww, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(8, 70),
    w=st.integers(8, 70),
    seed=st.integers(0, 2**32 - 1),
    variant=st.sampled_from(["v1.1", "v1", "soart2"]),
)
def test_property_matches_loop_and_is_finite(h: int, w: int, seed: int, variant: str) -> None:
    rng = np.random.default_rng(seed)
    ref, frame = random_pair(rng, h, w, 8)
    got = soartc_metrics(ref, frame, 8, variant)  # type: ignore[arg-type]
    want = reference_loop(ref, frame, 8, variant)
    for g, ww in zip(got, want, strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, ww, rtol=1e-5, atol=1e-6)


def test_identical_blocks_give_unit_metrics_and_black_mosaic() -> None:
    ref = np.random.default_rng(1).random((64, 96), dtype=np.float32)
    beta, rho, y3 = soartc_metrics(ref, ref.copy())
    np.testing.assert_allclose(beta, 1.0, rtol=1e-6)
    np.testing.assert_allclose(rho, 1.0, rtol=1e-6)
    np.testing.assert_allclose(y3, 0.0, atol=1e-6)
    e = deviations(beta, rho, y3, dark_blocks(ref))
    assert not mosaic(e, Calibration((0.1, 0.1, 0.1))).any()


@pytest.mark.parametrize("gain", [0.5, 0.8, 1.25, 1.9])
def test_uniform_gain_goes_to_red_only_and_median_cancels_it(gain: float) -> None:
    ref = np.random.default_rng(2).uniform(0.2, 0.5, (64, 64)).astype(np.float32)
    frame = (ref * np.float32(gain)).astype(np.float32)
    beta, rho, y3 = soartc_metrics(ref, frame)
    np.testing.assert_allclose(beta, gain, rtol=1e-5)
    np.testing.assert_allclose(rho, 1.0, rtol=1e-5)
    np.testing.assert_allclose(y3, 0.0, atol=1e-5)
    e = deviations(beta, rho, y3, dark_blocks(ref))
    np.testing.assert_allclose(e, 0.0, atol=1e-4)
    assert not mosaic(e, Calibration((0.05, 0.05, 0.05))).any()


def test_rho_is_symmetric() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(0.1, 1, (48, 48)).astype(np.float32)
    y = rng.uniform(0.1, 1, (48, 48)).astype(np.float32)
    np.testing.assert_allclose(soartc_metrics(x, y)[1], soartc_metrics(y, x)[1], rtol=1e-5)


def test_dark_reference_block_guard_sees_new_copper() -> None:
    ref = np.zeros((16, 16), np.float32)
    ref[:8, :8] = 0.7  # one lit block, three dark ones
    frame = ref.copy()
    frame[8:, 8:] = 0.5  # copper appears on an empty background
    beta, rho, y3 = soartc_metrics(ref, frame)
    assert beta[1, 1] == 1.0 and rho[1, 1] == 1.0
    assert y3[1, 1] == pytest.approx(0.5)
    assert y3[0, 1] == 0.0 and y3[1, 0] == 0.0


def test_rho_capped_when_cross_moment_vanishes() -> None:
    ref = np.zeros((8, 8), np.float32)
    ref[:4] = 1.0
    frame = np.zeros((8, 8), np.float32)
    frame[4:] = 1.0  # orthogonal to the reference: Sxy = 0
    beta, rho, _ = soartc_metrics(ref, frame)
    assert beta[0, 0] == 0.0 and rho[0, 0] == RHO_MAX


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_never_leak(bad: float) -> None:
    ref = np.full((16, 16), 0.5, np.float32)
    frame = ref.copy()
    frame[3, 3] = bad
    for variant in ("v1.1", "v1", "soart2"):
        out = soartc_metrics(ref, frame, variant=variant)  # type: ignore[arg-type]
        assert all(np.isfinite(a).all() for a in out)
        assert out[1][0, 0] == RHO_MAX and out[2][0, 0] == 1.0
        assert out[2][1, 1] == 0.0


def test_remainder_is_cropped() -> None:
    ref = np.random.default_rng(4).random((21, 35), dtype=np.float32)
    beta, _, _ = soartc_metrics(ref, ref)
    assert beta.shape == (2, 4)


@pytest.mark.parametrize(
    ("ref", "frame", "kwargs", "error", "match"),
    [
        (
            np.zeros((16, 16), np.float32),
            np.zeros((16, 24), np.float32),
            {},
            FrameShapeError,
            r"\(16, 16\).*\(16, 24\)",
        ),
        (np.zeros((16, 16), np.float64), np.zeros((16, 16), np.float64), {}, InputError, "float32.*float64"),
        (np.zeros((16, 16, 3), np.float32), np.zeros((16, 16, 3), np.float32), {}, FrameShapeError, "2-D"),
        (np.zeros((16, 16), np.float32), np.zeros((16, 16), np.float32), {"block": 5}, InputError, "found 5"),
        (np.zeros((16, 16), np.float32), np.zeros((16, 16), np.float32), {"variant": "v9"}, InputError, "v9"),
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), {}, FrameShapeError, "at least 8x8"),
    ],
)
def test_bad_input_names_expected_and_found(
    ref: np.ndarray, frame: np.ndarray, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        soartc_metrics(ref, frame, **kwargs)  # type: ignore[arg-type]


def test_mosaic_mapping_and_calibration() -> None:
    e = np.zeros((2, 2, 3), np.float32)
    e[0, 0] = (0.05, 0.5, 0.2)
    e[1, 1] = (1.0, 9.0, 1.0)
    cal = Calibration((0.1, 1.0, 0.4), gain=2.0)
    m = mosaic(e, cal)
    assert m.dtype == np.uint8 and m.shape == (2, 2, 3)
    assert m[0, 0].tolist() == [255, 255, 255]  # 2 * 0.05 / 0.1 = 1
    assert m[1, 1].tolist() == [255, 255, 255]
    assert m[0, 1].tolist() == [0, 0, 0]
    e[0, 0] = (0.025, 0.125, 0.05)
    assert mosaic(e, cal)[0, 0].tolist() == [128, 64, 64]  # round(255 * 0.5), round(255 * 0.25)

    good = [np.full((4, 4, 3), v, np.float32) for v in (0.1, 0.2, 0.3)]
    assert calibrate(good).constants == pytest.approx((0.2, 0.2, 0.2))
    zero = calibrate([np.zeros((4, 4, 3), np.float32)])
    assert min(zero.constants) > 0
    with pytest.raises(InputError, match="found 0"):
        calibrate([])
    with pytest.raises(InputError, match="constants"):
        Calibration((0.0, 1.0, 1.0))


def test_to_unit_applies_polarity() -> None:
    img = np.array([[0, 255]], np.uint8)
    assert to_unit(img, dark_object=False).tolist() == [[0.0, 1.0]]
    assert to_unit(img, dark_object=True).tolist() == [[1.0, 0.0]]


def test_kernel_selects_cpu_without_cuda_and_matches_function() -> None:
    rng = np.random.default_rng(5)
    ref, frame = random_pair(rng, 64, 80, 8)
    kernel = SoartcKernel(ref, device="cpu")
    assert kernel.device == "cpu"
    for a, b in zip(kernel.metrics(frame), soartc_metrics(ref, frame), strict=True):
        np.testing.assert_array_equal(a, b)
    assert kernel.deviations(frame).shape == (8, 10, 3)
    with pytest.raises(FrameShapeError):
        kernel.metrics(frame[:, :40].copy())


@pytest.mark.skipif(cuda_available(), reason="checks the behaviour without a CUDA GPU")
def test_cuda_requested_without_gpu_is_a_clear_error() -> None:
    assert resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="cuda"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="found 'tpu'"):
        resolve_device("tpu")
