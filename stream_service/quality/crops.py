"""Evaluation manifests of crops and full frames, made the way the DeepPCB README describes.

Fail crops contain at least one whole defect box; pass crops come within ``margin`` px of no box and
hold some copper. Full frames are listed as they are (``kind: "full"``). Crops are written as PNG files
next to the new manifest, never into the repository.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from stream_service.quality.manifest import Box, ManifestItem, read_gray
from stream_service.quality.metrics import MARGIN_PX


def box_inside(box: Box, x0: int, y0: int, size: int) -> bool:
    """Whether ``box`` (inclusive corners) lies wholly inside the ``size`` square at (x0, y0)."""
    return box[0] >= x0 and box[1] >= y0 and box[2] <= x0 + size - 1 and box[3] <= y0 + size - 1


def box_near(box: Box, x0: int, y0: int, size: int, margin: int = MARGIN_PX) -> bool:
    """Whether ``box`` comes within ``margin`` px of the ``size`` square at (x0, y0) (overlap included)."""
    return (
        box[2] + margin >= x0
        and box[0] - margin <= x0 + size - 1
        and box[3] + margin >= y0
        and box[1] - margin <= y0 + size - 1
    )


def crop_origins(
    boxes: Sequence[Box],
    reference_u8: np.ndarray,
    size: int,
    n_fail: int,
    n_pass: int,
    rng: np.random.Generator,
    min_copper: float = 0.05,
    tries: int = 200,
) -> list[tuple[int, int, str]]:
    """(x0, y0, label) of fail crops (a whole box inside) and pass crops (no box within 8 px, some copper).

    Copper is dark in DeepPCB references: a pass crop needs at least ``min_copper`` of its pixels < 128.
    """
    h, w = reference_u8.shape
    out: list[tuple[int, int, str]] = []
    for _ in range(n_fail if boxes else 0):
        box = boxes[int(rng.integers(len(boxes)))]
        lo_x, hi_x = max(0, box[2] - size + 1), min(box[0], w - size)
        lo_y, hi_y = max(0, box[3] - size + 1), min(box[1], h - size)
        if lo_x <= hi_x and lo_y <= hi_y:
            out.append((int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1)), "fail"))
    found = 0
    for _ in range(tries):
        if found == n_pass:
            break
        x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        if any(box_near(b, x0, y0, size) for b in boxes):
            continue
        if (reference_u8[y0 : y0 + size, x0 : x0 + size] < 128).mean() < min_copper:
            continue
        out.append((x0, y0, "pass"))
        found += 1
    return out


def make_crop_manifest(
    items: Sequence[ManifestItem],
    out_dir: Path,
    size: int = 256,
    n_fail: int = 2,
    n_pass: int = 2,
    include_full: bool = True,
    seed: int = 0,
) -> Path:
    """Write crops of every item under out_dir/crops and a manifest out_dir/manifest.jsonl; return its path."""
    rng = np.random.default_rng(seed)
    crops_dir = out_dir / "crops"
    crops_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for item in items:
        ref, frame = read_gray(item.reference), read_gray(item.frame)
        if include_full:
            lines.append(
                json.dumps(
                    {
                        "id": f"{item.id}-full",
                        "reference": os.path.relpath(item.reference, out_dir),
                        "frame": os.path.relpath(item.frame, out_dir),
                        "label": item.label,
                        "boxes": [list(b) for b in item.boxes],
                        "group": item.group,
                        "kind": "full",
                    }
                )
            )
        for n, (x0, y0, label) in enumerate(crop_origins(item.boxes, ref, size, n_fail, n_pass, rng)):
            cid = f"{item.id}-c{n}"
            cv2.imwrite(str(crops_dir / f"{cid}_ref.png"), ref[y0 : y0 + size, x0 : x0 + size])
            cv2.imwrite(str(crops_dir / f"{cid}_frame.png"), frame[y0 : y0 + size, x0 : x0 + size])
            inside = [
                [b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0, b[4]] for b in item.boxes if box_inside(b, x0, y0, size)
            ]
            lines.append(
                json.dumps(
                    {
                        "id": cid,
                        "reference": f"crops/{cid}_ref.png",
                        "frame": f"crops/{cid}_frame.png",
                        "label": label,
                        "boxes": inside,
                        "group": item.group,
                        "kind": "crop",
                    }
                )
            )
    path = out_dir / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
