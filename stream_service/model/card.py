"""The model card: the JSON file that travels with an ONNX model and defines how to feed and read it.

It holds the feature definition the model was trained with (block size, polarity, SOARTC variant,
calibration constants and gain), the window geometry, the shipped threshold and how it was chosen, the
highlight filter's thresholds, the training data and its licence, the validation figures, and the
sha256 of the ONNX file. Loading checks the card's schema and the model file's hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_service.errors import ModelError
from stream_service.vision.refinement import LOCAL_MAX_PX
from stream_service.vision.soartc import Calibration
from stream_service.vision.tokens import CHANNEL_NAMES, FeatureSpec

CARD_FORMAT = 1
CARD_NAME = "card.json"
ONNX_NAME = "model.onnx"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CalibrationCard(_Frozen):
    constants: tuple[float, float, float]
    gain: float
    method: str

    def to_calibration(self) -> Calibration:
        return Calibration(self.constants, self.gain, self.method)


class FeaturesCard(_Frozen):
    block: Literal[8, 16]
    variant: Literal["v1.1", "v1", "soart2"]
    polarity: Literal["dark-object", "bright-object"]
    channels: list[str]
    calibration: CalibrationCard
    sub_calibration: CalibrationCard
    diff_threshold: float = Field(gt=0, lt=1)
    open_px: int = Field(ge=1)
    open_large_px: int = Field(ge=2)
    registration: Literal["translation", "affine", "none"] | None = Field(
        None, description="the registration the model's figures were measured with; None: not recorded"
    )
    valid_region: bool = False
    tolerance_px: int = Field(0, ge=0, le=2, description="edge-jitter tolerance of the features, in pixels")
    highlight_tolerance_px: int | None = Field(
        None, ge=0, le=2, description="edge-jitter tolerance of the highlight's pixel masks; None: tolerance_px"
    )
    local_px: int = Field(
        0, ge=0, le=LOCAL_MAX_PX, description="local refinement of the registration: tile shifts up to N px; 0: none"
    )

    def to_spec(self) -> FeatureSpec:
        return FeatureSpec(
            block=self.block,
            variant=self.variant,
            calibration=self.calibration.to_calibration(),
            sub_calibration=self.sub_calibration.to_calibration(),
            diff_threshold=self.diff_threshold,
            open_px=self.open_px,
            open_large_px=self.open_large_px,
            registration=self.registration,
            valid_region=self.valid_region,
            tolerance_px=self.tolerance_px,
            highlight_tolerance_px=self.highlight_tolerance_px,
            local_px=self.local_px,
        )


class WindowCard(_Frozen):
    grid: int = Field(ge=1, description="window side in tokens")
    stride: int = Field(ge=1, description="distance between window origins in tokens")
    pixels: int = Field(ge=1, description="window side in pixels = grid * block")


class ThresholdCard(_Frozen):
    value: float = Field(ge=0, le=1, description="fail when the worst window's fail probability is >= value")
    chosen_by: str


class HighlightCard(_Frozen):
    attention: float = Field(ge=0, description="attention relative to uniform (attention * tokens) to keep a token")
    magnitude: float = Field(ge=0, le=1, description="SOARTC magnitude (max of the mosaic channels) to keep a token")
    max_elongation: float = Field(gt=0, description="longest side / thickness above which a piece is not shown")
    min_area: int = Field(ge=0, description="pieces smaller than this (pixels) are not shown")
    source: Literal["last-layer", "rollout"] = "last-layer"
    chosen_by: str


class ModelCard(_Frozen):
    """Schema of ``card.json``."""

    format: Literal[1] = 1
    name: str
    version: str
    created: str
    onnx: str = ONNX_NAME
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: dict[str, str]
    outputs: dict[str, str]
    features: FeaturesCard
    window: WindowCard
    threshold: ThresholdCard
    highlight: HighlightCard
    architecture: dict[str, Any]
    training: dict[str, Any]
    validation: dict[str, Any]
    experiments: list[dict[str, Any]] = Field(default_factory=list)


def default_model_dir(name: str = "soartc-vit") -> Path:
    """The bundled model: inside the installed package (wheel) or in the checkout's ``models/``."""
    packaged = Path(__file__).resolve().parent.parent / "models" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "models" / name


def resolve_model_dir(path: Path) -> Path:
    """A configured model path: as given when it exists, else the bundled model of that name."""
    if path.is_dir() or path.is_absolute():
        return path
    bundled = default_model_dir(path.name)
    return bundled if bundled.is_dir() else path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_card(model_dir: Path) -> ModelCard:
    """Read and validate ``model_dir/card.json`` and check the ONNX file's sha256 against it."""
    card_path = model_dir / CARD_NAME
    if not card_path.is_file():
        raise ModelError(f"model card: expected {card_path}, found no such file (is the model path right?)")
    try:
        card = ModelCard.model_validate(json.loads(card_path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelError(f"model card {card_path}: expected JSON, found {exc.msg} at line {exc.lineno}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelError(f"model card {card_path}: {where}: {first['msg']} (found {first.get('input')!r})") from exc
    if tuple(card.features.channels) != CHANNEL_NAMES:
        raise ModelError(
            f"model card {card_path}: features.channels: expected {list(CHANNEL_NAMES)}, found {card.features.channels}"
        )
    if card.window.pixels != card.window.grid * card.features.block:
        raise ModelError(
            f"model card {card_path}: window.pixels: expected grid * block = "
            f"{card.window.grid * card.features.block}, found {card.window.pixels}"
        )
    onnx_path = model_dir / card.onnx
    if not onnx_path.is_file():
        raise ModelError(f"model file: expected {onnx_path} (named by {card_path}), found no such file")
    actual = file_sha256(onnx_path)
    if actual != card.sha256:
        raise ModelError(f"model file {onnx_path}: expected sha256 {card.sha256} (from the card), found {actual}")
    return card
