"""Uncertainty AUROC (pipeline/scoring/auroc.py): exact at its histogram resolution."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.scoring.auroc import UncertaintyAuroc
from serving.uncertainty import normalised_entropy
from tests.conftest import class_probs


def _pairwise(scores: np.ndarray, wrong: np.ndarray) -> float:
    """AUROC by counting every (wrong, right) pair: 1 if the wrong one scores higher, 1/2 if tied."""
    pos, neg = scores[wrong], scores[~wrong]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@pytest.mark.parametrize("bins", [16, 1024, 65536])
def test_auroc_equals_the_pairwise_count_of_the_binned_values(bins):
    rng = np.random.default_rng(bins)
    u = rng.random(400)
    wrong = rng.random(400) < 0.5 * u + 0.1   # uncertain pixels are wrong more often
    acc = UncertaintyAuroc(bins)
    acc.add(u[:150], wrong[:150])            # streamed in two chunks
    acc.add(u[150:], wrong[150:])
    expected = _pairwise(np.floor(u * bins), wrong)
    assert acc.auroc() == pytest.approx(expected, abs=1e-12)
    assert 0.5 < expected < 1.0
    m = acc.metrics()
    assert m["uncertainty_mean_wrong"] == pytest.approx(u[wrong].mean())
    assert m["uncertainty_mean_right"] == pytest.approx(u[~wrong].mean())
    assert m["uncertainty_wrong_pixels"] == wrong.sum()


def test_perfect_reversed_and_undefined():
    u = np.array([0.0, 0.1, 0.2, 0.7, 0.9, 1.0])
    wrong = np.array([False, False, False, True, True, True])
    perfect, reversed_ = UncertaintyAuroc(), UncertaintyAuroc()
    perfect.add(u, wrong)
    reversed_.add(u, ~wrong)
    assert perfect.auroc() == 1.0 and reversed_.auroc() == 0.0
    ties = UncertaintyAuroc()
    ties.add(np.full(4, 0.3), np.array([True, False, True, False]))
    assert ties.auroc() == 0.5
    right_only = UncertaintyAuroc()
    right_only.add(u, np.zeros(6, dtype=bool))
    m = right_only.metrics()
    assert m["uncertainty_auroc"] is None and m["uncertainty_mean_wrong"] is None
    assert m["uncertainty_mean_right"] == pytest.approx(u.mean()) and m["uncertainty_wrong_pixels"] == 0


def test_update_uses_normalised_entropy_and_argmax_against_the_truth():
    rng = np.random.default_rng(3)
    classes = rng.integers(0, 3, size=(2, 8, 8))
    confidence = rng.uniform(0.4, 1.0, size=classes.shape)
    probs = class_probs(classes, confidence)
    truth = np.where(confidence < 0.6, (classes + 1) % 3, classes)   # the unsure ones are wrong
    acc = UncertaintyAuroc()
    acc.update(probs, truth)
    assert acc.auroc() == 1.0
    u = normalised_entropy(probs)
    assert acc.metrics()["uncertainty_mean_wrong"] == pytest.approx(u[confidence < 0.6].mean())
