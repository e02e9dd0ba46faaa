"""``evaluate`` and ``stream-service evaluate`` on real DeepPCB crops and frames, checked by the reference scorer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from typer.testing import CliRunner

from stream_service.cli import app
from stream_service.errors import InputError
from stream_service.model.card import CARD_NAME
from stream_service.model.session import InspectionModel
from stream_service.quality.crops import make_crop_manifest
from stream_service.quality.evaluation import evaluate
from stream_service.quality.manifest import load_manifest, read_gray

PREDICTION_KEYS = {"id", "verdict", "score", "highlight"}


@pytest.fixture(scope="module")
def manifest(deeppcb_items: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Crops (fail and pass) and full frames of five real pairs from two boards."""
    out = tmp_path_factory.mktemp("eval-data")
    path = make_crop_manifest(deeppcb_items[:5], out, n_fail=1, n_pass=2, seed=1)
    labels = {(i.kind, i.label) for i in load_manifest(path)}
    assert labels == {("crop", "fail"), ("crop", "pass"), ("full", "fail")}
    return path


@pytest.fixture(scope="module")
def model(tiny_model: Any, manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> InspectionModel:
    """The tiny model with its threshold moved between its crop scores, so that both verdicts occur."""
    first = tmp_path_factory.mktemp("eval-first")
    evaluate(manifest, first, InspectionModel.load(tiny_model.directory, device="cpu", threads=1), device="cpu")
    kinds = {i.id: i.kind for i in load_manifest(manifest)}
    scores = sorted({p["score"] for p in read_jsonl(first / "predictions.jsonl") if kinds[p["id"]] == "crop"})
    assert len(scores) >= 2, "an untrained model still scores crops differently"
    middle = len(scores) // 2
    threshold = (scores[middle - 1] + scores[middle]) / 2
    directory = tmp_path_factory.mktemp("tiny-thresholded") / "model"
    shutil.copytree(tiny_model.directory, directory)
    card = json.loads((directory / CARD_NAME).read_text())
    card["threshold"]["value"] = threshold
    (directory / CARD_NAME).write_text(json.dumps(card))
    return InspectionModel.load(directory, device="cpu", threads=1)


@pytest.fixture(scope="module")
def vit_run(manifest: Path, model: InspectionModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval-vit")
    return out, evaluate(manifest, out, model, device="cpu")


@pytest.fixture(scope="module")
def baseline_run(manifest: Path, model: InspectionModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval-baseline")
    return out, evaluate(manifest, out, model, method="baseline", device="cpu")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_predictions(out: Path, manifest: Path, threshold: float | None) -> list[dict[str, Any]]:
    items = load_manifest(manifest)
    predictions = read_jsonl(out / "predictions.jsonl")
    assert [p["id"] for p in predictions] == [i.id for i in items]
    for item, p in zip(items, predictions, strict=True):
        assert set(p) == PREDICTION_KEYS
        assert p["verdict"] in ("pass", "fail") and isinstance(p["score"], float)
        if threshold is not None:
            assert (p["verdict"] == "fail") == (p["score"] >= threshold)
        assert p["highlight"] == f"masks/{item.id}.png"
        mask = cv2.imread(str(out / p["highlight"]), cv2.IMREAD_UNCHANGED)
        assert mask is not None and mask.dtype == np.uint8
        assert mask.shape == read_gray(item.frame).shape == ((640, 640) if item.kind == "full" else (256, 256))
        assert set(np.unique(mask)) <= {0, 255}
    return predictions


ALL_FIGURES = {
    "n_items",
    "crop_auroc",
    "crop_miss_rate",
    "crop_false_alarm_rate",
    "crop_accuracy",
    "full_highlight_precision",
    "full_box_recall",
    "pass_crop_false_highlight_rate",
}


def assert_agrees_with_scorer(figures: dict[str, Any], reference: dict[str, Any]) -> None:
    """Every figure both report agrees: counts exactly, rates within 1e-9."""
    shared = set(figures) & set(reference)
    assert shared == ALL_FIGURES
    for key in sorted(shared):
        if isinstance(reference[key], int):
            assert figures[key] == reference[key], key
        else:
            assert figures[key] == pytest.approx(reference[key], abs=1e-9), key


def test_vit_predictions_have_the_documented_fields(
    vit_run: tuple[Path, dict], manifest: Path, model: InspectionModel
) -> None:
    out, _ = vit_run
    predictions = check_predictions(out, manifest, model.card.threshold.value)
    assert {p["verdict"] for p in predictions} == {"pass", "fail"}


def test_vit_metrics_agree_with_the_reference_scorer(
    vit_run: tuple[Path, dict], manifest: Path, model: InspectionModel, scorer: ModuleType
) -> None:
    out, figures = vit_run
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(figures))
    reference = scorer.score(manifest, out / "predictions.jsonl")
    assert reference["n_missing"] == 0
    assert_agrees_with_scorer(figures, reference)
    assert figures["method"] == "vit" and figures["model"] == "tiny 0"
    assert figures["threshold"] == model.card.threshold.value and figures["baseline_params"] is None
    assert figures["n_full"] == 5 and figures["median_ms_per_pair"] > 0


def test_baseline_method(
    baseline_run: tuple[Path, dict], manifest: Path, model: InspectionModel, scorer: ModuleType
) -> None:
    out, figures = baseline_run
    check_predictions(out, manifest, None)
    assert_agrees_with_scorer(figures, scorer.score(manifest, out / "predictions.jsonl"))
    assert figures["method"] == "baseline" and figures["threshold"] is None
    assert figures["baseline_params"] == model.card.training["baseline"]
    # The classical method finds the real defects of full frames.
    assert figures["full_box_recall"] > 0.5


def test_baseline_method_needs_tuned_parameters_in_the_card(
    manifest: Path, model: InspectionModel, tmp_path: Path
) -> None:
    untuned = SimpleNamespace(card=model.card.model_copy(update={"training": {}}))
    with pytest.raises(InputError, match=r"training\.baseline: expected tuned baseline parameters, found none"):
        evaluate(manifest, tmp_path, untuned, method="baseline")  # type: ignore[arg-type]


def test_cli_evaluate(manifest: Path, tiny_model: Any, tmp_path: Path, scorer: ModuleType) -> None:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    picked = [
        next(r for r in rows if (r["kind"], r["label"]) == kind_label)
        for kind_label in (("full", "fail"), ("crop", "fail"), ("crop", "pass"))
    ]
    # The manifest's paths are relative to its folder: keep the small one beside it.
    small = manifest.parent / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in picked))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["evaluate", str(small), "--out", str(out), "--model", str(tiny_model.directory), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["n_items"] == 3 and figures["method"] == "vit"
    assert json.loads((out / "metrics.json").read_text()) == figures
    assert len(read_jsonl(out / "predictions.jsonl")) == 3
    assert_agrees_with_scorer(figures, scorer.score(small, out / "predictions.jsonl"))


def test_cli_evaluate_with_a_missing_model_folder(manifest: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    result = CliRunner().invoke(
        app, ["evaluate", str(manifest), "--out", str(tmp_path / "out"), "--model", str(missing)]
    )
    assert result.exit_code == 1
    assert f"error: model card: expected {missing / CARD_NAME}, found no such file" in result.output
    assert not (tmp_path / "out").exists()
