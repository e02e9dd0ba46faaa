"""What the refinement by tile does to the opened difference of every pooled crop (no model involved).

For each crop of a cross-validation run's crop manifest: the affine front end with the valid-region mask,
then the 1 px edge-jitter tolerance and the 3 px opening the features use; the opened difference counted
without and with ``refine_local`` at ``--px``. Prints the good crops with the most difference, and the
defect crops whose in-box difference the refinement cut below 70%.

    python experiments/cv-local/probe_refinement.py runs/cv-s/oof-data/manifest.jsonl --px 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from stream_service.quality.manifest import ManifestItem, load_manifest, read_gray
from stream_service.vision.refinement import refine_local
from stream_service.vision.registration import Registrar, invalid_region, mask_invalid
from stream_service.vision.soartc import to_unit
from stream_service.vision.tokens import forgive_jitter, open_mask


def opened(reference: np.ndarray, frame: np.ndarray, item: ManifestItem) -> tuple[int, int]:
    """(opened difference pixels, of them inside the item's boxes)."""
    seen = forgive_jitter(reference, frame, 1)
    mask = open_mask((cv2.absdiff(seen, reference) > 0.3).astype(np.uint8), 3)
    boxes = np.zeros_like(mask)
    for x1, y1, x2, y2, *_ in item.boxes:
        boxes[max(int(y1), 0) : int(y2) + 1, max(int(x1), 0) : int(x2) + 1] = 1
    return int(mask.sum()), int((mask * boxes).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--px", type=int, default=2)
    args = parser.parse_args()
    rows, spent = [], []
    for item in load_manifest(args.manifest):
        if (item.kind or "crop") != "crop":
            continue
        reference = to_unit(read_gray(item.reference), False)
        frame = to_unit(read_gray(item.frame), False)
        aligned, reg = Registrar(reference, "affine", max_shift=32).align(frame)
        invalid = invalid_region(aligned.shape, reg)
        aligned = mask_invalid(reference, aligned, reg)
        started = time.perf_counter()
        refined = refine_local(reference, aligned, args.px, invalid)
        spent.append(time.perf_counter() - started)
        rows.append((item.id, item.label, opened(reference, aligned, item), opened(reference, refined, item)))
    print(f"{len(rows)} crops; refinement median {np.median(spent) * 1e3:.2f} ms")
    good = sorted((r for r in rows if r[1] != "fail"), key=lambda r: -r[2][0])
    print("good crops with the most opened difference (before -> after):")
    for name, _, before, after in good[:8]:
        print(f"  {name}: {before[0]} -> {after[0]}")
    print(f"good crops with any: {sum(r[2][0] > 0 for r in good)} -> {sum(r[3][0] > 0 for r in good)}")
    cut = [(r[0], r[2][1], r[3][1]) for r in rows if r[1] == "fail" and r[2][1] > 0 and r[3][1] < 0.7 * r[2][1]]
    print(f"defect crops whose in-box difference fell below 70%: {cut}")


if __name__ == "__main__":
    main()
