"""Synthetic boards as training pairs: deterministic, exactly labelled, never the benchmark's boards."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from stream_service.errors import InputError
from stream_service.quality.manifest import load_manifest
from stream_service.sources.synthetic import SyntheticCamera
from stream_service.training.synthetic import SEED_BASE, synthetic_items


def test_pairs_are_written_with_a_manifest_that_loads_back(tmp_path: Path) -> None:
    items = synthetic_items(tmp_path, boards=2, frames=3, size=256)
    assert len(items) == 6
    assert load_manifest(tmp_path / "manifest.jsonl") == items
    assert {i.group for i in items} == {f"synthetic{SEED_BASE}", f"synthetic{SEED_BASE + 1}"}
    for item in items:
        frame = cv2.imread(str(item.frame), cv2.IMREAD_GRAYSCALE)
        assert frame.shape == (256, 256)
        assert cv2.imread(str(item.reference), cv2.IMREAD_GRAYSCALE).shape == (256, 256)
        assert item.kind == "full"
        assert (item.label == "fail") == bool(item.boxes)
        for x1, y1, x2, y2, kind in item.boxes:
            assert 0 <= x1 <= x2 < 256 and 0 <= y1 <= y2 < 256 and 1 <= kind <= 6


def test_the_same_arguments_give_the_same_pairs(tmp_path: Path) -> None:
    first = synthetic_items(tmp_path / "a", boards=1, frames=4, size=256)
    second = synthetic_items(tmp_path / "b", boards=1, frames=4, size=256)
    assert [(i.label, i.boxes) for i in first] == [(i.label, i.boxes) for i in second]
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(cv2.imread(str(a.frame)), cv2.imread(str(b.frame)))


def test_the_boards_the_benchmark_measures_are_never_trained_on(tmp_path: Path) -> None:
    # bench_synthetic_accuracy.py measures seeds 0-3 and the quick start runs seed 0.
    item = synthetic_items(tmp_path, boards=1, frames=1, size=256)[0]
    reference = cv2.imread(str(item.reference), cv2.IMREAD_GRAYSCALE)
    for seed in range(4):
        assert not np.array_equal(reference, SyntheticCamera(256, 256, seed=seed).reference())


def test_bad_counts_are_refused_with_what_was_found(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"expected boards >= 0 and frames >= 1, found 2, 0"):
        synthetic_items(tmp_path, boards=2, frames=0)


def test_synthetic_boards_off_keeps_earlier_recipe_keys() -> None:
    pytest.importorskip("torch")
    from stream_service.training import cv
    from stream_service.training.train import TrainConfig, config_dict

    assert "synthetic_boards" not in config_dict(TrainConfig())
    assert "synthetic_frames" not in config_dict(TrainConfig())
    assert config_dict(TrainConfig(synthetic_boards=4))["synthetic_boards"] == 4
    assert cv._key(TrainConfig(), ["a"]) != cv._key(TrainConfig(synthetic_boards=4), ["a"])
    # The regional etching of the real windows is a later Augment field, off by default the same way.
    from stream_service.training.dataset import Augment

    assert "regional_etch_px" not in config_dict(TrainConfig())["augment"]  # type: ignore[operator]
    etched = TrainConfig(augment=Augment(regional_etch_px=3.0))
    assert cv._key(TrainConfig(), ["a"]) != cv._key(etched, ["a"])


def _board_frame(seed: int = SEED_BASE) -> np.ndarray:
    return SyntheticCamera(256, 256, seed=seed, defect_rate=0.0, shift_px=0.0).next_frame()[0]


def test_regional_etch_moves_copper_edges_both_ways_by_at_most_its_amplitude() -> None:
    from stream_service.training.synthetic import regional_etch

    frame = _board_frame()
    etched = regional_etch(frame, 2.5, [], np.random.default_rng(3))
    copper, now = frame < 128, etched < 128
    grown, etched_back = now & ~copper, copper & ~now
    assert grown.sum() > 100 and etched_back.sum() > 100  # the field grows some regions, etches others
    # Every pixel that changed side lies within the amplitude (+ the half pixel of the edge) of the old edge.
    to_copper = cv2.distanceTransform((~copper).astype(np.uint8), cv2.DIST_L2, 3)
    to_gap = cv2.distanceTransform(copper.astype(np.uint8), cv2.DIST_L2, 3)
    assert to_copper[grown].max() <= 3.0 and to_gap[etched_back].max() <= 3.0
    assert np.array_equal(regional_etch(frame, 0.0, [], np.random.default_rng(3)), frame)


def test_regional_etch_leaves_the_defects_and_their_surroundings_as_drawn() -> None:
    from stream_service.training.dataset import BOX_CLEAR
    from stream_service.training.synthetic import regional_etch

    frame = _board_frame()
    box = (60, 70, 120, 140, 3)
    etched = regional_etch(frame, 2.5, [box], np.random.default_rng(3))
    x1, y1, x2, y2, _ = box
    near = np.s_[y1 - BOX_CLEAR : y2 + BOX_CLEAR + 1, x1 - BOX_CLEAR : x2 + BOX_CLEAR + 1]
    assert np.array_equal(etched[near], frame[near])
    assert not np.array_equal(etched, frame)


def test_synthetic_items_apply_the_regional_etch(tmp_path: Path) -> None:
    plain = synthetic_items(tmp_path / "plain", boards=1, frames=2, size=256)
    etched = synthetic_items(tmp_path / "etched", boards=1, frames=2, size=256, etch_px=2.0)
    assert [(i.label, i.boxes) for i in plain] == [(i.label, i.boxes) for i in etched]
    for a, b in zip(plain, etched, strict=True):
        assert not np.array_equal(cv2.imread(str(a.frame)), cv2.imread(str(b.frame)))
