"""The soartc stage: each frame registered to its camera's golden reference, and its SOARTC token features.

``FeaturesStage`` holds one ``inspection.FeatureExtractor`` per camera and turns a frame message into a
features message ``features.<camera>`` (its payload: ``wire.messages.FEATURES_ARRAYS``).

Tokens stay float32: they are small next to the frame (640x640 with 16-px blocks: 150 kB against 400 kB
of masks and frame), and float16 would make the live verdicts differ from ``evaluate``'s in process.

The feature definition (block, variant, calibration, openings) is the model card's, so that the soartc
stage computes exactly what the model was trained on; this stage never loads the model itself (no ONNX
Runtime here). The reference of a camera is its ``reference`` directory, or for the synthetic camera
its clean render, recomputed from the source settings (same seed, same board): no files needed.

A frame of the wrong size or type raises ``FrameShapeError``; the runner counts it and goes on. Frames
lost to such errors are added to the ``dropped`` count of the camera's next features message.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from stream_service.errors import (
    FrameShapeError,
    GoldenReferenceError,
    InputError,
    MessageError,
    RegistrationError,
)
from stream_service.model.references import load_reference
from stream_service.runtime.runner import Outgoing
from stream_service.settings import CameraSettings, Settings, SyntheticSource
from stream_service.sources.camera import synthetic_camera
from stream_service.vision.arrays import U8
from stream_service.vision.inspection import FeatureExtractor
from stream_service.vision.soartc import Device
from stream_service.vision.tokens import FeatureSpec
from stream_service.wire.messages import (
    FEATURES_ARRAYS,
    Array,
    ArraySpec,
    CameraStatus,
    FeaturesHeader,
    FrameHeader,
    Header,
    Registration,
    topic_of,
)

log = logging.getLogger(__name__)

STAGE = "soartc"


@dataclass(frozen=True)
class CameraReference:
    """A camera's golden reference: raw gray ``(H, W)`` uint8 (polarity not applied), polarity, identity."""

    image_hw: U8
    dark_object: bool
    reference_id: str
    version: str


def synthetic_reference(source: SyntheticSource) -> U8:
    """The synthetic camera's clean render ``(H, W)`` uint8: pure, the same settings give the same board."""
    return synthetic_camera(source).reference()


def camera_reference(camera: CameraSettings) -> CameraReference:
    """The reference of ``camera``: its ``reference`` directory, else the synthetic source's clean render.

    A stored reference's own polarity wins over the camera's ``polarity`` (a mismatch is logged), since
    it records how the reference was built. With ``frame_size`` set, the synthetic render is resized to it.
    """
    shape = camera.frame_shape
    if camera.reference is not None:
        try:
            reference = load_reference(camera.reference, expected_shape=shape)
        except GoldenReferenceError as exc:
            raise GoldenReferenceError(f"camera {camera.id}: {exc}. {_make_one(camera.id)}") from exc
        meta = reference.meta
        if meta.polarity != camera.polarity:
            log.warning(
                "camera %s: polarity %s in the settings, but reference %s v%d is %s; using the reference's",
                camera.id,
                camera.polarity,
                meta.id,
                meta.version,
                meta.polarity,
            )
        image = np.clip(np.rint(reference.image * 255.0), 0, 255).astype(np.uint8)
        return CameraReference(image, meta.polarity == "dark-object", meta.id, str(meta.version))
    if not isinstance(camera.source, SyntheticSource):
        raise GoldenReferenceError(
            f"camera {camera.id}: expected a reference directory (cameras[].reference), found none. "
            + _make_one(camera.id)
        )
    source = camera.source
    image = synthetic_reference(source)
    if shape is not None and image.shape != shape:
        image = np.asarray(cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA), np.uint8)
    reference_id = f"synthetic-seed{source.seed}-{source.width}x{source.height}"
    return CameraReference(image, camera.polarity == "dark-object", reference_id, "1")


def _make_one(camera_id: str) -> str:
    return (
        f"Make one from good parts on the line: stream-service reference grab --config FILE --camera {camera_id} "
        "(or from images: stream-service reference build GOOD.png ... --out DIR)"
    )


@dataclass(frozen=True)
class CameraFeatures:
    """What the stage keeps for one camera: its extractor and its reference's identity."""

    extractor: FeatureExtractor
    reference: CameraReference


class FeaturesStage:
    """Registration and SOARTC token features for every camera it was built for (see the module docstring)."""

    name = STAGE

    def __init__(self, cameras: Mapping[str, CameraFeatures]) -> None:
        self.cameras = dict(cameras)
        self._lost: Counter[str] = Counter()

    @classmethod
    def from_settings(
        cls, settings: Settings, spec: FeatureSpec, camera_ids: Sequence[str] | None = None
    ) -> FeaturesStage:
        """One extractor per camera of ``settings`` (or of ``camera_ids``), with the model card's ``spec``."""
        soartc = settings.soartc
        device: Device = soartc.device
        cameras = {}
        for camera in settings.cameras:
            if camera_ids is not None and camera.id not in camera_ids:
                continue
            reference = camera_reference(camera)
            extractor = FeatureExtractor(
                reference.image_hw,
                spec,
                reference.dark_object,
                registration=soartc.registration,
                max_shift=soartc.max_shift_px,
                device=device,
            )
            cameras[camera.id] = CameraFeatures(extractor, reference)
        return cls(cameras)

    def warm_up(self) -> None:
        """Register and compare each camera's reference with itself once: compiles the Numba kernels and
        fills the caches before the first frame, so that it is not counted as a slow one (or a drop)."""
        for camera in self.cameras.values():
            camera.extractor.extract(camera.reference.image_hw)
            camera.extractor.unregistered = 0

    def process(self, topic: str, header: Header, arrays: list[Array]) -> Sequence[Outgoing]:
        if isinstance(header, CameraStatus) and header.camera_id in self.cameras:
            return [(topic, header, [])]  # a camera's health travels on to the infer stage, unchanged
        if not isinstance(header, FrameHeader):
            raise MessageError(f"message kind: expected 'frame' on {topic[:80]!r}, found {header.kind!r}")
        camera = self.cameras.get(header.camera_id)
        if camera is None:
            raise MessageError(f"camera_id: expected one of {sorted(self.cameras)}, found {header.camera_id!r}")
        try:
            frame = arrays[0]
            expected = camera.extractor.shape
            if frame.dtype != np.uint8 or frame.shape != expected:
                raise FrameShapeError(
                    f"frame {header.seq} of camera {header.camera_id}: expected {tuple(expected)} uint8 like reference "
                    f"{camera.reference.reference_id}, found {frame.shape} {frame.dtype}"
                )
            try:
                extracted = camera.extractor.extract(frame)
            except cv2.error as exc:  # translated at the edge: the runner counts project errors by type
                raise InputError(
                    f"frame {header.seq} of camera {header.camera_id}: expected a frame OpenCV can register, "
                    f"found {type(exc).__name__}: {str(exc)[:200]}"
                ) from exc
            reg = extracted.registration
            if not all(math.isfinite(v) for v in (reg.dx, reg.dy, reg.confidence)):
                raise RegistrationError(
                    f"registration of frame {header.seq} of camera {header.camera_id}: expected finite dx, dy "
                    f"and confidence, found {reg.dx}, {reg.dy}, {reg.confidence}"
                )
        except Exception:
            # This frame and the drops it carried never reach a verdict: report them with the next one
            # (the runner counts the error, whatever it is, and goes on).
            self._lost[header.camera_id] += 1 + header.dropped
            raise
        features = extracted.features
        payload: list[Array] = [
            extracted.aligned_hw,
            np.ascontiguousarray(features.tokens_hwc, np.float32),
            features.open_diff_hw,
            features.diff_hw,
        ]
        out = FeaturesHeader(
            camera_id=header.camera_id,
            seq=header.seq,
            capture_ns=header.capture_ns,
            shape=header.shape,
            dtype=header.dtype,
            stamps=header.stamps,
            dropped=header.dropped + self._lost.pop(header.camera_id, 0),
            truth=header.truth,
            reference_id=camera.reference.reference_id,
            reference_version=camera.reference.version,
            arrays=tuple(
                ArraySpec.model_validate({"name": name, "shape": a.shape, "dtype": str(a.dtype)})
                for name, a in zip(FEATURES_ARRAYS, payload, strict=True)
            ),
            registration=Registration(dx=reg.dx, dy=reg.dy, confidence=reg.confidence),
        )
        return [(topic_of(out), out, payload)]
