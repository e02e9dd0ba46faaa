"""Inspection manifests: JSON Lines of (reference, frame, label, boxes) pairs, as ARCHITECTURE.md defines.

``{"id": str, "reference": path, "frame": path, "label": "pass"|"fail",
   "boxes": [[x1, y1, x2, y2, type], ...], "group": str?, "kind": "crop"|"full"?}``

Paths are relative to the manifest file; boxes are inclusive pixel corners in the frame.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stream_service.errors import ImageReadError, InputError

Box = tuple[int, int, int, int, int]


class ManifestItem(BaseModel):
    """One reference/frame pair of a manifest."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str
    reference: Path
    frame: Path
    label: Literal["pass", "fail"]
    boxes: list[Box] = Field(default_factory=list)
    group: str | None = None
    kind: Literal["crop", "full"] | None = None

    @field_validator("boxes", mode="before")
    @classmethod
    def _boxes_with_type(cls, value: object) -> object:
        # Boxes may come without a defect type: 0 means "unknown".
        if isinstance(value, list):
            return [[*list(b), 0] if isinstance(b, list | tuple) and len(b) == 4 else b for b in value]
        return value


def load_manifest(path: Path) -> list[ManifestItem]:
    """Read a manifest; paths in the items are made absolute against the manifest's folder."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"manifest {path}: expected a readable JSON Lines file, found {exc.strerror}") from exc
    items: list[ManifestItem] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = ManifestItem.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"manifest {path} line {number}: expected a JSON object, found {exc.msg}") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InputError(f"manifest {path} line {number}: {where}: {first['msg']}") from exc
        if item.id in seen:
            raise InputError(f"manifest {path} line {number}: expected unique ids, found {item.id!r} twice")
        seen.add(item.id)
        base = path.parent
        items.append(item.model_copy(update={"reference": base / item.reference, "frame": base / item.frame}))
    if not items:
        raise InputError(f"manifest {path}: expected at least one pair, found none")
    return items


def read_gray(path: Path) -> np.ndarray:
    """An image file as a uint8 (H, W) gray array (colour files are converted)."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ImageReadError(f"image {path}: expected a readable image file, found none or undecodable data")
    return np.asarray(image, dtype=np.uint8)
