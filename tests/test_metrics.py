"""The figures that matter agree with the reference scorer (../shared/tools/score.py)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from stream_service.quality.metrics import Scoreboard, auroc, near_boxes

# Few distinct values, so that ties are common.
scores_and_labels = st.integers(2, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5000001, 0.9, 1.0]), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda y: any(y) and not all(y)),
    )
)


@settings(max_examples=150, deadline=None)
@given(scores_and_labels)
def test_auroc_equals_the_reference_scorer(scorer: ModuleType, data: tuple[list[float], list[bool]]) -> None:
    scores, labels = data
    ours = auroc(scores, labels)
    assert 0.0 <= ours <= 1.0
    assert ours == pytest.approx(scorer.auroc(scores, labels), abs=1e-12)
    # Flipping the labels mirrors the curve.
    assert auroc(scores, [not y for y in labels]) == pytest.approx(1.0 - ours, abs=1e-12)


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.9], [False, True], 1.0),
        ([0.9, 0.1], [False, True], 0.0),
        ([0.5, 0.5], [False, True], 0.5),
        ([0.1, 0.5, 0.5, 0.9], [False, False, True, True], 0.875),
    ],
)
def test_auroc_table(scores: list[float], labels: list[bool], expected: float) -> None:
    assert auroc(scores, labels) == pytest.approx(expected)


@pytest.mark.parametrize("labels", [[True, True], [False, False, False]])
def test_auroc_is_nan_with_one_class(labels: list[bool]) -> None:
    assert math.isnan(auroc(np.linspace(0, 1, len(labels)), labels))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-5, 40), st.integers(-5, 40), st.integers(0, 20), st.integers(0, 20)),
        max_size=4,
    ),
    st.integers(0, 10),
)
def test_near_boxes_equals_the_scorer_dilation(
    scorer: ModuleType, corners: list[tuple[int, int, int, int]], margin: int
) -> None:
    boxes = [(x, y, x + dw, y + dh, 1) for x, y, dw, dh in corners]
    np.testing.assert_array_equal(near_boxes((32, 36), boxes, margin), scorer.dilate_boxes((32, 36), boxes, margin))


def box_mask(shape: tuple[int, int], *rects: tuple[int, int, int, int]) -> np.ndarray:
    """Bool mask with the inclusive rectangles (x1, y1, x2, y2) set."""
    mask = np.zeros(shape, bool)
    for x1, y1, x2, y2 in rects:
        mask[y1 : y2 + 1, x1 : x2 + 1] = True
    return mask


# (manifest row, prediction (verdict, score), mask or None for no highlight). Crops are 32x32,
# full frames 64x80; paths in the manifest are never opened by either side.
CASES: list[tuple[dict[str, Any], tuple[str, float], np.ndarray | None]] = [
    (
        {"id": "c-fail-hit", "label": "fail", "boxes": [[4, 4, 9, 9, 3]], "kind": "crop"},
        ("fail", 0.9),
        box_mask((32, 32), (5, 5, 8, 8)),
    ),
    (
        {"id": "c-fail-missed", "label": "fail", "boxes": [[10, 12, 20, 20, 1]], "kind": "crop"},
        ("pass", 0.4),
        np.zeros((32, 32), bool),
    ),
    (
        {"id": "c-fail-tie", "label": "fail", "boxes": [[0, 0, 3, 3, 6]], "kind": "crop"},
        ("fail", 0.7),
        box_mask((32, 32), (0, 0, 1, 1)),
    ),
    (
        {"id": "c-pass-highlighted", "label": "pass", "boxes": [], "kind": "crop"},
        ("pass", 0.4),
        box_mask((32, 32), (20, 20, 22, 23)),
    ),
    ({"id": "c-pass-clean", "label": "pass", "boxes": [], "kind": "crop"}, ("pass", 0.2), np.zeros((32, 32), bool)),
    ({"id": "c-pass-no-kind", "label": "pass", "boxes": []}, ("fail", 0.7), np.zeros((32, 32), bool)),
    ({"id": "c-pass-no-mask", "label": "pass", "boxes": [], "kind": "crop"}, ("pass", 0.1), None),
    (
        {
            "id": "f-fail",
            "label": "fail",
            "boxes": [[10, 10, 19, 19, 2], [50, 40, 60, 50, 5], [0, 60, 5, 63, 4]],
            "kind": "full",
        },
        ("fail", 0.95),
        # one box hit, one pixel run within 8 px of the second box (not inside it), one far away, the third missed
        box_mask((64, 80), (12, 12, 15, 30), (61, 40, 66, 41), (75, 2, 79, 5)),
    ),
    (
        {"id": "f-fail-2", "label": "fail", "boxes": [[30, 30, 33, 33, 6]], "kind": "full"},
        ("fail", 0.8),
        box_mask((64, 80), (33, 33, 33, 33)),
    ),
    ({"id": "f-pass", "label": "pass", "boxes": [], "kind": "full"}, ("pass", 0.3), box_mask((64, 80), (1, 1, 2, 2))),
]


def write_case(tmp_path: Path) -> tuple[Path, Path, Scoreboard]:
    """Manifest, predictions.jsonl (+ PNG masks) of CASES, and our Scoreboard fed the same rows."""
    (tmp_path / "out" / "masks").mkdir(parents=True)
    board = Scoreboard()
    manifest_lines, prediction_lines = [], []
    for row, (verdict, score), mask in CASES:
        manifest_lines.append(json.dumps({"reference": "r.png", "frame": "f.png", **row}))
        prediction: dict[str, Any] = {"id": row["id"], "verdict": verdict, "score": score}
        if mask is not None:
            prediction["highlight"] = f"masks/{row['id']}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "out" / prediction["highlight"])
        prediction_lines.append(json.dumps(prediction))
        boxes = [tuple(b) for b in row["boxes"]]
        board.add(row.get("kind", "crop"), row["label"], boxes, score, verdict, mask)  # type: ignore[arg-type]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(manifest_lines) + "\n")
    predictions = tmp_path / "out" / "predictions.jsonl"
    predictions.write_text("\n".join(prediction_lines) + "\n")
    return manifest, predictions, board


def assert_same_figures(ours: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Every key both report agrees (counts exactly, rates within 1e-9); returns the shared keys."""
    shared = sorted(set(ours) & set(reference))
    for key in shared:
        if isinstance(reference[key], int) and not isinstance(reference[key], bool):
            assert ours[key] == reference[key], key
        else:
            assert ours[key] == pytest.approx(reference[key], abs=1e-9, nan_ok=True), key
    return shared


def test_scoreboard_figures_agree_with_the_reference_scorer(scorer: ModuleType, tmp_path: Path) -> None:
    manifest, predictions, board = write_case(tmp_path)
    reference = scorer.score(manifest, predictions)
    figures = board.figures()
    shared = assert_same_figures(figures, reference)
    assert set(shared) == set(reference) - {"n_missing"}
    # The case is built so that every figure is a non-trivial fraction.
    assert figures["crop_miss_rate"] == pytest.approx(1 / 3)
    assert figures["crop_false_alarm_rate"] == pytest.approx(1 / 4)
    assert figures["full_box_recall"] == pytest.approx(2 / 4)
    near = box_mask((64, 80), (12, 12, 15, 30), (61, 40, 66, 41)) & near_boxes(
        (64, 80), [(10, 10, 19, 19, 2), (50, 40, 60, 50, 5), (0, 60, 5, 63, 4)]
    )
    assert figures["full_highlight_precision"] == pytest.approx((near.sum() + 1) / (76 + 12 + 20 + 1))
    assert figures["pass_crop_false_highlight_rate"] == pytest.approx(2 / 4)
    assert (figures["n_crops_fail"], figures["n_crops_pass"], figures["n_full"]) == (3, 4, 3)


def test_empty_scoreboard_reports_only_the_count() -> None:
    assert Scoreboard().figures() == {"n_items": 0}


def test_full_frames_without_highlight_pixels_give_zero_precision(scorer: ModuleType, tmp_path: Path) -> None:
    board = Scoreboard()
    board.add("full", "fail", [(1, 1, 4, 4, 1)], 0.1, "pass", np.zeros((16, 16), bool))
    figures = board.figures()
    assert figures["full_highlight_precision"] == 0.0
    assert figures["full_box_recall"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "crop_auroc" not in figures
