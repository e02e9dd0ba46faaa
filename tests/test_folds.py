"""Folds over boards, the operating curve, per-board scoring and the error gallery (no training here)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pytest

from stream_service.errors import InputError
from stream_service.quality.gallery import panel, worst_errors, write_gallery
from stream_service.quality.manifest import ManifestItem, load_manifest
from stream_service.quality.oof import (
    false_alarm_at_miss,
    operating_curve,
    pool_predictions,
    rates_at,
    score_by_group,
)
from stream_service.training.folds import assign_folds
from stream_service.vision.registration import Registration, invalid_region, mask_invalid


def deeppcb_groups(deeppcb_rows: dict[str, dict[str, Any]]) -> list[str]:
    return [r["group"] for r in deeppcb_rows.values()]


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_every_board_is_held_out_exactly_once(deeppcb_rows: dict[str, dict[str, Any]], k: int) -> None:
    groups = deeppcb_groups(deeppcb_rows)
    folds = assign_folds(groups, k)
    assert len(folds) == k and [f.index for f in folds] == list(range(k))
    held = [g for f in folds for g in f.held_out]
    assert Counter(held) == Counter(set(groups))  # each board once
    for f in folds:
        assert f.held_out and not set(f.held_out) & set(f.train)
        assert set(f.held_out) | set(f.train) == set(groups)


def test_fold_assignment_is_deterministic_and_balanced(deeppcb_rows: dict[str, dict[str, Any]]) -> None:
    groups = deeppcb_groups(deeppcb_rows)
    folds = assign_folds(groups, 4)
    assert folds == assign_folds(list(reversed(groups)), 4)  # order of the rows does not matter
    counts = Counter(groups)
    sizes = [sum(counts[g] for g in f.held_out) for f in folds]
    assert max(sizes) <= max(counts.values())  # the largest board alone is the largest fold
    if counts == Counter({"group20085": 291, "group00041": 200, "group13000": 198, "group92000": 111,
                          "group77000": 100, "group50600": 50, "group44000": 50}):  # fmt: skip
        assert [f.held_out for f in folds] == [
            ("group20085",),
            ("group00041", "group50600"),
            ("group13000", "group44000"),
            ("group77000", "group92000"),
        ]


def test_fold_split_keeps_boards_apart(deeppcb_items: list[Any]) -> None:
    folds = assign_folds([i.group for i in deeppcb_items], 2)
    for f in folds:
        train, held = f.split(deeppcb_items)
        assert {i.group for i in train}.isdisjoint({i.group for i in held})
        assert len(train) + len(held) == len(deeppcb_items)


def test_fold_assignment_rejects_bad_k_and_missing_groups() -> None:
    with pytest.raises(InputError, match="2 <= K <= 2"):
        assign_folds(["a", "b", "a"], 3)
    with pytest.raises(InputError, match="2 <= K"):
        assign_folds(["a", "b"], 1)
    with pytest.raises(InputError, match="group on every"):
        assign_folds(["a", None, "b"], 2)


def test_operating_curve_and_rates() -> None:
    fails = np.linspace(0.5, 1.0, 200)
    passes = np.linspace(0.0, 0.6, 100)
    scores = np.concatenate([fails, passes])
    labels = np.r_[np.ones(200, bool), np.zeros(100, bool)]
    at = false_alarm_at_miss(scores, labels, 0.01)
    assert at["threshold"] == pytest.approx(fails[2])  # 2 of 200 fails may fall below
    assert at["miss_rate"] <= 0.01
    assert at["false_alarm_rate"] == pytest.approx(float((passes >= fails[2]).mean()))
    curve = operating_curve(scores, labels)
    misses = [c["miss_rate"] for c in curve]
    alarms = [c["false_alarm_rate"] for c in curve]
    assert all(c["miss_rate"] <= c["max_miss"] + 1e-12 for c in curve)
    assert misses == sorted(misses) and alarms == sorted(alarms, reverse=True)  # the trade-off
    assert curve[0]["miss_rate"] == 0.0 and curve[-1]["false_alarm_rate"] < curve[0]["false_alarm_rate"]
    r = rates_at(scores, labels, 0.55)
    assert r["miss_rate"] == pytest.approx(float((fails < 0.55).mean()))
    assert r["false_alarm_rate"] == pytest.approx(float((passes >= 0.55).mean()))
    with pytest.raises(InputError):
        false_alarm_at_miss(passes, np.zeros(100, bool), 0.01)


def _synthetic_items(tmp: Path) -> tuple[Path, Path]:
    """Four 64x64 crops on two boards (manifest) and predictions with masks (scorer's format)."""
    rng = np.random.default_rng(0)
    rows, preds = [], []
    (tmp / "img").mkdir()
    (tmp / "pred" / "masks").mkdir(parents=True)
    for n, (group, label, score, verdict) in enumerate(
        [("b1", "fail", 0.9, "fail"), ("b1", "pass", 0.8, "fail"),
         ("b2", "fail", 0.1, "pass"), ("b2", "pass", 0.2, "pass")]
    ):  # fmt: skip
        ref = (rng.random((64, 64)) > 0.5).astype(np.uint8) * 255
        frame = ref.copy()
        frame[20:28, 20:28] = 255 - frame[20:28, 20:28]
        cv2.imwrite(str(tmp / "img" / f"{n}_r.png"), ref)
        cv2.imwrite(str(tmp / "img" / f"{n}_f.png"), frame)
        boxes = [[20, 20, 27, 27, 1]] if label == "fail" else []
        rows.append({"id": f"i{n}", "reference": f"img/{n}_r.png", "frame": f"img/{n}_f.png", "label": label,
                     "boxes": boxes, "group": group, "kind": "crop"})  # fmt: skip
        mask = np.zeros((64, 64), np.uint8)
        mask[18:30, 18:30] = 255 if verdict == "fail" else 0
        cv2.imwrite(str(tmp / "pred" / "masks" / f"i{n}.png"), mask)
        preds.append({"id": f"i{n}", "verdict": verdict, "score": score, "highlight": f"masks/i{n}.png"})
    manifest = tmp / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "pred" / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    return manifest, tmp / "pred" / "predictions.jsonl"


def test_worst_errors_orders_false_alarms_and_misses(tmp_path: Path) -> None:
    manifest, predictions = _synthetic_items(tmp_path)
    rows = {r.id: r for r in load_manifest(manifest)}
    preds = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [(k, p["id"]) for k, p in worst_errors(rows, preds, 5)] == [("false-alarm", "i1"), ("miss", "i2")]


def test_gallery_writes_one_four_panel_picture_per_error(tmp_path: Path) -> None:
    manifest, predictions = _synthetic_items(tmp_path)
    written = write_gallery(manifest, predictions, tmp_path / "gallery", 3)
    assert [p.name for p in written] == ["false-alarm-00-i1.png", "miss-01-i2.png"]
    picture = cv2.imread(str(written[0]))
    assert picture is not None and picture.shape[1] == 4 * 64 + 3 * 4 and picture.shape[0] > 64
    # the highlight panel shows the mask in red, the other panels are gray
    highlight = picture[-64:, 3 * 68 : 3 * 68 + 64]
    assert (highlight[..., 2].astype(int) - highlight[..., 0]).max() > 100


def test_panel_shows_the_difference_and_the_boxes() -> None:
    ref = np.zeros((48, 48), np.uint8)
    frame = ref.copy()
    frame[10:20, 10:20] = 255
    out = panel(ref, frame, frame > 0, [(5, 5, 30, 30, 1)], "x", registration="none")
    diff = out[-48:, 2 * 52 : 2 * 52 + 48]
    assert diff[15, 15].min() == 255 and diff[40, 40].max() == 0
    assert tuple(out[-48 + 5, 10]) == (0, 200, 0)  # a box edge, green


def test_panel_difference_is_what_the_features_see_with_the_cards_tolerance() -> None:
    ref = np.zeros((48, 48), np.uint8)
    ref[10:30, 10:30] = 255
    frame = ref.copy()
    frame[10:30, 30] = 255  # the copper's right edge grown by a pixel
    frame[38:41, 38:41] = 255  # a 3 px speck on the empty board
    plain = panel(ref, frame, None, [], "x", registration="none")[-48:, 2 * 52 : 2 * 52 + 48]
    tolerant = panel(ref, frame, None, [], "x", registration="none", tolerance_px=1)[-48:, 2 * 52 : 2 * 52 + 48]
    assert plain[20, 30].min() == 255 and tolerant[20, 30].max() == 0, "the grown edge is forgiven"
    assert tolerant[38:41, 38:41].min() == 255, "the speck stays whole"
    assert tolerant[..., 0].astype(bool).sum() == 9


def test_score_by_group_agrees_with_the_reference_scorer(tmp_path: Path, scorer: ModuleType) -> None:
    manifest, predictions = _synthetic_items(tmp_path)
    pooled, groups = score_by_group(load_manifest(manifest), predictions)
    reference = scorer.score(manifest, predictions)
    for key in ("crop_auroc", "crop_miss_rate", "crop_false_alarm_rate", "pass_crop_false_highlight_rate"):
        assert pooled[key] == pytest.approx(reference[key])
    assert set(groups) == {"b1", "b2"}
    assert groups["b1"]["crop_false_alarm_rate"] == 1.0 and groups["b2"]["crop_miss_rate"] == 1.0


def test_pool_predictions_rewrites_mask_paths(tmp_path: Path) -> None:
    _, predictions = _synthetic_items(tmp_path)
    n = pool_predictions([(predictions.parent, "pred")], tmp_path / "pooled.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "pooled.jsonl").read_text().splitlines()]
    assert n == 4 and all((tmp_path / r["highlight"]).is_file() for r in rows)


def test_invalid_region_is_the_band_the_warp_filled() -> None:
    shift = Registration(2.5, -3.0, 1.0, "translation", ((1.0, 0.0, 2.5), (0.0, 1.0, -3.0)))
    invalid = invalid_region((40, 50), shift)
    # aligned(x, y) = frame(x + 2.5, y - 3): columns x > 50 - 1 - 2.5 and rows y < 3 come from outside
    assert invalid[:, 47:].all() and not invalid[10:-1, 1:46].any()
    assert invalid[:3].all() and not invalid[3:-1, 1:46].any()
    # The outermost ring, always: it shows the part just outside the reference's view.
    ring = np.ones((40, 50), bool)
    ring[1:-1, 1:-1] = False
    assert invalid[ring].all()
    assert (invalid_region((40, 50), Registration(0.0, 0.0, 1.0, "none")) == ring).all()
    ref = np.full((40, 50), 0.25, np.float32)
    aligned = np.ones((40, 50), np.float32)
    out = mask_invalid(ref, aligned, shift)
    assert (out[invalid] == 0.25).all() and (out[~invalid] == 1.0).all()


def test_manifest_item_groups_are_what_folds_use(deeppcb_items: list[ManifestItem]) -> None:
    assert all(i.group for i in deeppcb_items)


def test_the_feature_extractor_follows_the_cards_registration(real_pair: Any, caplog: pytest.LogCaptureFixture) -> None:
    from stream_service.vision.inspection import FeatureExtractor
    from stream_service.vision.tokens import FeatureSpec

    reference = (real_pair[0] * 255).astype(np.uint8)
    recorded = FeatureSpec(registration="affine", valid_region=True)
    assert FeatureExtractor(reference, recorded, False, device="cpu").registrar.method == "affine"
    with caplog.at_level("WARNING"):
        configured = FeatureExtractor(reference, recorded, False, registration="translation", device="cpu")
    assert configured.registrar.method == "affine" and "measured with 'affine'" in caplog.text
    # a card that does not record its registration: the configured method, translation by default
    assert (
        FeatureExtractor(reference, FeatureSpec(), False, registration="none", device="cpu").registrar.method == "none"
    )
    assert FeatureExtractor(reference, FeatureSpec(), False, device="cpu").registrar.method == "translation"


def test_the_valid_region_mask_removes_the_warp_band_from_the_features(real_pair: Any) -> None:
    from stream_service.vision.inspection import FeatureExtractor
    from stream_service.vision.tokens import FeatureSpec

    reference = (real_pair[0] * 255).astype(np.uint8)
    shifted = np.roll(reference, 3, axis=1)  # content moved 3 px right: the warp fills the right edge
    plain = FeatureExtractor(reference, FeatureSpec(registration="translation"), False, device="cpu")
    masked = FeatureExtractor(
        reference, FeatureSpec(registration="translation", valid_region=True), False, device="cpu"
    )
    a, b = plain.extract(shifted), masked.extract(shifted)
    assert b.features.diff_hw[:, -3:].sum() <= a.features.diff_hw[:, -3:].sum()
    assert b.features.diff_hw[:, -2:].sum() == 0


def test_clean_synthetic_frames_are_passes_through_the_bundled_model() -> None:
    """The outermost ring of a sub-pixel-shifted frame interpolates the part outside the reference's view (a
    trace ending just past the edge came in as a 2-row strip, scored 0.7 on a clean frame): never evidence."""
    from stream_service.model.card import resolve_model_dir
    from stream_service.model.session import InspectionModel
    from stream_service.sources.synthetic import SyntheticCamera
    from stream_service.vision.inspection import Detector, FeatureExtractor

    model = InspectionModel.load(resolve_model_dir(Path("models/soartc-vit")), "cpu")
    camera = SyntheticCamera(seed=0, defect_rate=0)
    extractor = FeatureExtractor(camera.reference(), model.card.features.to_spec(), dark_object=True, device="cpu")
    detector = Detector(model)
    failed = []
    for index in range(40):
        frame, _ = camera.next_frame()
        detection = detector.detect(extractor.extract(frame).features)
        if detection.verdict == "fail":
            boxes = [(r.x1, r.y1, r.x2, r.y2) for r in detection.highlight.regions]
            failed.append((index, round(detection.score, 3), boxes))
    assert not failed, failed
