"""Out-of-board figures: the operating curve, rates at a threshold or a miss rate, figures per board.

Predictions pooled over the folds of a board-held-out cross-validation are scored here exactly as
``../shared/tools/score.py`` scores one ``predictions.jsonl`` (through ``Scoreboard``), pooled and per
board (``group``), so that one threshold can be judged on every board it will meet.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from stream_service.errors import InputError
from stream_service.quality.manifest import ManifestItem
from stream_service.quality.metrics import Scoreboard

# Miss rates at which the operating curve reports the false-alarm rate (and the threshold giving it).
MISS_GRID = (0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1)


def _split(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    if s.shape != y.shape:
        raise InputError(f"scores and labels: expected equal lengths, found {s.shape} and {y.shape}")
    return np.sort(s[y]), np.sort(s[~y])


def rates_at(scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float) -> dict[str, float]:
    """Miss rate (fail scored below threshold) and false-alarm rate (pass scored at or above) at a threshold."""
    fails, passes = _split(scores, labels)
    miss = float((fails < threshold).mean()) if fails.size else float("nan")
    alarms = float((passes >= threshold).mean()) if passes.size else float("nan")
    return {"threshold": float(threshold), "miss_rate": miss, "false_alarm_rate": alarms}


def false_alarm_at_miss(scores: npt.ArrayLike, labels: npt.ArrayLike, max_miss: float) -> dict[str, float]:
    """The highest threshold whose miss rate is <= max_miss, with its miss and false-alarm rates."""
    fails, _ = _split(scores, labels)
    if fails.size == 0:
        raise InputError("false alarms at a miss rate: expected fail scores, found none")
    k = min(int(np.floor(max_miss * fails.size + 1e-9)), fails.size - 1)
    return rates_at(scores, labels, float(fails[k]))


def operating_curve(
    scores: npt.ArrayLike, labels: npt.ArrayLike, misses: Sequence[float] = MISS_GRID
) -> list[dict[str, float]]:
    """False-alarm rate against miss rate: for each miss-rate bound, the highest threshold within it."""
    return [{"max_miss": m, **false_alarm_at_miss(scores, labels, m)} for m in misses]


def load_predictions(path: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def score_by_group(
    items: Iterable[ManifestItem], predictions: Path
) -> tuple[dict[str, float | int], dict[str, dict[str, float | int]]]:
    """(pooled figures, figures per group) of a predictions.jsonl, as the reference scorer computes them."""
    preds = {str(p["id"]): p for p in load_predictions(predictions)}
    base = predictions.parent
    pooled = Scoreboard()
    boards: dict[str, Scoreboard] = {}
    for item in items:
        p = preds.get(item.id)
        if p is None:
            continue
        mask = None
        if p.get("highlight"):
            image = cv2.imread(str(base / str(p["highlight"])), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise InputError(f"prediction {item.id}: expected a highlight PNG at {base / str(p['highlight'])}")
            mask = image > 0
        board = boards.setdefault(item.group or "", Scoreboard())
        for b in (pooled, board):
            b.add(item.kind or "crop", item.label, item.boxes, float(str(p["score"])), str(p["verdict"]), mask)
    return pooled.figures(), {g: b.figures() for g, b in sorted(boards.items())}


def pool_predictions(parts: Sequence[tuple[Path, str]], out: Path) -> int:
    """Concatenate the predictions.jsonl of each (folder, its name relative to ``out``'s folder) into ``out``,
    with highlight paths made relative to ``out``; returns the number of rows."""
    lines = []
    for folder, prefix in parts:
        for row in load_predictions(folder / "predictions.jsonl"):
            if row.get("highlight"):
                row["highlight"] = f"{prefix}/{row['highlight']}"
            lines.append(json.dumps(row))
    out.write_text("\n".join(lines) + "\n")
    return len(lines)
