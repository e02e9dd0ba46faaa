"""Frame-to-reference registration: phase correlation for translation, ECC for affine.

Convention: a ``Registration`` holds the 2x3 matrix M that maps reference pixel coordinates to frame
pixel coordinates, so the aligned frame is ``aligned(x, y) = frame(M @ (x, y, 1))``: this is
``cv2.warpAffine(frame, M, (W, H), flags=INTER_LINEAR | WARP_INVERSE_MAP)``, and it is the matrix
``cv2.findTransformECC`` returns. For a translation, M = [[1, 0, dx], [0, 1, dy]]: the frame's content
sits (dx, dy) pixels right of and below where it sits in the reference, and applying the registration
moves it back by (-dx, -dy) onto the reference.

Sub-pixel phase correlation: ``cv2.phaseCorrelate`` fits its peak with a 5x5 centroid, which is biased
by up to 0.33 px on sharp binarised images and is thrown off by defects. Here the whitened cross-power
spectrum (Hanning window, CCS-packed real DFTs) is weighted by the spectrum of a Gaussian (sigma 2 px),
so the correlation surface is a sampled Gaussian whose peak a log-parabola locates without bias. On
DeepPCB templates the error is below 0.03 px; the response (the fitted peak height divided by the peak
of a perfect match) is the confidence in [0, 1]: 1 for identical images; for DeepPCB tested images
against their templates a median of 0.6 (5th percentile 0.2); for unrelated tiles a median of 0.05
(95th percentile 0.11); 0 for a blank image. Content with edges in one direction only (parallel
traces) or only near the borders, where the window is 0, cannot be registered reliably: its
confidence is low or its shift implausible, which the limits of ``register`` turn into errors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.errors import FrameShapeError, InputError, RegistrationError
from stream_service.vision.arrays import F32
from stream_service.vision.refinement import refine_local
from stream_service.vision.soartc import to_unit

Method = Literal["translation", "affine", "none"]
Matrix2x3 = tuple[tuple[float, float, float], tuple[float, float, float]]

METHODS: tuple[Method, ...] = ("translation", "affine", "none")
DEFAULT_MAX_SHIFT = 32.0
DEFAULT_MIN_CONFIDENCE = 0.1
# Frames whose longer side exceeds this are estimated on an area-downscaled copy (factor 2, 4, ...).
DEFAULT_MAX_SIDE = 1024
# Width of the Gaussian the correlation surface is smoothed with: wide enough to suppress the
# binarisation jitter and defects, narrow enough to keep the peak sharp.
CORRELATION_SIGMA = 2.0
IDENTITY: Matrix2x3 = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


@dataclass(frozen=True)
class Registration:
    """How a frame maps onto its reference.

    dx, dy: the translation part of ``matrix_2x3`` in pixels (the frame's content is displaced by
    (dx, dy) from the reference); confidence: the phase-correlation response in [0, 1];
    matrix_2x3: reference coordinates -> frame coordinates (see the module docstring).
    """

    dx: float
    dy: float
    confidence: float
    method: Method
    matrix_2x3: Matrix2x3 = IDENTITY

    def matrix(self) -> F32:
        """The (2, 3) float32 matrix, for ``cv2.warpAffine(..., flags=WARP_INVERSE_MAP)``."""
        return np.asarray(self.matrix_2x3, np.float32)

    def max_displacement(self, shape: tuple[int, ...]) -> float:
        """The largest distance in pixels that any corner of an (H, W) frame moves."""
        h, w = shape[0], shape[1]
        corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], np.float64).T
        moved = np.asarray(self.matrix_2x3, np.float64) @ corners
        return float(np.max(np.hypot(moved[0] - corners[0], moved[1] - corners[1])))


def _translation(dx: float, dy: float, confidence: float) -> Registration:
    return Registration(dx, dy, confidence, "translation", ((1.0, 0.0, dx), (0.0, 1.0, dy)))


def as_unit(image: npt.NDArray[np.generic], name: str = "frame") -> F32:
    """An (H, W) gray image as float32 in [0, 1]; float32 input is returned as is (not copied)."""
    if image.ndim != 2:
        raise FrameShapeError(f"registration {name}: expected a 2-D gray image (H, W), found shape {image.shape}")
    if image.dtype == np.float32:
        return np.asarray(image, np.float32)
    return to_unit(image, dark_object=False)


def _even_dft_size(n: int) -> int:
    # CCS packing below assumes even sizes; optimal sizes also make the DFT fast.
    size = cv2.getOptimalDFTSize(n)
    while size % 2:
        size = cv2.getOptimalDFTSize(size + 1)
    return int(size)


def _expand_ccs(packed: F32) -> F32:
    """Copy each real slot of a CCS-packed (H, W) spectrum (H, W even) into its imaginary slot, in place.

    Applied to a spectrum holding one real value per frequency, this makes a per-frequency weight
    that scales both parts of a complex CCS entry.
    """
    h, w = packed.shape
    packed[:, 2 : w - 1 : 2] = packed[:, 1 : w - 2 : 2]
    packed[2 : h - 1 : 2, 0] = packed[1 : h - 2 : 2, 0]
    packed[2 : h - 1 : 2, w - 1] = packed[1 : h - 2 : 2, w - 1]
    return packed


@lru_cache(maxsize=8)
def _window(h: int, w: int) -> F32:
    win = np.asarray(cv2.createHanningWindow((w, h), cv2.CV_32F), np.float32)
    win.setflags(write=False)
    return win


@lru_cache(maxsize=8)
def _gaussian_weight(h: int, w: int, sigma: float) -> tuple[F32, float]:
    """(CCS weight (h, w) float32, peak g(0) of the Gaussian) for smoothing the correlation surface."""
    y = np.minimum(np.arange(h), h - np.arange(h))[:, None].astype(np.float64)
    x = np.minimum(np.arange(w), w - np.arange(w))[None, :].astype(np.float64)
    g = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    g /= g.sum()
    weight = _expand_ccs(np.asarray(cv2.dft(g.astype(np.float32)), np.float32))
    weight.setflags(write=False)
    return weight, float(g[0, 0])


def _spectrum(image_hw: F32, padded: tuple[int, int]) -> F32:
    """CCS-packed DFT (padded H, padded W) float32 of the Hanning-windowed, zero-padded image."""
    h, w = image_hw.shape
    windowed = image_hw * _window(h, w)
    if (h, w) != padded:
        windowed = np.asarray(
            cv2.copyMakeBorder(windowed, 0, padded[0] - h, 0, padded[1] - w, cv2.BORDER_CONSTANT, value=0), np.float32
        )
    spec = np.asarray(cv2.dft(windowed), np.float32)
    if not math.isfinite(float(spec[0, 0])):
        raise InputError("registration image: expected finite pixel values, found NaN or inf")
    return spec


def _log_parabola(minus: float, centre: float, plus: float) -> tuple[float, float]:
    """(sub-pixel offset in [-0.5, 0.5], log-height gain) of a Gaussian through three samples."""
    floor = centre * 1e-6
    lm, l0, lp = math.log(max(minus, floor)), math.log(centre), math.log(max(plus, floor))
    curvature = lm - 2.0 * l0 + lp
    if curvature >= 0.0:
        return 0.0, 0.0
    offset = 0.5 * (lm - lp) / curvature
    return max(-0.5, min(0.5, offset)), -((lm - lp) ** 2) / (8.0 * curvature)


def _correlate(ref_spec: F32, frame_spec: F32) -> tuple[float, float, float]:
    """(dx, dy, confidence) of the frame against the reference from their CCS spectra."""
    h, w = ref_spec.shape
    weight, g0 = _gaussian_weight(h, w, CORRELATION_SIGMA)
    cross = np.asarray(cv2.mulSpectrums(frame_spec, ref_spec, 0, conjB=True), np.float32)
    mag = np.asarray(cv2.mulSpectrums(cross, cross, 0, conjB=True), np.float32)
    np.sqrt(mag, out=mag)
    _expand_ccs(mag)
    mag += 1e-6 * float(mag.mean()) + 1e-30
    cross *= weight
    cross /= mag
    surface = cv2.idft(cross, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)
    _, peak, _, (ix, iy) = cv2.minMaxLoc(surface)
    if not peak > 0.0:  # a blank image: the whitened spectrum is empty
        return 0.0, 0.0, 0.0
    sx, gx = _log_parabola(float(surface[iy, (ix - 1) % w]), peak, float(surface[iy, (ix + 1) % w]))
    sy, gy = _log_parabola(float(surface[(iy - 1) % h, ix]), peak, float(surface[(iy + 1) % h, ix]))
    dx, dy = ix + sx, iy + sy
    dx = dx - w if dx > w / 2 else dx
    dy = dy - h if dy > h / 2 else dy
    confidence = min(1.0, math.exp(math.log(peak) + gx + gy) / g0)
    return float(dx), float(dy), confidence


def _scale_factor(shape: tuple[int, ...], max_side: int) -> int:
    factor = 1
    while max(shape[0], shape[1]) > max_side * factor:
        factor *= 2
    return factor


def _downscale(image_hw: F32, factor: int) -> F32:
    if factor == 1:
        return image_hw
    return np.asarray(cv2.resize(image_hw, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA))


def _check_shapes(reference_hw: F32, frame_hw: F32) -> None:
    if reference_hw.shape != frame_hw.shape:
        raise FrameShapeError(
            f"registration frame shape: expected the reference's {reference_hw.shape}, found {frame_hw.shape}"
        )
    if min(reference_hw.shape) < 8:
        raise FrameShapeError(f"registration image: expected at least 8x8 pixels, found {reference_hw.shape}")


class Registrar:
    """Registration of frames to one reference; the reference's spectrum is computed once.

    Args:
        reference_hw: (H, W) gray reference (float32 in [0, 1], or uint8/uint16).
        method: "translation" (phase correlation), "affine" (ECC from the phase-correlation shift)
            or "none".
        max_shift: the largest displacement in pixels (of any frame corner) accepted.
        min_confidence: the lowest phase-correlation response accepted.
        max_side: frames with a longer side are estimated on a copy downscaled by 2, 4, ...
    """

    def __init__(
        self,
        reference_hw: npt.NDArray[np.generic],
        method: Method = "translation",
        *,
        max_shift: float = DEFAULT_MAX_SHIFT,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        max_side: int = DEFAULT_MAX_SIDE,
    ) -> None:
        if method not in METHODS:
            raise InputError(f"registration method: expected one of {METHODS}, found {method!r}")
        self.reference = as_unit(reference_hw, "reference")
        _check_shapes(self.reference, self.reference)
        self.method: Method = method
        self.max_shift = max_shift
        self.min_confidence = min_confidence
        self._max_side = max_side
        self._factor = _scale_factor(self.reference.shape, max_side)
        self._small = _downscale(self.reference, self._factor)
        self._padded = (_even_dft_size(self._small.shape[0]), _even_dft_size(self._small.shape[1]))
        self._spec = _spectrum(self._small, self._padded)

    def estimate_shift(self, frame_hw: npt.NDArray[np.generic]) -> Registration:
        """The translation of an (H, W) frame against the reference (sub-pixel, phase correlation)."""
        frame = as_unit(frame_hw)
        _check_shapes(self.reference, frame)
        dx, dy, confidence = _correlate(self._spec, _spectrum(_downscale(frame, self._factor), self._padded))
        # Area downscaling by k keeps pixel centres aligned up to a common offset, so shifts scale by k.
        return _translation(dx * self._factor, dy * self._factor, confidence)

    def estimate(self, frame_hw: npt.NDArray[np.generic]) -> Registration:
        """The registration of a frame by this registrar's method.

        The limits are not checked, except that "affine" raises RegistrationError when its starting
        shift is already past them (ECC would only wander off from there).
        """
        if self.method == "none":
            frame = as_unit(frame_hw)
            _check_shapes(self.reference, frame)
            return Registration(0.0, 0.0, 1.0, "none")
        shift = self.estimate_shift(frame_hw)
        if self.method == "translation":
            return shift
        self._check(shift)
        return estimate_affine(self.reference, as_unit(frame_hw), initial=shift, max_side=self._max_side)

    def register(self, frame_hw: npt.NDArray[np.generic]) -> tuple[F32, Registration]:
        """(aligned frame (H, W) float32 in [0, 1], registration); raises RegistrationError past the limits."""
        registration = self.estimate(frame_hw)
        self._check(registration)
        return apply_registration(as_unit(frame_hw), registration), registration

    def align(self, frame_hw: npt.NDArray[np.generic]) -> tuple[F32, Registration]:
        """The frame aligned as well as the evidence allows; never raises for a frame of the right shape.

        Phase correlation cannot see a shift along the only direction a pattern has (parallel traces
        all running one way) and returns noise for that component. So the estimate is taken only when
        it lowers the mean absolute difference to the reference, tried whole, per axis (each part within
        the limits on its own), and not at all; the least different candidate wins. For "affine" the
        phase-correlation shift (whole and per axis) competes with the ECC fit, which starts from the
        best of them: on a crop with little
        structure (one arc of a pad, a few parallel bars) ECC diverges or wanders off where the shift
        alone aligns the part, and leaving such a frame unaligned turned a 6 px offset into a false
        alarm. A registration refused by the limits drops out the same way. The returned Registration
        is the one applied (method "none" when the frame is left as it is).
        """
        frame = as_unit(frame_hw)
        _check_shapes(self.reference, frame)
        if self.method == "none":
            return frame, Registration(0.0, 0.0, 1.0, "none")
        shift = self.estimate_shift(frame)
        found: list[Registration] = []
        for dx, dy in ((shift.dx, shift.dy), (shift.dx, 0.0), (0.0, shift.dy)):
            # Each part on its own: parallel bars give noise along their length, not across it.
            part = _translation(dx, dy, shift.confidence)
            try:
                self._check(part)
                found.append(part)
            except RegistrationError:
                pass
        # Confidence 0 marks a frame no registration was accepted for.
        candidates = [(frame, Registration(0.0, 0.0, shift.confidence if found else 0.0, "none"))]
        candidates.extend((apply_registration(frame, reg), reg) for reg in found)
        errors = [float(cv2.norm(self.reference, c[0], cv2.NORM_L1)) for c in candidates]
        if self.method == "affine" and found:
            # ECC from the best translation: from a shift whose component along parallel bars is noise it
            # fits a bogus scale that the limits may not catch.
            start = candidates[1 + int(np.argmin(errors[1:]))][1]
            try:
                affine = estimate_affine(self.reference, frame, initial=start, max_side=self._max_side)
                self._check(affine)
                candidates.append((apply_registration(frame, affine), affine))
                errors.append(float(cv2.norm(self.reference, candidates[-1][0], cv2.NORM_L1)))
            except RegistrationError:
                pass
        return candidates[int(np.argmin(errors))]

    def front_end(
        self, frame_hw: npt.NDArray[np.generic], *, valid_region: bool = False, local_px: int = 0
    ) -> tuple[F32, Registration]:
        """``align``, then (``valid_region``) the pixels that are no evidence set to the reference's
        (``mask_invalid``), then (``local_px`` > 0) the local refinement of what one warp left misaligned
        (``refinement.refine_local``). The returned Registration is the global one."""
        aligned, registration = self.align(frame_hw)
        invalid = invalid_region(aligned.shape, registration) if valid_region else None
        if invalid is not None:
            aligned = np.asarray(np.where(invalid, self.reference, aligned), np.float32)
        return refine_local(self.reference, aligned, local_px, invalid), registration

    def _check(self, registration: Registration) -> None:
        if registration.confidence < self.min_confidence:
            raise RegistrationError(
                f"registration confidence: expected at least {self.min_confidence}, "
                f"found {registration.confidence:.3f} (a blank frame, or not the reference's part?)"
            )
        shift = registration.max_displacement(self.reference.shape)
        if shift > self.max_shift:
            raise RegistrationError(
                f"registration shift: expected at most {self.max_shift} px, found {shift:.2f} px "
                f"(dx={registration.dx:.2f}, dy={registration.dy:.2f}, method {registration.method})"
            )


def estimate_shift(
    reference_hw: npt.NDArray[np.generic], frame_hw: npt.NDArray[np.generic], *, max_side: int = DEFAULT_MAX_SIDE
) -> Registration:
    """Sub-pixel translation of an (H, W) frame against an (H, W) reference, by phase correlation.

    Returns a "translation" Registration whose (dx, dy) is the displacement of the frame's content;
    confidence is the phase-correlation response in [0, 1]. Never raises on a blank frame: its
    confidence is 0.
    """
    return Registrar(reference_hw, max_side=max_side).estimate_shift(frame_hw)


def estimate_affine(
    reference_hw: npt.NDArray[np.generic],
    frame_hw: npt.NDArray[np.generic],
    *,
    initial: Registration | None = None,
    max_iterations: int = 100,
    epsilon: float = 1e-5,
    gauss_filter: int = 5,
    max_side: int = DEFAULT_MAX_SIDE,
) -> Registration:
    """Affine registration of an (H, W) frame against an (H, W) reference by ECC (cv2.findTransformECC).

    ECC starts from ``initial`` (by default the phase-correlation shift) and smooths both images with a
    ``gauss_filter`` Gaussian, which binarised images need. The confidence is the phase-correlation
    response of the initial shift (ECC's own coefficient is close to 1 for any converged fit).
    Raises RegistrationError when ECC diverges or returns a non-finite matrix.
    """
    reference = as_unit(reference_hw, "reference")
    frame = as_unit(frame_hw)
    _check_shapes(reference, frame)
    if initial is None:
        initial = Registrar(reference, max_side=max_side).estimate_shift(frame)
    factor = _scale_factor(reference.shape, max_side)
    # Pixel centres: full-resolution x = k * x_small + (k - 1) / 2 after area downscaling by k.
    to_small = np.array([[1 / factor, 0, -(factor - 1) / (2 * factor)], [0, 1 / factor, -(factor - 1) / (2 * factor)]])
    warp = _compose(to_small, _compose(initial.matrix().astype(np.float64), _inverse(to_small))).astype(np.float32)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, max_iterations, epsilon)
    try:
        # The stubs omit the (mask=None, gaussFiltSize) overload that OpenCV accepts.
        _, warp = cv2.findTransformECC(  # type: ignore[call-overload]
            _downscale(reference, factor),
            _downscale(frame, factor),
            warp,
            cv2.MOTION_AFFINE,
            criteria,
            None,
            gauss_filter,
        )
    except cv2.error as exc:
        raise RegistrationError(
            f"ECC affine registration: expected convergence within {max_iterations} iterations "
            f"(epsilon {epsilon}) from the shift ({initial.dx:.2f}, {initial.dy:.2f}), found divergence: "
            f"{_cv_reason(exc)}"
        ) from exc
    full = _compose(_inverse(to_small), _compose(np.asarray(warp, np.float64), to_small))
    if not np.all(np.isfinite(full)):
        raise RegistrationError(f"ECC affine registration: expected a finite matrix, found {full.tolist()}")
    m = tuple(tuple(float(v) for v in row) for row in full)
    matrix: Matrix2x3 = ((m[0][0], m[0][1], m[0][2]), (m[1][0], m[1][1], m[1][2]))
    return Registration(matrix[0][2], matrix[1][2], initial.confidence, "affine", matrix)


def _cv_reason(exc: cv2.error) -> str:
    """The human part of an OpenCV error ("... error: (-7:Iterations do not converge) <reason> in function ...")."""
    text = " ".join(str(exc).split())
    match = re.search(r"error: \(-?\d+:[^)]*\) (.*?)(?: in function .*)?$", text)
    return match.group(1) if match else text


def _compose(a_2x3: npt.NDArray[np.float64], b_2x3: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The 2x3 affine map x -> a(b(x))."""
    return np.asarray(a_2x3[:, :2] @ b_2x3 + np.hstack([np.zeros((2, 2)), a_2x3[:, 2:]]), np.float64)


def _inverse(m_2x3: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray(cv2.invertAffineTransform(m_2x3), np.float64)


def apply_registration(frame_hw: F32, registration: Registration) -> F32:
    """The (H, W) float32 frame resampled onto the reference grid (bilinear, edges replicated)."""
    if registration.method == "none":
        return frame_hw
    h, w = frame_hw.shape
    return np.asarray(
        cv2.warpAffine(
            frame_hw,
            registration.matrix(),
            (w, h),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        ),
        np.float32,
    )


def invalid_region(shape: tuple[int, ...], registration: Registration) -> npt.NDArray[np.bool_]:
    """(H, W) bool: pixels of the aligned frame that hold no evidence about the part.

    Those the warp filled from outside the captured frame (``apply_registration`` replicates the edge
    there; a pixel counts when any of its bilinear taps lies outside the frame), and always the outermost
    ring: a frame is never exactly where the reference was, so its edge pixels show, or interpolate, part
    of the board just outside the reference's view (a trace ending a pixel past the edge comes in as a
    strip one or two rows high, whatever the registration).
    """
    h, w = shape[0], shape[1]
    invalid = np.zeros((h, w), bool)
    if registration.method != "none":
        ones = np.ones((h, w), np.float32)
        warped = cv2.warpAffine(
            ones,
            registration.matrix(),
            (w, h),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0.0,
        )
        invalid = np.asarray(warped < 0.999, bool)
    invalid[0, :] = invalid[-1, :] = True
    invalid[:, 0] = invalid[:, -1] = True
    return invalid


def mask_invalid(reference_hw: F32, aligned_hw: F32, registration: Registration) -> F32:
    """The aligned frame with the pixels of ``invalid_region`` set to the reference's (no evidence)."""
    invalid = invalid_region(aligned_hw.shape, registration)
    return np.asarray(np.where(invalid, reference_hw, aligned_hw), np.float32)


def register(
    reference_hw: npt.NDArray[np.generic],
    frame_hw: npt.NDArray[np.generic],
    method: Method = "translation",
    *,
    max_shift: float = DEFAULT_MAX_SHIFT,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    max_side: int = DEFAULT_MAX_SIDE,
) -> tuple[F32, Registration]:
    """Align an (H, W) frame to an (H, W) reference.

    Returns (aligned (H, W) float32 in [0, 1], Registration). Raises FrameShapeError when the shapes
    differ, and RegistrationError when the confidence is below ``min_confidence`` or a frame corner
    moves more than ``max_shift`` pixels. For many frames against one reference, use ``Registrar``.
    """
    registrar = Registrar(reference_hw, method, max_shift=max_shift, min_confidence=min_confidence, max_side=max_side)
    return registrar.register(frame_hw)
