"""The verdict threshold the model card ships: both validation rates kept furthest inside their targets."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from stream_service.training.ship import choose_threshold


def rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """(miss rate, false-alarm rate) of crops judged fail at score >= threshold, as score.py counts them."""
    return float(np.mean(scores[labels] < threshold)), float(np.mean(scores[~labels] >= threshold))


def test_separable_scores_get_a_threshold_between_the_classes() -> None:
    scores = np.array([0.05, 0.1, 0.2, 0.8, 0.9, 0.95])
    labels = np.array([False, False, False, True, True, True])
    choice = choose_threshold(scores, labels)
    assert 0.2 < choice.value < 0.8
    assert (choice.miss_rate, choice.false_alarm_rate) == (0.0, 0.0) == rates(scores, labels, choice.value)


def test_the_noisier_rate_gets_the_larger_margin() -> None:
    # 500 fail crops, 400 pass crops with overlapping tails: moving the threshold trades misses for alarms.
    rng = np.random.default_rng(3)
    fails = np.concatenate([rng.uniform(0.6, 1.0, 490), np.linspace(0.05, 0.5, 10)])
    passes = np.concatenate([rng.uniform(0.0, 0.04, 380), np.linspace(0.06, 0.55, 20)])
    scores, labels = np.concatenate([fails, passes]), np.concatenate([np.ones(500, bool), np.zeros(400, bool)])
    choice = choose_threshold(scores, labels, max_miss=0.01, max_false_alarm=0.03)
    miss, alarms = rates(scores, labels, choice.value)
    assert (choice.miss_rate, choice.false_alarm_rate) == (pytest.approx(miss), pytest.approx(alarms))
    assert miss <= 0.01 and alarms <= 0.03  # both targets met on this data
    se_miss, se_alarm = np.sqrt(0.01 * 0.99 / 500), np.sqrt(0.03 * 0.97 / 400)
    assert choice.margin_se == pytest.approx(min((0.01 - miss) / se_miss, (0.03 - alarms) / se_alarm))
    for t in np.linspace(0.0, 1.0, 2001):  # no threshold leaves a larger smaller-margin
        m, a = rates(scores, labels, float(t))
        assert min((0.01 - m) / se_miss, (0.03 - a) / se_alarm) <= choice.margin_se + 1e-9


def test_the_threshold_lies_midway_between_scores_and_needs_both_classes() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    labels = np.array([False, False, False, True, True, True])
    assert choose_threshold(scores, labels).value == pytest.approx(0.5)  # as far as it can be from both
    with pytest.raises(ValueError, match="expected fail and pass scores, found 0 and 3"):
        choose_threshold(scores[:3], labels[:3])
