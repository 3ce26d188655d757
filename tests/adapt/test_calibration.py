"""Calibration fits and metrics on synthetic scores whose true reliability is known."""

from __future__ import annotations

import numpy as np
import pytest

from backend.adapt.calibration import (
    expected_calibration_error,
    fit_platt,
    fit_temperature,
    fit_thresholds,
    reliability,
    single_label_scores,
)

from ..support.vectors import softmax


def overconfident(n=2000, labels=5, true_t=2.5, seed=0):
    """Labels drawn from softmax(z / true_t): the raw logits are `true_t` times too sharp."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, labels))
    p = softmax(z / true_t)
    truth = np.array([rng.choice(labels, p=row) for row in p])
    return z, truth


def test_temperature_recovers_the_true_one_and_fixes_ece():
    z, truth = overconfident()
    t = fit_temperature(z, truth)
    assert t == pytest.approx(2.5, rel=0.1)
    before, after = single_label_scores(softmax(z), truth), single_label_scores(softmax(z / t), truth)
    assert after.ece < before.ece / 2 and after.nll < before.nll
    assert after.accuracy == before.accuracy  # a temperature never changes the decision


def test_a_few_all_correct_items_do_not_make_the_head_certain():
    z = np.array([[3.0, 0.0], [0.0, 3.0], [2.5, 0.5]])
    assert fit_temperature(z, np.array([0, 1, 0])) > 0.3  # the prior holds it near 1


def test_ece_of_perfectly_calibrated_scores_is_small_and_bins_are_reported():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0, 1, 20000)
    correct = (rng.uniform(0, 1, 20000) < confidence).astype(float)
    assert expected_calibration_error(confidence, correct) < 0.02
    assert expected_calibration_error(np.full(100, 0.9), np.zeros(100)) == pytest.approx(0.9)
    bins = reliability(confidence, correct)
    assert len(bins) == 10 and all(abs(b["accuracy"] - b["confidence"]) < 0.05 for b in bins)


def test_platt_per_label_learns_scale_and_bias_and_shrinks_rare_labels():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, size=(3000, 3))
    truth = (rng.uniform(size=z.shape) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(float)
    platt = fit_platt(z, truth)
    assert platt.a == pytest.approx(np.full(3, 0.5), abs=0.1)
    assert platt.b == pytest.approx(np.full(3, -1.0), abs=0.2)
    few = fit_platt(z[:5], truth[:5])
    assert np.ptp(few.a) < 0.2  # five items: every label keeps (nearly) the shared fit


def test_thresholds_maximise_f1_and_rare_labels_share_one():
    rng = np.random.default_rng(3)
    probs = rng.uniform(size=(400, 2))
    truth = np.zeros_like(probs)
    truth[:, 0] = probs[:, 0] > 0.7  # label 0: clean cut at 0.7
    truth[:3, 1] = 1  # label 1: three positives only
    thresholds = fit_thresholds(probs, truth)
    assert thresholds[0] == pytest.approx(0.7, abs=0.02)
    shared = fit_thresholds(probs, truth, min_positives=10_000)
    assert thresholds[1] == shared[1] == shared[0]
