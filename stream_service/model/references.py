"""Golden references: build (register + average good frames), store, load.

A reference is a directory of two files:

- ``reference.png``: the mean of the registered frames, raw gray as captured (polarity NOT applied),
  as a 16-bit single-channel PNG, value = round(65535 * mean), so averaging keeps its precision;
- ``reference.json``: ``ReferenceMeta`` (format_version 1): id, version, created (ISO 8601 UTC),
  frame_count, sources ({path, sha256} of each frame file), polarity, shape [H, W], registration
  method, max_shift_px (the largest displacement applied to a frame) and image_sha256, the sha256
  of the decoded pixels (uint16, little-endian, row-major), so a re-encoded but identical image still
  matches and any edit to the pixels does not.

The polarity is applied when the reference is handed to a kernel (``Reference.unit()``), the same way
frames are converted with ``soartc.to_unit``. ``build_reference`` and ``average_registered`` are pure;
``save_reference``, ``load_reference`` and ``build_reference_from_files`` do the file I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from stream_service.errors import (
    FrameShapeError,
    GoldenReferenceError,
    ImageReadError,
    InputError,
    RegistrationError,
)
from stream_service.vision.arrays import F32, U16
from stream_service.vision.registration import (
    DEFAULT_MAX_SHIFT,
    DEFAULT_MIN_CONFIDENCE,
    Method,
    Registrar,
    Registration,
    as_unit,
)
from stream_service.vision.soartc import to_unit

Polarity = Literal["bright-object", "dark-object"]

FORMAT_VERSION: Literal[1] = 1
IMAGE_FILE = "reference.png"
META_FILE = "reference.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SHA256 = r"^[0-9a-f]{64}$"


class SourceFrame(BaseModel):
    """One frame file a reference was averaged from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    sha256: str = Field(pattern=_SHA256)


class ReferenceMeta(BaseModel):
    """The ``reference.json`` file format (version 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    id: str = Field(min_length=1)
    version: int = Field(ge=1)
    created: AwareDatetime
    frame_count: int = Field(ge=1)
    sources: tuple[SourceFrame, ...] = ()
    polarity: Polarity
    shape: tuple[int, int]
    registration: Method
    max_shift_px: float = Field(ge=0.0)
    image_sha256: str = Field(pattern=_SHA256)

    @model_validator(mode="after")
    def _consistent(self) -> ReferenceMeta:
        if min(self.shape) < 1:
            raise ValueError(f"shape: expected two positive sizes [H, W], found {list(self.shape)}")
        if self.sources and len(self.sources) != self.frame_count:
            raise ValueError(f"sources: expected frame_count={self.frame_count} entries, found {len(self.sources)}")
        return self


@dataclass(frozen=True, eq=False)
class Reference:
    """A golden reference: image (H, W) float32 in [0, 1], raw gray (polarity not applied), and metadata.

    The image holds exactly the values stored in the 16-bit PNG (multiples of 1/65535).
    """

    image: F32
    meta: ReferenceMeta

    def unit(self) -> F32:
        """(H, W) float32 in [0, 1] with the polarity applied: the reference as SOARTC takes it."""
        return to_unit(self.image, dark_object=self.meta.polarity == "dark-object")


def quantize(image_hw: F32) -> U16:
    """(H, W) float32 in [0, 1] -> (H, W) uint16, round(65535 * clip(x, 0, 1))."""
    return np.asarray(np.rint(np.clip(image_hw, 0.0, 1.0) * 65535.0), np.uint16)


def pixels_sha256(image_u16: U16) -> str:
    """sha256 hex digest of (H, W) uint16 pixels, little-endian, row-major."""
    return hashlib.sha256(np.ascontiguousarray(image_u16, dtype="<u2").tobytes()).hexdigest()


def average_registered(
    frames: Sequence[npt.NDArray[np.generic]],
    *,
    registration: Method = "translation",
    max_shift: float = DEFAULT_MAX_SHIFT,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    names: Sequence[str] | None = None,
) -> tuple[F32, list[Registration]]:
    """Register frames 2..N to the first and average them.

    Args:
        frames: N >= 1 gray (H, W) frames, float32 in [0, 1] (or uint8/uint16).
        names: how errors name each frame (file paths); "frame <i>" by default.

    Returns:
        (mean (H, W) float32 in [0, 1], the N registrations; the first is the identity).
    """
    if not frames:
        raise InputError("reference frames: expected at least 1 frame, found 0")
    labels = list(names) if names is not None else [f"frame {i}" for i in range(len(frames))]
    first = as_unit(frames[0], labels[0])
    registrar = Registrar(first, registration, max_shift=max_shift, min_confidence=min_confidence)
    total = first.astype(np.float64)
    registrations = [Registration(0.0, 0.0, 1.0, registration)]
    for label, frame in zip(labels[1:], frames[1:], strict=True):
        unit = as_unit(frame, label)
        if unit.shape != first.shape:
            raise FrameShapeError(
                f"reference frame {label}: expected the first frame's shape {first.shape}, found {unit.shape}"
            )
        try:
            aligned, reg = registrar.register(unit)
        except (InputError, RegistrationError) as exc:
            raise type(exc)(f"reference frame {label}: {exc}") from exc
        total += aligned
        registrations.append(reg)
    return (total / len(frames)).astype(np.float32), registrations


def build_reference(
    frames: Sequence[npt.NDArray[np.generic]],
    *,
    reference_id: str,
    version: int = 1,
    polarity: Polarity = "bright-object",
    registration: Method = "translation",
    max_shift: float = DEFAULT_MAX_SHIFT,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    sources: Sequence[SourceFrame] = (),
    names: Sequence[str] | None = None,
    created: datetime | None = None,
) -> Reference:
    """A golden reference from N good (H, W) frames (registered to the first, averaged, quantised).

    ``created`` defaults to now (UTC); pass it for reproducible metadata.
    """
    mean, registrations = average_registered(
        frames, registration=registration, max_shift=max_shift, min_confidence=min_confidence, names=names
    )
    pixels = quantize(mean)
    try:
        meta = ReferenceMeta(
            id=reference_id,
            version=version,
            created=(created or datetime.now(UTC)).astimezone(UTC),
            frame_count=len(frames),
            sources=tuple(sources),
            polarity=polarity,
            shape=(int(mean.shape[0]), int(mean.shape[1])),
            registration=registration,
            max_shift_px=round(max(r.max_displacement(mean.shape) for r in registrations), 4),
            image_sha256=pixels_sha256(pixels),
        )
    except ValidationError as exc:
        raise InputError(f"golden reference metadata: {_describe(exc)}") from exc
    return Reference(image=_from_u16(pixels), meta=meta)


def _from_u16(pixels: U16) -> F32:
    image = pixels.astype(np.float32) * np.float32(1 / 65535)
    image.setflags(write=False)
    return image


def save_reference(reference: Reference, out_dir: Path) -> Path:
    """Write ``reference.png`` (16-bit) and ``reference.json`` into out_dir (created); returns out_dir."""
    pixels = quantize(reference.image)
    if pixels_sha256(pixels) != reference.meta.image_sha256:
        raise GoldenReferenceError(
            f"golden reference {reference.meta.id}: expected an image matching its metadata sha256, found another"
        )
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise GoldenReferenceError(f"golden reference {reference.meta.id}: OpenCV could not encode the 16-bit PNG")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / IMAGE_FILE).write_bytes(encoded.tobytes())
        # Metadata last: a directory with a valid reference.json holds a complete reference.
        tmp = out_dir / (META_FILE + ".tmp")
        tmp.write_text(reference.meta.model_dump_json(indent=2) + "\n", encoding="utf-8")
        tmp.replace(out_dir / META_FILE)
    except OSError as exc:
        raise GoldenReferenceError(f"golden reference directory {out_dir}: expected writable, found {exc}") from exc
    return out_dir


def reference_shape(directory: Path) -> tuple[int, int] | None:
    """The (H, W) a reference directory's metadata records; None when it cannot be read (``load_reference``
    says why, where the reference is really loaded)."""
    try:
        return ReferenceMeta.model_validate_json((directory / META_FILE).read_text(encoding="utf-8")).shape
    except (OSError, UnicodeDecodeError, ValidationError):
        return None


def load_reference(directory: Path, expected_shape: tuple[int, int] | None = None) -> Reference:
    """Read and validate a reference directory.

    Checks: both files present, the JSON valid against ReferenceMeta, the image a 16-bit single-channel
    PNG whose pixels' sha256 and shape match the metadata, and (when given) the shape equal to
    ``expected_shape`` (H, W), the camera's frame size. Raises GoldenReferenceError naming what failed.
    """
    meta_path, image_path = directory / META_FILE, directory / IMAGE_FILE
    for path in (meta_path, image_path):
        if not path.is_file():
            raise GoldenReferenceError(f"golden reference {directory}: expected the file {path.name}, found none")
    try:
        meta_text = meta_path.read_text(encoding="utf-8")
        image_bytes = image_path.read_bytes()
    except (OSError, UnicodeDecodeError) as exc:
        raise GoldenReferenceError(f"golden reference {directory}: expected readable files, found {exc}") from exc
    try:
        meta = ReferenceMeta.model_validate_json(meta_text)
    except ValidationError as exc:
        raise GoldenReferenceError(f"golden reference {meta_path}: {_describe(exc)}") from exc
    decoded = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16 or decoded.ndim != 2:
        found = "an undecodable file" if decoded is None else f"dtype {decoded.dtype}, shape {decoded.shape}"
        raise GoldenReferenceError(
            f"golden reference {image_path}: expected a 16-bit single-channel PNG, found {found}"
        )
    pixels: U16 = np.asarray(decoded, np.uint16)
    digest = pixels_sha256(pixels)
    if digest != meta.image_sha256:
        raise GoldenReferenceError(
            f"golden reference {image_path}: expected pixels with sha256 {meta.image_sha256} (from {META_FILE}), "
            f"found {digest}; the image was modified or belongs to another reference"
        )
    if tuple(pixels.shape) != meta.shape:
        raise GoldenReferenceError(
            f"golden reference {image_path}: expected shape {meta.shape} (from {META_FILE}), found {pixels.shape}"
        )
    if expected_shape is not None and tuple(expected_shape) != meta.shape:
        raise GoldenReferenceError(
            f"golden reference {meta.id} v{meta.version}: expected the camera's frame shape (H, W) = "
            f"{tuple(expected_shape)}, found {meta.shape}"
        )
    return Reference(image=_from_u16(pixels), meta=meta)


def _describe(exc: ValidationError) -> str:
    """'field.path: message (found value)' for each error of a pydantic ValidationError."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(document)"
        found = "" if err["type"] == "json_invalid" else f" (found {err.get('input')!r})"
        parts.append(f"{field}: {err['msg']}{found}")
    return "; ".join(parts)


def read_gray(path: Path) -> tuple[npt.NDArray[np.generic], str]:
    """(an image file as a gray (H, W) uint8 or uint16 array, the sha256 of the file's bytes).

    Pixels and hash come from the same bytes. Raises ImageReadError naming the path.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"image {path}: expected a readable image file, found {exc.strerror or exc}") from exc
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise ImageReadError(f"image {path}: expected an image OpenCV can decode, found {len(data)} undecodable bytes")
    return np.asarray(image), hashlib.sha256(data).hexdigest()


def frame_paths(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly, or found (sorted, by suffix) in the folders named."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            paths.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        else:
            paths.append(item)
    return paths


def build_reference_from_files(
    paths: Sequence[Path],
    out_dir: Path,
    *,
    polarity: Polarity = "bright-object",
    reference_id: str | None = None,
    version: int = 1,
    registration: Method = "translation",
    max_shift: float = DEFAULT_MAX_SHIFT,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> Reference:
    """Read good frames (gray), build a reference from them and save it into out_dir.

    The id defaults to out_dir's name. Raises InputError for zero files, ImageReadError for an
    unreadable file, FrameShapeError for a frame whose size differs from the first one's.
    """
    if not paths:
        raise InputError("reference frames: expected at least 1 image file, found 0")
    frames: list[npt.NDArray[np.generic]] = []
    sources: list[SourceFrame] = []
    for path in paths:
        image, digest = read_gray(path)
        if frames and image.shape != frames[0].shape:
            (h0, w0), (h, w) = frames[0].shape, image.shape
            raise FrameShapeError(
                f"reference frame {path}: expected size {w0}x{h0} (W x H) like {paths[0]}, found {w}x{h}"
            )
        frames.append(image)
        sources.append(SourceFrame(path=str(path), sha256=digest))
    reference = build_reference(
        frames,
        reference_id=reference_id or out_dir.resolve().name,
        version=version,
        polarity=polarity,
        registration=registration,
        max_shift=max_shift,
        min_confidence=min_confidence,
        sources=sources,
        names=[str(p) for p in paths],
    )
    save_reference(reference, out_dir)
    return reference
