"""Drift tests (xfer/drift/): each keeps its level on windows from one distribution and finds a real shift."""

from __future__ import annotations

import numpy as np
import pytest

from xfer.drift import DRIFT_TESTS, DriftError, Window, run_tests
from xfer.drift.accuracy import calibrate
from xfer.drift.base import permutation_p_value
from xfer.drift.mmd import mmd2, squared_distances

DIMS, CLASSES = 16, 4
WEIGHTS = np.random.default_rng(123).normal(size=(DIMS, CLASSES))


def window(rng: np.random.Generator, n: int, shift: float = 0.0, class_weights=None) -> Window:
    """n rows of a 4-class mixture in 16 dims (class means apart), its probabilities from one fixed linear model.
    `shift` moves every feature by that many standard deviations; `class_weights` changes the class mix."""
    means = np.random.default_rng(7).normal(scale=1.5, size=(CLASSES, DIMS))
    labels = rng.choice(CLASSES, size=n, p=class_weights)
    x = means[labels] + rng.normal(size=(n, DIMS)) + shift
    logits = x @ WEIGHTS
    p = np.exp(logits - logits.max(1, keepdims=True))
    return Window(x, p / p.sum(1, keepdims=True))


@pytest.mark.parametrize("name", list(DRIFT_TESTS))
def test_reference_against_reference_raises_no_alarm_in_19_of_20_seeded_draws(name):
    alarms = 0
    for draw in range(20):
        rng = np.random.default_rng(1000 + draw)
        alarms += DRIFT_TESTS[name](window(rng, 150), window(rng, 100), alpha=0.05, seed=draw).drift
    assert alarms <= 1, f"{name}: {alarms} false alarms in 20 draws at alpha 0.05"


@pytest.mark.parametrize("name, shift, class_weights", [
    ("mmd", 0.5, None),
    ("domain_classifier", 0.5, None),
    ("class_ks", 0.0, [0.85, 0.05, 0.05, 0.05]),  # label shift: the features of each class are as before
])  # fmt: skip
def test_a_real_shift_is_found_in_every_seeded_draw(name, shift, class_weights):
    for draw in range(10):
        rng = np.random.default_rng(2000 + draw)
        result = DRIFT_TESTS[name](window(rng, 150), window(rng, 100, shift, class_weights), alpha=0.05, seed=draw)
        assert result.drift, (draw, result)


def test_the_classifiers_auc_is_half_without_drift_and_near_one_with_a_large_one():
    rng = np.random.default_rng(5)
    same = DRIFT_TESTS["domain_classifier"](window(rng, 200), window(rng, 200), alpha=0.05, seed=0)
    far = DRIFT_TESTS["domain_classifier"](window(rng, 200), window(rng, 200, shift=3.0), alpha=0.05, seed=0)
    assert abs(same.detail["auc"] - 0.5) < 0.1 and far.detail["auc"] > 0.99


def test_mmd_matches_its_definition_and_a_permutation_p_value_is_never_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    kernel = np.exp(-squared_distances(x) / 2.0)
    is_new = np.array([False] * 4 + [True] * 3)
    a, b = x[:4], x[4:]

    def k(u, v):
        return np.exp(-((u[:, None, :] - v[None, :, :]) ** 2).sum(-1) / 2.0)

    expected = k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()
    np.testing.assert_allclose(mmd2(kernel, is_new)[0], expected, rtol=1e-12)
    assert permutation_p_value(5.0, np.zeros(99)) == 0.01 and permutation_p_value(0.0, np.zeros(99)) == 1.0


def test_the_same_windows_and_seed_give_the_same_answer():
    rng = np.random.default_rng(9)
    ref, new = window(rng, 60), window(rng, 40, shift=0.2)
    first = run_tests(ref, new, alpha=0.05, seed=3)
    again = run_tests(ref, new, alpha=0.05, seed=3)
    assert {k: v.as_dict() for k, v in first.items()} == {k: v.as_dict() for k, v in again.items()}


def test_atc_finds_the_accuracy_when_the_mix_of_easy_and_hard_images_shifts():
    """Easy images: confidence 0.8-1.0, always right; hard ones: confidence 0.5-0.7, right one time in
    four (over-confident). Calibrated where 60% are easy, ATC's threshold falls where the hard images'
    right share is, so it follows the accuracy as that mix moves; the mean confidence does not."""
    rng = np.random.default_rng(0)

    def outputs(n, easy_share):
        easy = rng.random(n) < easy_share
        confidence = np.where(easy, rng.uniform(0.8, 1.0, n), rng.uniform(0.5, 0.7, n))
        right = easy | (rng.random(n) < 0.25)
        return np.column_stack([confidence, 1 - confidence]), np.where(right, 0, 1)

    threshold = calibrate(*outputs(4000, 0.6))
    assert abs(threshold.calibration_accuracy - 0.7) < 0.02
    for easy_share in (0.6, 0.3, 0.9):
        probs, labels = outputs(4000, easy_share)
        accuracy = float((probs.argmax(1) == labels).mean())
        assert abs(threshold.estimate(probs) - accuracy) < 0.03, (easy_share, threshold.estimate(probs), accuracy)
        if easy_share == 0.3:
            assert probs.max(1).mean() - accuracy > 0.15  # the naive estimate is far off here


def test_windows_a_test_cannot_use_are_refused_naming_the_problem():
    rng = np.random.default_rng(0)
    with pytest.raises(DriftError, match="same n rows"):
        Window(rng.normal(size=(10, 4)), rng.random((9, 2)))
    with pytest.raises(DriftError, match="too small"):
        Window(rng.normal(size=(3, 4)), rng.random((3, 2)))
    with pytest.raises(DriftError, match="non-finite"):
        Window(np.full((10, 4), np.nan), rng.random((10, 2)))
    with pytest.raises(DriftError, match="different models"):
        run_tests(Window(rng.normal(size=(10, 4)), rng.random((10, 2))), Window(rng.normal(size=(10, 5)), rng.random((10, 2))), alpha=0.05, seed=0)
    with pytest.raises(DriftError, match="unknown drift tests"):
        run_tests(window(rng, 10), window(rng, 10), alpha=0.05, seed=0, tests=("kl",))
    with pytest.raises(DriftError, match="alpha 1.5"):
        run_tests(window(rng, 10), window(rng, 10), alpha=1.5, seed=0)
