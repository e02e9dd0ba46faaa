"""Synthetic boards as training pairs: new board designs, good and defective, from the synthetic camera.

DeepPCB holds 7 board designs; the synthetic generator draws as many new ones as asked, with the six
DeepPCB defect kinds annotated exactly. Each board is one ``SyntheticCamera`` (its clean render is the
reference); its frames carry the camera's shifts, edge jitter, lighting drift and noise, and half of
them defects. With ``etch_px`` each frame's copper is also grown or etched back by up to that many pixels,
by a smooth field across the frame (``regional_etch``): a new board's etching differs from its golden
board's by region, which the camera's sub-pixel edge jitter alone never shows. Near a defect box the field
fades to zero, so the defects stay as drawn and the labels stay exact.

Pairs are written as PNG files with a ``manifest.jsonl`` into a folder under the run (never the
repository), one ``group`` per board, so they only ever add to a training set.

Boards are seeded from ``SEED_BASE`` on: the synthetic camera's default board (seed 0, the quick start)
and the boards ``benchmarks/bench_synthetic_accuracy.py`` measures (seeds 0 to 3) are never trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.errors import InputError
from stream_service.quality.manifest import ManifestItem
from stream_service.sources.synthetic import SyntheticCamera
from stream_service.training.dataset import regional_move

SEED_BASE = 1000
# Edge-jitter amplitude of each board's camera, drawn per board: new scanners binarise differently.
JITTER_RANGE = (0.2, 0.5)
COPPER_BELOW = 128  # copper is dark in the synthetic camera's frames, as in DeepPCB


def _write_png(path: Path, image: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.png")
    if not cv2.imwrite(str(tmp), image):
        raise InputError(f"synthetic training pair {path}: expected a writable folder, found the write refused")
    os.replace(tmp, path)


def regional_etch(
    frame_u8: npt.NDArray[np.uint8], amplitude: float, boxes: Sequence[Sequence[int]], rng: np.random.Generator
) -> npt.NDArray[np.uint8]:
    """The (H, W) uint8 frame with its copper grown or etched back by region by up to ``amplitude`` px
    (``dataset.regional_move``, faded to zero around ``boxes``). Pixels that change side take that side's
    median level plus the camera's noise. Zero amplitude returns the frame unchanged.
    """
    copper = frame_u8 < COPPER_BELOW
    grown = regional_move(copper, amplitude, boxes, rng)
    if grown is copper:
        return frame_u8
    levels = {True: float(np.median(frame_u8[copper])), False: float(np.median(frame_u8[~copper]))}
    out = frame_u8.astype(np.float32)
    for side in (True, False):
        changed = (grown == side) & (copper != side)
        out[changed] = levels[side] + rng.normal(0.0, 2.0, int(changed.sum()))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def synthetic_items(
    folder: Path, boards: int, frames: int, size: int = 640, etch_px: float = 0.0
) -> list[ManifestItem]:
    """``boards`` synthetic boards of ``frames`` frames each (``size`` x ``size`` px), written to ``folder``,
    each frame's copper moved regionally by up to ``etch_px`` (``regional_etch``; 0: as the camera saw it).

    Deterministic: the same arguments give the same pairs. Returns full-frame manifest items whose
    group is the board (``synthetic<seed>``); ``folder/manifest.jsonl`` lists them too.
    """
    if boards < 0 or frames < 1:
        raise InputError(f"synthetic training boards: expected boards >= 0 and frames >= 1, found {boards}, {frames}")
    folder.mkdir(parents=True, exist_ok=True)
    items: list[ManifestItem] = []
    for index in range(boards):
        seed = SEED_BASE + index
        jitter = float(np.random.default_rng([seed, 7]).uniform(*JITTER_RANGE))
        camera = SyntheticCamera(size, size, seed=seed, jitter=jitter)
        reference = folder / f"board{seed}_ref.png"
        _write_png(reference, camera.reference())
        for number in range(frames):
            frame_u8, truth = camera.next_frame()
            frame_u8 = regional_etch(frame_u8, etch_px, truth["boxes"], np.random.default_rng([seed, number, 11]))
            path = folder / f"board{seed}-{number:03d}.png"
            _write_png(path, frame_u8)
            row: dict[str, object] = {"id": f"synthetic{seed}-{number:03d}", "reference": reference, "frame": path}
            row |= {"label": truth["label"], "boxes": truth["boxes"], "group": f"synthetic{seed}", "kind": "full"}
            items.append(ManifestItem.model_validate(row))
    # The folder's own manifest names its files relative to it, as manifests do.
    rows = [
        item.model_dump(mode="json") | {"reference": item.reference.name, "frame": item.frame.name} for item in items
    ]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return items
