"""Pictures of the worst errors of an evaluation: reference | frame | difference | highlight, one PNG each.

"Worst" false alarms are the good items judged fail with the highest scores; worst misses are the
defective items judged pass with the lowest scores. Each picture carries the item's id, score and
verdict in a title bar, and the ground-truth boxes drawn on every panel; the difference is that of the
frame registered to the reference (the registration method given), the highlight the mask
``predictions.jsonl`` points to, drawn in red over the frame.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.quality.manifest import Box, ManifestItem, load_manifest, read_gray
from stream_service.quality.oof import load_predictions
from stream_service.vision.registration import Method, Registrar
from stream_service.vision.soartc import to_unit
from stream_service.vision.tokens import forgive_jitter

TITLE_PX = 28
GAP_PX = 4
BOX_BGR = (0, 200, 0)
HIGHLIGHT_BGR = (0, 0, 255)


def worst_errors(
    rows: dict[str, ManifestItem], predictions: list[dict[str, object]], n: int
) -> list[tuple[str, dict[str, object]]]:
    """Up to n ("false-alarm", prediction) by decreasing score, then up to n ("miss", prediction) by increasing."""
    known = [p for p in predictions if str(p["id"]) in rows]
    alarms = [p for p in known if rows[str(p["id"])].label == "pass" and p["verdict"] == "fail"]
    misses = [p for p in known if rows[str(p["id"])].label == "fail" and p["verdict"] == "pass"]
    alarms.sort(key=lambda p: (-float(str(p["score"])), str(p["id"])))
    misses.sort(key=lambda p: (float(str(p["score"])), str(p["id"])))
    return [("false-alarm", p) for p in alarms[:n]] + [("miss", p) for p in misses[:n]]


def _boxes(image_bgr: npt.NDArray[np.uint8], boxes: list[Box]) -> npt.NDArray[np.uint8]:
    for x1, y1, x2, y2, *_ in boxes:
        cv2.rectangle(image_bgr, (int(x1), int(y1)), (int(x2), int(y2)), BOX_BGR, 1)
    return image_bgr


def panel(
    reference_u8: npt.NDArray[np.uint8],
    frame_u8: npt.NDArray[np.uint8],
    mask_hw: npt.NDArray[np.bool_] | None,
    boxes: list[Box],
    title: str,
    registration: Method = "translation",
    tolerance_px: int = 0,
    local_px: int = 0,
) -> npt.NDArray[np.uint8]:
    """One picture (H + title, 4 W + gaps, 3) uint8 BGR: reference | frame | |registered - reference| | highlight.

    With the card's ``tolerance_px`` the difference leaves out what a shift of up to that many pixels
    explains (``forgive_jitter``), and with the card's ``local_px`` the registration is refined by tile
    (``refinement.refine_local``), as the model's features do; the valid-region mask is not applied."""
    ref, frame = to_unit(reference_u8, False), to_unit(frame_u8, False)
    aligned, _ = Registrar(ref, registration).front_end(frame, local_px=local_px)
    seen = forgive_jitter(ref, aligned, tolerance_px)
    diff = np.clip(np.abs(seen - ref) * 255.0, 0, 255).astype(np.uint8)
    over = cv2.cvtColor(frame_u8, cv2.COLOR_GRAY2BGR)
    if mask_hw is not None and mask_hw.shape == frame_u8.shape:
        over[mask_hw] = (0.35 * over[mask_hw] + 0.65 * np.array(HIGHLIGHT_BGR)).astype(np.uint8)
    tiles = [cv2.cvtColor(x, cv2.COLOR_GRAY2BGR) for x in (reference_u8, frame_u8, diff)] + [over]
    h, w = reference_u8.shape
    out = np.full((h + TITLE_PX, 4 * w + 3 * GAP_PX, 3), 128, np.uint8)  # gray gaps between the panels
    out[:TITLE_PX] = 255
    for k, tile in enumerate(tiles):
        out[TITLE_PX:, k * (w + GAP_PX) : k * (w + GAP_PX) + w] = _boxes(np.ascontiguousarray(tile), boxes)
    cv2.putText(out, title, (4, TITLE_PX - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def write_gallery(
    manifest: Path,
    predictions: Path,
    out_dir: Path,
    n: int,
    registration: Method = "translation",
    tolerance_px: int = 0,
    local_px: int = 0,
) -> list[Path]:
    """Write one PNG per worst error (``worst_errors``) under out_dir; returns their paths."""
    rows = {r.id: r for r in load_manifest(manifest)}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, (kind, p) in enumerate(worst_errors(rows, load_predictions(predictions), n)):
        item = rows[str(p["id"])]
        mask = None
        if p.get("highlight"):
            image = cv2.imread(str(predictions.parent / str(p["highlight"])), cv2.IMREAD_GRAYSCALE)
            mask = None if image is None else image > 0
        title = (
            f"{kind}  {item.id}  ({item.group or '-'}, {item.kind or 'crop'}, {item.label})  "
            f"score {float(str(p['score'])):.4f}  verdict {p['verdict']}"
        )
        reference, frame = read_gray(item.reference), read_gray(item.frame)
        picture = panel(reference, frame, mask, list(item.boxes), title, registration, tolerance_px, local_px)
        path = out_dir / f"{kind}-{rank:02d}-{item.id}.png"
        cv2.imwrite(str(path), picture)
        written.append(path)
    return written
