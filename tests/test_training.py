"""A tiny end-to-end training run on real DeepPCB pairs from two boards: model, calibration, history, determinism."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stream_service.errors import InputError  # noqa: E402
from stream_service.training.train import TrainConfig, TrainResult, train  # noqa: E402
from stream_service.training.vit import SoartcViT, VitConfig  # noqa: E402
from stream_service.vision.tokens import N_CHANNELS  # noqa: E402

TRAIN_GROUP, VAL_GROUP = "group00041", "group50600"


def tiny_config(seed: int = 0, **changes: Any) -> TrainConfig:
    fields: dict[str, Any] = {
        "seed": seed,
        "val_groups": (VAL_GROUP,),
        "minutes": 0.05,
        "rounds": 1,
        "train_windows_per_image": 2,
        "val_windows_per_image": 2,
        "vit": VitConfig(channels=N_CHANNELS, dim=16, depth=1, heads=2),
        "calibration_images": 3,
        "workers": 1,
    }
    return TrainConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def manifest(
    deeppcb_rows: dict[str, dict[str, Any]],
    manifest_writer: Callable[[list[dict[str, Any]], Path], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """Six real pairs, four from the training board and two from the validation board."""
    rows = [r for r in deeppcb_rows.values() if r["group"] == TRAIN_GROUP][:4]
    rows += [r for r in deeppcb_rows.values() if r["group"] == VAL_GROUP][:2]
    return manifest_writer(rows, tmp_path_factory.mktemp("train-data"))


@pytest.fixture(scope="module")
def runs(manifest: Path) -> tuple[TrainResult, TrainResult]:
    """Two runs with the same seed."""
    return train(manifest, tiny_config()), train(manifest, tiny_config())


def test_train_returns_a_model_a_calibrated_spec_and_history(runs: tuple[TrainResult, TrainResult]) -> None:
    result, _ = runs
    assert isinstance(result.model, SoartcViT) and result.model.cfg == VitConfig(
        channels=N_CHANNELS, dim=16, depth=1, heads=2
    )
    assert (result.train_items, result.val_items) == (4, 2)
    for calibration in (result.spec.calibration, result.spec.sub_calibration):
        assert len(calibration.constants) == 3 and all(c > 0 for c in calibration.constants)
        assert calibration.constants != (1.0, 1.0, 1.0), "calibrated, not the placeholder"
        assert calibration.method.startswith("percentile-")
    assert result.spec.block == 16
    assert result.history, "at least one epoch ran"
    first = result.history[0]
    assert {"round", "epoch", "step", "loss", "auroc", "false_alarm_rate", "elapsed_s"} <= set(first)
    assert first["round"] == 0 and first["epoch"] == 1 and first["step"] >= 1
    assert np.isfinite(first["loss"]) and first["loss"] > 0
    assert [h["epoch"] for h in result.history] == list(range(1, len(result.history) + 1))
    assert {"auroc", "miss_rate", "false_alarm_rate", "n_pass", "n_fail"} <= set(result.validation)
    assert result.validation["n_pass"] + result.validation["n_fail"] <= 4
    assert result.seconds > 0


def test_the_trained_model_runs_on_windows(runs: tuple[TrainResult, TrainResult]) -> None:
    result, _ = runs
    model = result.model.eval()
    with torch.no_grad():
        logits, attention = model(torch.rand(3, 16, 16, N_CHANNELS))
    assert logits.shape == (3, 2) and attention.shape == (3, 16, 16)
    np.testing.assert_allclose(attention.sum(dim=(1, 2)).numpy(), 1.0, atol=1e-5)


def test_the_same_seed_gives_the_same_calibration_and_first_loss(runs: tuple[TrainResult, TrainResult]) -> None:
    first, second = runs
    assert first.spec == second.spec
    assert first.history[0]["loss"] == second.history[0]["loss"]
    assert first.history[0]["step"] == second.history[0]["step"]


def test_validation_groups_must_exist(manifest: Path) -> None:
    with pytest.raises(InputError, match=r"val_groups=\['group99999'\], found 6 train and 0 validation pairs"):
        train(manifest, tiny_config(val_groups=("group99999",)))


def test_ship_writes_a_loadable_model_with_chosen_thresholds_and_figures(
    runs: tuple[TrainResult, TrainResult], manifest: Path, tmp_path: Path
) -> None:
    from stream_service.model.card import load_card
    from stream_service.model.session import InspectionModel
    from stream_service.training.ship import ship

    card = ship(runs[0], manifest, tmp_path / "shipped", name="shipped", version="9", experiments=[{"what": "note"}])
    assert load_card(tmp_path / "shipped") == card  # the card on disk is the one returned, sha256 checked
    assert card.name == "shipped" and card.version == "9"
    assert 0.0 <= card.threshold.value <= 1.0 and "miss rate" in card.threshold.chosen_by
    assert card.highlight.source in ("last-layer", "rollout")
    assert card.training["baseline"]["min_area"] >= 1  # the classical method was tuned on the training split
    assert card.training["export_check"]["logits_max_abs_diff"] <= 1e-4
    for method in ("vit", "baseline"):
        figures = card.validation[method]
        assert 0.0 <= figures["crop_auroc"] <= 1.0 and figures["n_full"] > 0
    whats = [e["what"] for e in card.experiments]
    assert whats[0] == "note" and any("rollout" in w for w in whats)
    model = InspectionModel.load(tmp_path / "shipped", device="cpu")
    probs, attention = model.run(np.zeros((2, 16, 16, len(card.features.channels)), np.float32))
    assert probs.shape == (2,) and attention.shape == (2, 16, 16)


def test_hard_negative_mining_draws_the_passes_the_model_finds_hardest() -> None:
    from stream_service.training.train import _batches

    labels = np.array([0] * 50 + [1] * 50 + [-1] * 5, dtype=np.int8)
    hardness = np.full(labels.size, 0.001, dtype=np.float32)
    hardness[:5] = 0.9  # five good windows the model scores like defects
    rng = np.random.default_rng(0)
    plain = np.concatenate(_batches(labels, 16, rng))
    mined = np.concatenate(_batches(labels, 16, rng, hardness, 0.5))
    # Without mining every window comes once (passes already match the fails).
    assert np.array_equal(np.sort(plain), np.arange(labels.size))
    # With it, 25 more pass draws, nearly all of them the five hard ones; nothing else is lost.
    assert mined.size == labels.size + 25
    assert set(np.arange(labels.size)) <= set(mined.tolist())
    counts = np.bincount(mined, minlength=labels.size)
    assert counts[:5].sum() >= 5 + 20
    assert (labels[mined[counts[mined] > 1]] == 0).all()


def test_hard_negative_mining_off_keeps_earlier_recipe_keys() -> None:
    from stream_service.training import cv
    from stream_service.training.train import config_dict

    assert "hard_negatives" not in config_dict(TrainConfig())
    assert config_dict(TrainConfig(hard_negatives=0.5))["hard_negatives"] == 0.5
    assert cv._key(TrainConfig(), ["a"]) != cv._key(TrainConfig(hard_negatives=0.5), ["a"])
    assert "tolerance_px" not in config_dict(TrainConfig())
    assert cv._key(TrainConfig(), ["a"]) != cv._key(TrainConfig(tolerance_px=1), ["a"])
    assert "local_px" not in config_dict(TrainConfig())
    assert cv._key(TrainConfig(), ["a"]) != cv._key(TrainConfig(local_px=2), ["a"])


def test_a_run_with_hard_negative_mining_trains_both_rounds(manifest: Path) -> None:
    result = train(manifest, tiny_config(rounds=2, hard_negatives=0.5))
    assert {h["round"] for h in result.history} == {0, 1}
    assert np.isfinite([h["loss"] for h in result.history]).all()


def test_a_run_with_local_refinement_records_it_in_the_front_end(manifest: Path) -> None:
    result = train(manifest, tiny_config(local_px=2))
    assert result.spec.local_px == 2 and result.config.local_px == 2
    assert np.isfinite([h["loss"] for h in result.history]).all()
