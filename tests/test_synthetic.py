"""The synthetic PCB camera: determinism, jitter-only pass frames, visible defects, kinds and rate."""

from __future__ import annotations

import numpy as np
import pytest

from stream_service.errors import ConfigError
from stream_service.sources.synthetic import DEFECT_KINDS, SyntheticBoard, SyntheticCamera


def aligned_diff(camera: SyntheticCamera, frame: np.ndarray) -> np.ndarray:
    """Pixels (reference coordinates) whose binarised value differs once the known shift is undone."""
    reference = camera.reference() < 128
    dx, dy = (round(v) for v in camera.last_shift)
    shifted = np.roll(frame < 128, (-dy, -dx), axis=(0, 1))
    diff = reference != shifted
    m = camera.board.margin  # rolled-in borders are not board
    diff[:m], diff[-m:], diff[:, :m], diff[:, -m:] = False, False, False, False
    return diff


def test_same_seed_same_board_and_frames() -> None:
    a, b = SyntheticCamera(seed=7, defect_rate=0.7), SyntheticCamera(seed=7, defect_rate=0.7)
    assert np.array_equal(a.reference(), b.reference())
    for _ in range(4):
        (fa, ta), (fb, tb) = a.next_frame(), b.next_frame()
        assert np.array_equal(fa, fb)
        assert ta == tb
    assert not np.array_equal(a.reference(), SyntheticCamera(seed=8).reference())


def test_reference_is_a_binarised_pcb() -> None:
    reference = SyntheticCamera(seed=1).reference()
    assert reference.shape == (640, 640) and reference.dtype == np.uint8
    assert set(np.unique(reference)) == {0, 255}
    assert 0.1 < float(np.mean(reference == 0)) < 0.6  # copper fraction, as in DeepPCB


def test_without_jitter_shift_or_light_a_pass_frame_is_the_reference() -> None:
    camera = SyntheticCamera(seed=2, defect_rate=0, shift_px=0, jitter=0, lighting_drift=0, noise=0)
    frame, truth = camera.next_frame()
    assert truth == {"label": "pass", "boxes": []}
    assert np.array_equal(frame, camera.reference())


def test_pass_frames_differ_from_the_reference_only_by_jitter() -> None:
    camera = SyntheticCamera(seed=3, defect_rate=0)
    fractions = []
    for _ in range(12):
        frame, truth = camera.next_frame()
        assert truth == {"label": "pass", "boxes": []}
        fractions.append(float(aligned_diff(camera, frame).mean()))
    assert max(fractions) < 0.03
    assert 0.002 < float(np.mean(fractions)) < 0.02  # DeepPCB: about 1% outside defects


def test_fail_frames_have_visible_defects_inside_their_boxes() -> None:
    camera = SyntheticCamera(seed=4, defect_rate=1, max_defects=4)
    for _ in range(10):
        frame, truth = camera.next_frame()
        assert truth["label"] == "fail" and 1 <= len(truth["boxes"]) <= 4
        diff = aligned_diff(camera, frame)
        outside = np.ones_like(diff)
        dx, dy = (round(v) for v in camera.last_shift)
        for x1, y1, x2, y2, kind in truth["boxes"]:
            assert 0 <= x1 < x2 < 640 and 0 <= y1 < y2 < 640 and kind in DEFECT_KINDS
            assert 12 <= x2 - x1 + 1 <= 120 and 12 <= y2 - y1 + 1 <= 120  # DeepPCB-like sizes
            box = (slice(y1 - dy, y2 - dy + 1), slice(x1 - dx, x2 - dx + 1))
            assert np.count_nonzero(diff[box]) >= 10
            outside[box] = False
        assert diff[outside].mean() < 0.03


def test_every_kind_appears() -> None:
    camera = SyntheticCamera(seed=5, defect_rate=1, max_defects=6)
    seen: set[int] = set()
    for _ in range(120):
        seen |= {box[4] for box in camera.next_frame()[1]["boxes"]}
        if seen == set(DEFECT_KINDS):
            break
    assert seen == set(DEFECT_KINDS)


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_defect_rate_is_respected(rate: float) -> None:
    camera = SyntheticCamera(width=160, height=160, seed=6, defect_rate=rate, max_defects=2)
    n = 400
    fails = sum(camera.next_frame()[1]["label"] == "fail" for _ in range(n))
    assert abs(fails / n - rate) <= 3 * np.sqrt(rate * (1 - rate) / n) + 0.01


def test_lighting_drift_moves_levels_but_not_the_binarisation() -> None:
    camera = SyntheticCamera(seed=9, defect_rate=0, lighting_drift=0.2, noise=0, jitter=0, shift_px=0)
    frames = [camera.next_frame()[0] for _ in range(60)]
    whites = [float(f[camera.reference() == 255].mean()) for f in frames]
    assert max(whites) - min(whites) > 2
    assert all(np.array_equal(f < 128, camera.reference() < 128) for f in frames)


def test_board_of_another_size() -> None:
    board = SyntheticBoard(width=320, height=200, seed=1)
    assert board.image.shape == (200, 320)


@pytest.mark.parametrize(
    ("parameter", "value"),
    [("defect_rate", 1.5), ("max_defects", 0), ("shift_px", -1.0), ("jitter", 2.0), ("noise", -1.0)],
)
def test_out_of_range_parameters_are_named(parameter: str, value: float) -> None:
    with pytest.raises(ConfigError, match=parameter):
        SyntheticCamera(**{parameter: value})  # type: ignore[arg-type]
