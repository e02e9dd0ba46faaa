"""SOARTC: the block-wise RT-method difference metric, on the CPU, and the public kernel API.

The definition is ``docs/SOARTC.md``. For each block of
``block x block`` pixels, with reference values x and frame values y (float32 in [0, 1], polarity
already applied)::

    Sxx = sum x^2   Syy = sum y^2   Sxy = sum x*y
    beta = Sxy / Sxx                                 (Y1, gain)
    rho  = sqrt(Sxx * Syy) / |Sxy|                   (Y2, volume, >= 1, capped at rho_max)
    s    = sign(beta) * sqrt(Syy / Sxx)
    y3   = mean |y - s * x|                          (Y3, shear)

Guards: a dark reference block (Sxx / n <= eps_dark) gives beta = 1, rho = 1, y3 = mean |y - x|;
rho is capped at rho_max when |Sxy| is tiny; a block holding a non-finite pixel is reported as
maximally different (beta = 0, rho = rho_max, y3 = 1). Outputs are never NaN or inf.

The CPU path is one fused, compiled kernel (Numba, parallel over block rows): per block one pass for
the moments and one for y3 while the block is still in cache. ``SoartcKernel`` picks the CPU or the
CUDA path (``stream_service.vision.soartc_cuda``, imported only when asked for).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from stream_service.errors import DeviceError, FrameShapeError, InputError
from stream_service.vision.arrays import F32, U8, Bool

Variant = Literal["v1.1", "v1", "soart2"]
Device = Literal["auto", "cpu", "cuda"]

VARIANTS: tuple[Variant, ...] = ("v1.1", "v1", "soart2")
VARIANT_CODES: dict[str, int] = {"v1.1": 0, "v1": 1, "soart2": 2}
BLOCK_SIZES = (4, 8, 16)
EPS_DARK = 1e-4
RHO_MAX = 10.0
# soart2's volume ratio adds this to both mean energies (SOARTC.md).
SOART2_EPS = 1e-4
# Below this |Sxy| (or L1 volume) the ratio defining rho is numerically meaningless: cap it.
TINY = 1e-12


@functools.cache
def _kernel(block: int) -> Callable[..., None]:  # pragma: no cover - compiled by Numba; tested against a float64 loop
    """The compiled CPU kernel for one block size (compiled on first use, about a second).

    One thread: a streaming service scales with worker processes (settings soartc.workers), and a
    thread pool on a busy machine costs more than it gains at these frame sizes. ``block`` is a
    constant of the closure, so the inner loops have a constant trip count and vectorise. Each block
    row is walked row by row so that reads are contiguous; the b products of one block within one
    pixel row are summed in float32 (b <= 16 terms, well inside float32's precision) and the block
    totals in float64. fastmath is limited to reassociation and contraction (what vectorising the
    sums needs), never "no NaN/inf", so the guards' comparisons and the non-finite checks hold.
    """

    def kernel(
        ref: F32,
        frame: F32,
        variant: int,
        eps_dark: float,
        rho_max: float,
        beta_out: F32,
        rho_out: F32,
        y3_out: F32,
    ) -> None:
        h, w = beta_out.shape
        n = block * block
        for bi in range(h):
            sxx = np.zeros(w)
            syy = np.zeros(w)
            sxy = np.zeros(w)
            ax = np.zeros(w)
            ay = np.zeros(w)
            r0 = bi * block
            for r in range(r0, r0 + block):
                xr = ref[r]
                yr = frame[r]
                for bj in range(w):
                    c0 = bj * block
                    pxx = np.float32(0.0)
                    pyy = np.float32(0.0)
                    pxy = np.float32(0.0)
                    for c in range(c0, c0 + block):
                        pxx += xr[c] * xr[c]
                        pyy += yr[c] * yr[c]
                        pxy += xr[c] * yr[c]
                    sxx[bj] += pxx
                    syy[bj] += pyy
                    sxy[bj] += pxy
                if variant == 1:  # L1 volumes, only for v1: a separate loop keeps the one above vectorised
                    for bj in range(w):
                        c0 = bj * block
                        px = np.float32(0.0)
                        py = np.float32(0.0)
                        for c in range(c0, c0 + block):
                            px += abs(xr[c])
                            py += abs(yr[c])
                        ax[bj] += px
                        ay[bj] += py
            gain = np.empty(w, np.float32)
            for bj in range(w):
                if not (math.isfinite(sxx[bj]) and math.isfinite(syy[bj]) and math.isfinite(sxy[bj])):
                    beta_out[bi, bj] = 0.0
                    rho_out[bi, bj] = rho_max
                    gain[bj] = np.nan  # marks the block: y3 = 1 below
                    continue
                if sxx[bj] / n <= eps_dark:
                    beta = 1.0
                    rho = 1.0
                    s = 1.0
                else:
                    beta = sxy[bj] / sxx[bj]
                    sign = 1.0 if beta > 0.0 else (-1.0 if beta < 0.0 else 0.0)
                    if variant == 0:
                        rho = rho_max if abs(sxy[bj]) <= TINY else max(math.sqrt(sxx[bj] * syy[bj]) / abs(sxy[bj]), 1.0)
                        s = sign * math.sqrt(syy[bj] / sxx[bj])
                    elif variant == 1:
                        vol = abs(beta) * ax[bj]
                        rho = ay[bj] / vol if vol > TINY else rho_max
                        s = sign * ay[bj] / ax[bj]
                    else:
                        beta = 1.0
                        rho = (syy[bj] / n + SOART2_EPS) / (sxx[bj] / n + SOART2_EPS)
                        s = rho
                    rho = min(rho, rho_max)
                beta_out[bi, bj] = beta
                rho_out[bi, bj] = rho
                gain[bj] = s
            acc = np.zeros(w)
            for r in range(r0, r0 + block):
                xr = ref[r]
                yr = frame[r]
                for bj in range(w):
                    c0 = bj * block
                    s32 = gain[bj]
                    p = np.float32(0.0)
                    for c in range(c0, c0 + block):
                        p += abs(yr[c] - s32 * xr[c])
                    acc[bj] += p
            for bj in range(w):
                y3_out[bi, bj] = acc[bj] / n if math.isfinite(gain[bj]) else 1.0

    # Numba (and LLVM behind it) is imported here, on the first compile, not with the module: modules that
    # only use this one's definitions (the infer stage, the card) must not pay for it.
    import numba

    return numba.njit(nogil=True, fastmath={"reassoc", "contract"}, cache=True)(kernel)


def _check_pair(reference: np.ndarray, frame: np.ndarray, block: int, variant: str) -> None:
    if block not in BLOCK_SIZES:
        raise InputError(f"SOARTC block size: expected one of {BLOCK_SIZES}, found {block}")
    if variant not in VARIANTS:
        raise InputError(f"SOARTC variant: expected one of {VARIANTS}, found {variant!r}")
    for name, arr in (("reference", reference), ("frame", frame)):
        if arr.ndim != 2:
            raise FrameShapeError(f"SOARTC {name}: expected a 2-D gray image (H, W), found shape {arr.shape}")
        if arr.dtype != np.float32:
            raise InputError(f"SOARTC {name}: expected dtype float32 in [0, 1], found {arr.dtype}")
    if reference.shape != frame.shape:
        raise FrameShapeError(f"SOARTC frame shape: expected the reference's {reference.shape}, found {frame.shape}")
    if reference.shape[0] < block or reference.shape[1] < block:
        raise FrameShapeError(f"SOARTC image: expected at least {block}x{block} pixels, found {reference.shape}")


def grid_shape(frame_shape: tuple[int, ...], block: int) -> tuple[int, int]:
    """The block grid (h, w) = (H // block, W // block) of a frame; the remainder is cropped."""
    return frame_shape[0] // block, frame_shape[1] // block


def soartc_metrics(
    reference: F32,
    frame: F32,
    block: int = 8,
    variant: Variant = "v1.1",
    *,
    eps_dark: float = EPS_DARK,
    rho_max: float = RHO_MAX,
) -> tuple[F32, F32, F32]:
    """Per-block SOARTC statistics of a registered frame against its reference, on the CPU.

    Args:
        reference: (H, W) float32 in [0, 1], polarity applied.
        frame: (H, W) float32 in [0, 1], registered to the reference.
        block: block side b in pixels (4, 8 or 16).
        variant: "v1.1" (default), "v1" (L1 volumes) or "soart2" (no beta).

    Returns:
        (beta_hw, rho_hw, y3_hw), each (H // b, W // b) float32, finite.
    """
    _check_pair(reference, frame, block, variant)
    h, w = grid_shape(reference.shape, block)
    beta = np.empty((h, w), np.float32)
    rho = np.empty((h, w), np.float32)
    y3 = np.empty((h, w), np.float32)
    _kernel(block)(reference, frame, VARIANT_CODES[variant], eps_dark, rho_max, beta, rho, y3)
    return beta, rho, y3


def dark_blocks(reference: F32, block: int = 8, eps_dark: float = EPS_DARK) -> Bool:
    """(h, w) bool: reference blocks whose mean energy Sxx / n is at most eps_dark.

    Depends on the reference only, so a pipeline computes it once per reference.
    """
    h, w = grid_shape(reference.shape, block)
    crop = reference[: h * block, : w * block].astype(np.float64)
    energy = (crop * crop).reshape(h, block, w, block).mean(axis=(1, 3))
    return np.asarray(energy <= eps_dark)


def deviations(beta: F32, rho: F32, y3: F32, dark: Bool) -> F32:
    """(h, w, 3) float32 deviation scores (e_R, e_G, e_B); 0 means "no difference" in every channel.

    e_R = |beta / median(beta) - 1| with the median over this frame's non-dark blocks (cancels a
    global lighting change), e_G = |rho - 1| (equal to rho - 1 for v1.1, where rho >= 1; the absolute
    value keeps the v1 and soart2 variants, whose rho can fall below 1, from clipping to 0), e_B = y3.
    """
    lit = beta[~dark]
    med = float(np.median(lit)) if lit.size else 1.0
    if not math.isfinite(med) or abs(med) < 1e-6:
        med = 1.0
    out = np.empty((*beta.shape, 3), np.float32)
    np.abs(beta / np.float32(med) - 1.0, out=out[..., 0])
    np.abs(rho - 1.0, out=out[..., 1])
    out[..., 2] = y3
    out[dark, 0] = 0.0
    return out


@dataclass(frozen=True)
class Calibration:
    """Calibration constants C = (C_R, C_G, C_B) and gain g of the 8-bit mosaic.

    They are part of the feature definition: stored in the model card and loaded with the model.
    """

    constants: tuple[float, float, float]
    gain: float = 2.0
    method: str = "median-of-max"

    def __post_init__(self) -> None:
        if len(self.constants) != 3 or not all(math.isfinite(c) and c > 0 for c in self.constants):
            raise InputError(f"calibration constants: expected three finite values > 0, found {self.constants}")
        if not (math.isfinite(self.gain) and self.gain > 0):
            raise InputError(f"calibration gain: expected a finite value > 0, found {self.gain}")


def calibrate(
    good_deviations: list[F32], gain: float = 2.0, method: str = "median-of-max", percentile: float = 99.5
) -> Calibration:
    """Calibration constants from the deviation maps of K good frames (each (h, w, 3) float32).

    method "median-of-max": C_c is the median over frames of each frame's maximum of e_c;
    method "percentile": C_c is the given percentile of e_c over all good blocks.
    A constant that comes out 0 (a channel that never moves on good frames) is set to 1e-3.
    """
    if not good_deviations:
        raise InputError("calibration frames: expected at least 1 good frame, found 0")
    if method == "median-of-max":
        maxima = np.stack([d.reshape(-1, 3).max(axis=0) for d in good_deviations])
        consts = np.median(maxima, axis=0)
    elif method == "percentile":
        consts = np.percentile(np.concatenate([d.reshape(-1, 3) for d in good_deviations]), percentile, axis=0)
    else:
        raise InputError(f"calibration method: expected 'median-of-max' or 'percentile', found {method!r}")
    c = tuple(float(max(v, 1e-3)) for v in consts)
    return Calibration((c[0], c[1], c[2]), gain=gain, method=method)


def mosaic(e_hw3: F32, calibration: Calibration) -> U8:
    """The uint8 (h, w, 3) SOARTC mosaic: round(255 * clip(g * e_c / C_c, 0, 1))."""
    scale = np.asarray(calibration.constants, np.float32) / np.float32(calibration.gain)
    u = np.clip(e_hw3 / scale, 0.0, 1.0)
    return np.rint(u * 255.0).astype(np.uint8)


def to_unit(image: npt.NDArray[np.generic], dark_object: bool) -> F32:
    """A gray image as float32 in [0, 1], inverted when the object is dark on a bright background.

    uint8 and uint16 are scaled by their maximum; floats are taken as already in [0, 1].
    """
    if image.dtype == np.uint8:
        out = image.astype(np.float32) * np.float32(1 / 255)
    elif image.dtype == np.uint16:
        out = image.astype(np.float32) * np.float32(1 / 65535)
    elif np.issubdtype(image.dtype, np.floating):
        out = image.astype(np.float32, copy=True)
    else:
        raise InputError(f"image dtype: expected uint8, uint16 or float, found {image.dtype}")
    if dark_object:
        np.subtract(np.float32(1.0), out, out=out)
    return out


class MetricsBackend(Protocol):
    """A SOARTC implementation bound to one reference (CPU or CUDA)."""

    def metrics(self, frame: F32) -> tuple[F32, F32, F32]: ...


class SoartcKernel:
    """SOARTC bound to one reference, on the device a setting names.

    ``device="auto"`` takes CUDA when CuPy and a GPU are present and the CPU otherwise; "cuda"
    raises DeviceError when there is none. The reference's dark-block mask is computed once here.
    """

    def __init__(
        self,
        reference: F32,
        block: int = 8,
        variant: Variant = "v1.1",
        device: Device = "auto",
        *,
        eps_dark: float = EPS_DARK,
        rho_max: float = RHO_MAX,
    ) -> None:
        _check_pair(reference, reference, block, variant)
        self.reference = np.ascontiguousarray(reference)
        self.block = block
        self.variant: Variant = variant
        self.eps_dark = eps_dark
        self.rho_max = rho_max
        self.dark = dark_blocks(reference, block, eps_dark)
        self.device = resolve_device(device)
        self._cuda: MetricsBackend | None = None
        if self.device == "cuda":
            from stream_service.vision.soartc_cuda import CudaSoartc

            self._cuda = CudaSoartc(self.reference, block, variant, eps_dark=eps_dark, rho_max=rho_max)

    def metrics(self, frame: F32) -> tuple[F32, F32, F32]:
        """(beta, rho, y3) of a registered frame, each (h, w) float32."""
        if self._cuda is not None:
            if frame.shape != self.reference.shape:
                raise FrameShapeError(
                    f"SOARTC frame shape: expected the reference's {self.reference.shape}, found {frame.shape}"
                )
            return self._cuda.metrics(frame)
        return soartc_metrics(
            self.reference, frame, self.block, self.variant, eps_dark=self.eps_dark, rho_max=self.rho_max
        )

    def deviations(self, frame: F32) -> F32:
        """(h, w, 3) float32 deviation scores of a registered frame."""
        return deviations(*self.metrics(frame), self.dark)


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device. Never raises."""
    try:
        import cupy
    except Exception:  # noqa: BLE001 - any import failure (missing wheel, missing driver) means "no CUDA"
        return False
    try:
        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # noqa: BLE001 - cupy raises CUDARuntimeError subclasses without a driver
        return False


def resolve_device(device: str) -> Literal["cpu", "cuda"]:
    """Turn the ``device`` setting (auto|cpu|cuda) into the device to use."""
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if not cuda_available():
            raise DeviceError(
                "device: 'cuda' was asked for, but CuPy found no CUDA GPU "
                "(install the extra with: pip install 'stream-service[gpu]', or set device: cpu)"
            )
        return "cuda"
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    raise DeviceError(f"device: expected 'auto', 'cpu' or 'cuda', found {device!r}")
