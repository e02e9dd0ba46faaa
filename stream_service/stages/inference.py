"""The infer stage: the ViT over a frame's token features, the verdict, the highlight and its JPEG.

``InferenceStage`` turns a features message (see ``stages.features``) into two messages:

- ``verdicts.<camera>``: a ``Verdict`` (the public contract): its ``verdict_id`` (UUIDv7) and ``time``,
  pass or fail, score and threshold, the model's and the reference's identity, the defect regions in
  captured-frame pixels, the latency of every stage and ``end_to_end`` (capture stamp to this publish),
  the frames of this camera dropped since the previous verdict, and the synthetic ground truth when the
  capture attached it;
- ``status.<camera>``: the camera's ``CameraStatus`` from its capture, passed on as it came;
- ``highlights.<camera>``: a ``Highlight`` whose ``jpeg`` payload is ``highlight.overlay`` of the
  registered frame (highlighted pixels, boxed regions), and with ``highlight.send_mask`` the raw mask
  ``(H, W)`` uint8 (255 = highlighted) as ``mask``.

Regions are found on the registered frame and moved by the registration, rounded to whole pixels, into
the pixels of the frame as captured, where an integrator's coordinates live; the picture and the mask
are moved by the same whole pixels, so a region's corners are where its box is drawn in the picture
(what the warp moved in from outside the frame is black). The verdict goes out first: the picture is
drawn and JPEG-encoded only when the runner asks for the second message (``VerdictThenPicture``), after
the verdict was published. The model is handed in (``model.py`` loads
it), so the stage runs with any ``WindowModel``, and tests use fakes.

What a peer sends is checked before the model sees it: the masks and the registered frame are ``(H, W)``
uint8 like the header's frame shape, the token grid is ``(H // block, W // block, C)`` float32 (a
message that is not is an ``InputError``, counted and dropped by the runner). Fail safe: a frame the
model cannot score (non-finite tokens or model outputs, a registration shift that is not finite or
exceeds ``max_shift_px``) gets a ``fail`` verdict with score 1.0 and its ``reason``, never a pass;
``unscored`` counts them by the reason's subject.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import overload

import cv2
import numpy as np

from stream_service.errors import InputError, MessageError
from stream_service.runtime.latency import latency_breakdown
from stream_service.runtime.runner import Outgoing
from stream_service.settings import HighlightSettings, InferenceSettings
from stream_service.vision.arrays import U8
from stream_service.vision.highlight import HighlightResult, overlay, translate
from stream_service.vision.highlight import Region as FoundRegion
from stream_service.vision.inspection import Detection, Detector, WindowModel, unscored
from stream_service.vision.soartc import grid_shape
from stream_service.vision.tokens import TokenFeatures
from stream_service.wire.messages import (
    FEATURES_ARRAYS,
    Array,
    CameraStatus,
    FeaturesHeader,
    Header,
    Part,
    Region,
    Verdict,
    VerdictIds,
    highlight_header,
    topic_of,
    utc_time,
)

STAGE = "infer"


def jpeg(image: U8, quality: int) -> bytes:
    """JPEG bytes of a uint8 ``(H, W)`` or ``(H, W, 3)`` BGR image."""
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise InputError(f"highlight image: expected an image JPEG can encode, found {image.dtype} {image.shape}")
    return bytes(encoded)


def frame_offset(dx: float, dy: float) -> tuple[int, int]:
    """The whole-pixel move from registered-frame to captured-frame pixels (content lies at reference
    position + (dx, dy)): applied alike to the regions and to the picture."""
    return round(dx), round(dy)


def to_frame_regions(found: Sequence[FoundRegion], dx: float, dy: float, shape: tuple[int, ...]) -> tuple[Region, ...]:
    """Regions found on the registered frame, moved by the registration ``(dx, dy)`` into captured-frame
    pixels (the frame's content lies at reference position + (dx, dy)) and clipped to the ``(H, W)`` frame."""
    h, w = shape[0], shape[1]
    ox, oy = frame_offset(dx, dy)
    out = []
    for r in found:
        x1, x2 = min(max(r.x1 + ox, 0), w - 1), min(max(r.x2 + ox, 0), w - 1)
        y1, y2 = min(max(r.y1 + oy, 0), h - 1), min(max(r.y2 + oy, 0), h - 1)
        out.append(Region(x1=x1, y1=y1, x2=x2, y2=y2, score=float(r.score), area=int(r.area)))
    return tuple(out)


class VerdictThenPicture(Sequence[Outgoing]):
    """The infer stage's two messages, the verdict first; the highlight picture is drawn and encoded on
    first access to the second (the runner sends the verdict before it asks for the picture)."""

    def __init__(self, verdict: Outgoing, picture: Callable[[], Outgoing]) -> None:
        self._verdict, self._make = verdict, picture
        self._picture: Outgoing | None = None

    def __len__(self) -> int:
        return 2

    @overload
    def __getitem__(self, index: int) -> Outgoing: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Outgoing]: ...
    def __getitem__(self, index: int | slice) -> Outgoing | Sequence[Outgoing]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(2))]
        if index in (0, -2):
            return self._verdict
        if index not in (1, -1):
            raise IndexError(index)
        if self._picture is None:
            self._picture = self._make()
        return self._picture


class InferenceStage:
    """The ViT, the verdict and the highlight for every features message (see the module docstring)."""

    name = STAGE

    def __init__(
        self,
        model: WindowModel,
        inference: InferenceSettings,
        highlight: HighlightSettings,
        clock_ns: Callable[[], int] = time.time_ns,
        verdict_ids: VerdictIds | None = None,
        max_shift_px: float | None = None,
        frame_shapes: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        """``max_shift_px``: the largest registration shift the soartc stage accepts (``soartc.max_shift_px``);
        a frame said to be shifted further was not registered (None: any finite shift within the frame).
        ``frame_shapes``: the ``(H, W)`` of the cameras whose frame size the settings fix; their features
        must be of that size (the work of a frame grows with its size: a peer does not choose it)."""
        self.detector = Detector(model, threshold=inference.threshold)
        self.max_shift_px = max_shift_px
        self.frame_shapes = dict(frame_shapes or {})
        self.unscored: Counter[str] = Counter()
        self.model_id = model.card.name
        self.model_version = model.card.version
        self.channels = len(model.card.features.channels)
        self.highlight = highlight
        self._clock_ns = clock_ns
        self._ids = verdict_ids if verdict_ids is not None else VerdictIds()
        self._lost: Counter[str] = Counter()

    def warm_up(self) -> None:
        """Run the model once on an empty window (ONNX Runtime's first run allocates and plans)."""
        card = self.detector.model.card
        grid = card.window.grid
        self.detector.model.run(np.zeros((1, grid, grid, self.channels), np.float32))

    def process(self, topic: str, header: Header, arrays: list[Array]) -> Sequence[Outgoing]:
        if isinstance(header, CameraStatus):
            return [(topic, header, [])]  # published as status.<camera> for subscribers and dashboards
        if not isinstance(header, FeaturesHeader):
            raise MessageError(f"message kind: expected 'features' on {topic[:80]!r}, found {header.kind!r}")
        try:
            try:
                verdict, aligned, found = self._inspect(header, arrays)
            except cv2.error as exc:  # translated at the edge: the runner counts project errors by type
                raise InputError(
                    f"features of camera {header.camera_id}: expected arrays OpenCV can process, "
                    f"found {type(exc).__name__}: {str(exc)[:200]}"
                ) from exc
        except Exception:  # counted by the runner, whatever it is
            # This frame and the drops it carried never get a verdict: report them with the next one.
            self._lost[header.camera_id] += 1 + header.dropped
            raise
        offset = frame_offset(header.registration.dx, header.registration.dy) if verdict.reason is None else (0, 0)
        return VerdictThenPicture(
            (topic_of(verdict), verdict, []), lambda: self._picture(verdict, aligned, found, offset)
        )

    def _picture(self, verdict: Verdict, aligned: U8, found: HighlightResult, offset: tuple[int, int]) -> Outgoing:
        """The highlight message of ``verdict``: the overlay on the registered frame, moved into captured-frame
        pixels by ``offset`` like the verdict's regions, as JPEG (and the mask, when asked for)."""
        style = self.highlight
        drawn = overlay(
            aligned,
            found.mask_hw,
            found.regions,
            verdict.verdict == "fail",
            color_bgr=style.color_bgr,
            alpha=style.alpha,
            draw_boxes=style.draw_boxes,
            box_thickness=style.box_thickness,
        )
        picture = jpeg(translate(drawn, *offset), style.jpeg_quality)
        mask = translate(found.mask_hw.astype(np.uint8) * 255, *offset) if style.send_mask else None
        highlight = highlight_header(verdict, picture, mask)
        payload: list[Part | Array] = [picture] if mask is None else [picture, mask]
        return topic_of(highlight), highlight, payload

    def _inspect(self, header: FeaturesHeader, arrays: list[Array]) -> tuple[Verdict, U8, HighlightResult]:
        named = {spec.name: array for spec, array in zip(header.arrays, arrays, strict=True)}
        missing = [name for name in FEATURES_ARRAYS if name not in named]
        if missing:
            raise MessageError(f"features arrays: expected {list(FEATURES_ARRAYS)}, found {sorted(named)}")
        aligned, tokens = named["aligned"], named["tokens"]
        frame_hw = (header.shape[0], header.shape[1])
        configured = self.frame_shapes.get(header.camera_id)
        if configured is not None and frame_hw != configured:
            raise InputError(
                f"features frame shape of camera {header.camera_id}: expected {configured} as configured, "
                f"found {frame_hw}"
            )
        if aligned.dtype != np.uint8 or aligned.shape != frame_hw:
            raise InputError(
                f"features 'aligned' of camera {header.camera_id}: expected {frame_hw} uint8 like the frame, "
                f"found {aligned.shape} {aligned.dtype}"
            )
        masks = [named["open_diff"], named["diff"]]
        if any(m.dtype != np.uint8 or m.shape != aligned.shape for m in masks):
            raise InputError(
                f"features masks of camera {header.camera_id}: expected uint8 (H, W) like 'aligned' {aligned.shape}, "
                f"found {masks[0].shape} {masks[0].dtype} and {masks[1].shape} {masks[1].dtype}"
            )
        grid = (*grid_shape(aligned.shape, self.detector.block), self.channels)
        if tokens.shape != grid or tokens.dtype != np.float32 or 0 in grid:
            raise InputError(
                f"features 'tokens' of camera {header.camera_id}: expected {grid} float32 for a {frame_hw} frame "
                f"in blocks of {self.detector.block}, found {tokens.shape} {tokens.dtype}"
            )
        reg = header.registration
        shift_failed = self._registration_failure(reg.dx, reg.dy, frame_hw)
        if shift_failed is not None:
            detection = unscored(shift_failed, self.detector.threshold, grid[:2], frame_hw)
        else:
            detection = self.detector.detect(TokenFeatures(tokens, masks[0], masks[1]))
        if detection.reason is not None:
            self.unscored[detection.reason.split(":", 1)[0]] += 1
        return self._verdict(header, detection), aligned, detection.highlight

    def _registration_failure(self, dx: float, dy: float, frame_hw: tuple[int, ...]) -> str | None:
        """Why the registration ``(dx, dy)`` cannot be trusted, or None."""
        bound = self.max_shift_px if self.max_shift_px is not None else float(max(frame_hw))
        # Translation and affine registration both keep every frame corner within max_shift_px, so the
        # translation part (the corner at the origin) does; a hair of rounding is tolerated.
        if math.isfinite(dx) and math.isfinite(dy) and max(abs(dx), abs(dy)) <= bound + 1e-3:
            return None
        return f"registration: expected a finite shift of at most {bound:g} px, found dx={dx:g}, dy={dy:g}"

    def _verdict(self, header: FeaturesHeader, detection: Detection) -> Verdict:
        found = detection.highlight
        failed = detection.verdict == "fail"
        reg = header.registration
        now_ns = self._clock_ns()
        return Verdict(
            verdict_id=self._ids.new(now_ns),
            time=utc_time(now_ns),
            camera_id=header.camera_id,
            seq=header.seq,
            capture_ns=header.capture_ns,
            verdict="fail" if failed else "pass",
            score=detection.score,
            threshold=detection.threshold,
            model_id=self.model_id,
            model_version=self.model_version,
            reference_id=header.reference_id or "unknown",
            reference_version=header.reference_version or "unknown",
            regions=to_frame_regions(found.regions, reg.dx, reg.dy, header.shape),
            latency_ms=latency_breakdown(header.stamps, now_ns, stage=STAGE),
            dropped=header.dropped + self._lost.pop(header.camera_id, 0),
            truth=header.truth,
            reason=detection.reason,
        )
