"""The figures that matter (ARCHITECTURE.md), computed exactly as the reference scorer computes them.

crop AUROC (ties get average ranks), miss rate (defective judged pass), false-alarm rate (good judged
fail), highlight precision on full frames (highlighted pixels within ``margin`` px of a true box) and
box recall (boxes that receive any highlight), and the false-highlight rate on pass crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stream_service.quality.manifest import Box

# A highlighted pixel counts as right within this distance of a box; pass crops keep this far from every box.
MARGIN_PX = 8


def auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve of scores (higher = more defective) for boolean labels (True = defective).

    Mann-Whitney U with average ranks over ties; NaN when a class is missing.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, np.float64)
    # Average ranks over runs of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def near_boxes(shape: tuple[int, int], boxes: Sequence[Box], margin: int = MARGIN_PX) -> npt.NDArray[np.bool_]:
    """(H, W) bool: pixels within ``margin`` of a box (inclusive corners)."""
    g = np.zeros(shape, bool)
    h, w = shape
    for x1, y1, x2, y2, *_ in boxes:
        g[max(y1 - margin, 0) : min(y2 + margin + 1, h), max(x1 - margin, 0) : min(x2 + margin + 1, w)] = True
    return g


@dataclass
class Scoreboard:
    """Accumulates per-item results and reports the figures as the reference scorer does."""

    crop_scores: list[float] = field(default_factory=list)
    crop_labels: list[bool] = field(default_factory=list)
    crop_verdicts: list[bool] = field(default_factory=list)
    highlighted_near: int = 0
    highlighted: int = 0
    boxes_hit: int = 0
    boxes_total: int = 0
    pass_items: int = 0
    pass_highlighted: int = 0
    n_items: int = 0
    full_items: int = 0

    def add(
        self,
        kind: str,
        label: str,
        boxes: Sequence[Box],
        score: float,
        verdict: str,
        mask_hw: npt.NDArray[np.bool_] | None,
    ) -> None:
        self.n_items += 1
        if kind == "crop":
            self.crop_scores.append(score)
            self.crop_labels.append(label == "fail")
            self.crop_verdicts.append(verdict == "fail")
        else:
            self.full_items += 1
        if mask_hw is None:
            return
        if label == "pass":
            self.pass_items += 1
            self.pass_highlighted += bool(mask_hw.any())
            return
        if kind == "full":
            near = near_boxes(mask_hw.shape, boxes)
            self.highlighted_near += int((mask_hw & near).sum())
            self.highlighted += int(mask_hw.sum())
            for x1, y1, x2, y2, *_ in boxes:
                self.boxes_total += 1
                self.boxes_hit += bool(mask_hw[y1 : y2 + 1, x1 : x2 + 1].any())

    def figures(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"n_items": self.n_items}
        if self.crop_scores:
            lab = np.asarray(self.crop_labels)
            ver = np.asarray(self.crop_verdicts)
            out["crop_auroc"] = auroc(self.crop_scores, lab)
            out["crop_miss_rate"] = float((~ver[lab]).mean()) if lab.any() else float("nan")
            out["crop_false_alarm_rate"] = float(ver[~lab].mean()) if (~lab).any() else float("nan")
            out["crop_accuracy"] = float((ver == lab).mean())
            out["n_crops_fail"] = int(lab.sum())
            out["n_crops_pass"] = int((~lab).sum())
        if self.full_items:
            out["full_highlight_precision"] = self.highlighted_near / self.highlighted if self.highlighted else 0.0
            out["full_box_recall"] = self.boxes_hit / self.boxes_total if self.boxes_total else 0.0
            out["n_full"] = self.full_items
        if self.pass_items:
            out["pass_crop_false_highlight_rate"] = self.pass_highlighted / self.pass_items
        return out
