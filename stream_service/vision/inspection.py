"""One frame through the inspection: registration, SOARTC features, the ViT, the attention filter.

The same two halves run in the live pipeline (``FeatureExtractor`` in the soartc stage, ``Detector``
in the infer stage) and, back to back, in ``Inspector`` for ``stream-service evaluate``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.errors import ModelError
from stream_service.model.card import ModelCard
from stream_service.vision.arrays import F32, U8
from stream_service.vision.highlight import HighlightResult, Pieces, highlight, token_relevance
from stream_service.vision.registration import Method, Registrar, Registration
from stream_service.vision.soartc import Device, to_unit
from stream_service.vision.tokens import FeatureSpec, TokenFeatures, feature_kernels, token_features
from stream_service.vision.windows import WindowLayout

log = logging.getLogger(__name__)


class WindowModel(Protocol):
    """What the detector needs of a model: its card and a batched run over windows."""

    card: ModelCard

    def run(self, windows_nggc: F32) -> tuple[F32, F32]: ...


@dataclass(frozen=True)
class Extracted:
    """The soartc stage's result for one frame: the registered frame and its token features."""

    aligned_hw: U8
    features: TokenFeatures
    registration: Registration


class FeatureExtractor:
    """Registration to one reference and SOARTC token features, on the CPU or the GPU.

    A frame whose registration is unsure (a blank view, a pattern with edges in one direction only) is
    aligned as far as the evidence allows (``Registrar.align``); the comparison always runs.
    """

    def __init__(
        self,
        reference_u8: U8,
        spec: FeatureSpec,
        dark_object: bool,
        registration: Method | None = None,
        max_shift: float = 16.0,
        device: Device = "auto",
    ) -> None:
        self.spec = spec
        self.dark_object = dark_object
        self.reference = to_unit(reference_u8, dark_object)
        self.shape = self.reference.shape
        # The pipeline follows the model card: a card that records its registration (spec.registration)
        # gets it whatever is configured; for an older card the configured method applies.
        method: Method = registration or "translation"
        if spec.registration is not None:
            if registration is not None and registration != spec.registration:
                log.warning(
                    "registration: %r is configured, but the model card's figures were measured with %r; "
                    "running %r (the card's)",
                    registration,
                    spec.registration,
                    spec.registration,
                )
            method = spec.registration
        self.registrar = Registrar(self.reference, method, max_shift=max_shift)
        self.kernels = feature_kernels(self.reference, spec, device)
        self.unregistered = 0

    def extract(self, frame_u8: U8) -> Extracted:
        frame = to_unit(frame_u8, self.dark_object)
        aligned, reg = self.registrar.front_end(frame, valid_region=self.spec.valid_region, local_px=self.spec.local_px)
        if reg.method == "none" and self.registrar.method != "none":
            self.unregistered += 1
        feats = token_features(self.reference, aligned, self.spec, self.kernels)
        # Back to the camera's polarity as uint8, rounded: 255 - 255 a, or 255 a (a is in [0, 1]: to_unit,
        # then a linear warp with replicated borders).
        alpha, beta = (-255.0, 255.0) if self.dark_object else (255.0, 0.0)
        aligned_u8 = np.asarray(cv2.convertScaleAbs(aligned, alpha=alpha, beta=beta), np.uint8)
        return Extracted(aligned_u8, feats, reg)


@dataclass(frozen=True)
class Detection:
    """The infer stage's result: verdict, worst-window score, threshold, and the filtered highlight.

    ``reason`` is set when the frame could not be scored (see ``unscored``): the verdict is then "fail"
    with ``UNSCORED_SCORE``, never a pass (fail safe)."""

    verdict: str
    score: float
    threshold: float
    highlight: HighlightResult
    window_scores: F32
    reason: str | None = None


# The score of a frame that could not be scored: the worst there is, so that it fails at any threshold.
UNSCORED_SCORE = 1.0


def nothing_highlighted(tokens_hw: tuple[int, int], frame_hw: tuple[int, int]) -> HighlightResult:
    """An empty highlight: no token kept, no pixel highlighted, no region."""
    return HighlightResult(np.zeros(tokens_hw, np.bool_), np.zeros(frame_hw, np.bool_), ())


def unscored(reason: str, threshold: float, tokens_hw: tuple[int, int], frame_hw: tuple[int, int]) -> Detection:
    """The fail-safe detection of a frame the model cannot score (``reason`` says why)."""
    empty = nothing_highlighted(tokens_hw, frame_hw)
    return Detection("fail", UNSCORED_SCORE, threshold, empty, np.zeros(0, np.float32), reason)


class Detector:
    """The ViT over all windows of a frame (one batch), the verdict, and the attention-filtered highlight."""

    def __init__(self, model: WindowModel, threshold: float | None = None) -> None:
        self.model = model
        card = model.card
        self.block = card.features.block
        self.grid = card.window.grid
        self.stride = card.window.stride
        self.threshold = card.threshold.value if threshold is None else threshold
        self.attention = card.highlight.attention
        self.magnitude = card.highlight.magnitude
        self.max_elongation = card.highlight.max_elongation
        self.min_area = card.highlight.min_area

    def detect(self, features: TokenFeatures) -> Detection:
        """The verdict on one frame's ``(h, w, C)`` float32 tokens. Fail safe: non-finite tokens, a model
        run that fails (``ModelError``) or outputs that are not finite give ``unscored`` (fail, with a reason)."""
        tokens = features.tokens_hwc
        grid_hw = (int(tokens.shape[0]), int(tokens.shape[1]))
        frame_hw = (int(features.open_diff_hw.shape[0]), int(features.open_diff_hw.shape[1]))
        finite = np.isfinite(tokens)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            reason = f"features: expected finite token values, found {bad} of {finite.size} NaN or infinite"
            return unscored(reason, self.threshold, grid_hw, frame_hw)
        layout = WindowLayout.cover(grid_hw, self.grid, self.stride)
        try:
            probs, attention = self.model.run(layout.cut(tokens))
        except ModelError as exc:
            return unscored(f"model run: {str(exc).removeprefix('model run: ')}", self.threshold, grid_hw, frame_hw)
        if not (np.isfinite(probs).all() and np.isfinite(attention).all()) or probs.size == 0:
            reason = f"model output: expected finite scores for {len(layout.origins)} windows, found NaN, inf or none"
            return unscored(reason, self.threshold, grid_hw, frame_hw)
        relevance = token_relevance(layout, probs, attention, self.threshold)
        token_score = layout.paste_window_scores(probs)
        found = highlight(
            tokens,
            relevance,
            Pieces.of(features.open_diff_hw) if relevance.any() else Pieces.none(features.open_diff_hw.shape),
            token_score,
            self.block,
            self.attention,
            self.magnitude,
            self.max_elongation,
            self.min_area,
        )
        score = float(probs.max())
        return Detection("fail" if score >= self.threshold else "pass", score, self.threshold, found, probs)


class Inspector:
    """Both halves back to back, for one reference: what ``evaluate`` runs for every pair."""

    def __init__(self, extractor: FeatureExtractor, detector: Detector) -> None:
        self.extractor = extractor
        self.detector = detector

    def inspect(self, frame_u8: U8) -> tuple[Extracted, Detection]:
        extracted = self.extractor.extract(frame_u8)
        return extracted, self.detector.detect(extracted.features)


def mask_png(mask_hw: npt.NDArray[np.bool_]) -> U8:
    """A highlight mask as a uint8 image (255 = highlighted), the format predictions.jsonl points to."""
    return (mask_hw.astype(np.uint8) * 255).astype(np.uint8)
