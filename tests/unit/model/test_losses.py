"""Losses and training metrics compute what they claim (pipeline/model/losses.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.model.losses import ClassOverlap, DiceCoefMulticlass, dice_coef_multiclass, training_metrics


def test_dice_coef_multiclass_by_hand():
    y_true = np.zeros((1, 2, 2, 2), np.float32)
    y_true[0, 0, :, 1] = 1
    y_true[0, 1, :, 0] = 1
    y_pred = np.full((1, 2, 2, 2), 0.5, np.float32)
    # per class: 2*1 / (2 + 2) = 0.5
    assert float(dice_coef_multiclass(y_true, y_pred)) == pytest.approx(0.5, abs=1e-5)
    assert float(dice_coef_multiclass(y_true, y_true)) == pytest.approx(1.0, abs=1e-5)


def test_seed_metric_accumulates_over_the_epoch():
    """Batches lacking a class must not drag the epoch value down: the stateful metric equals
    the function on the whole set at once, unlike the per-batch mean Keras would take."""
    rng = np.random.default_rng(1)
    truth = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (4, 8, 8))]
    truth[:2, ..., 2] = 0  # class 2 absent from the first two samples
    truth[:2, ..., 0] = 1 - truth[:2, ..., 1]
    pred = (0.9 * truth + 0.1 * rng.dirichlet([1, 1, 1], (4, 8, 8))).astype(np.float32)  # a good model
    metric = DiceCoefMulticlass(3)
    for i in range(4):
        metric.update_state(truth[i:i + 1], pred[i:i + 1])
    whole = float(dice_coef_multiclass(truth, pred))
    per_batch = np.mean([float(dice_coef_multiclass(truth[i:i + 1], pred[i:i + 1])) for i in range(4)])
    assert float(metric.result()) == pytest.approx(whole, abs=1e-5)
    assert whole - per_batch > 0.1  # what the seed's per-batch validation curve showed
    metric.reset_state()
    metric.update_state(truth, truth)
    assert float(metric.result()) == pytest.approx(1.0, abs=1e-5)


def test_class_overlap_accumulates_over_batches():
    rng = np.random.default_rng(0)
    truth = np.eye(3)[rng.integers(0, 3, (4, 8, 8))].astype(np.float32)
    pred = np.eye(3)[rng.integers(0, 3, (4, 8, 8))].astype(np.float32)
    dice, iou = ClassOverlap(1, "dice"), ClassOverlap(1, "iou")
    for i in range(4):
        dice.update_state(truth[i:i + 1], pred[i:i + 1])
        iou.update_state(truth[i:i + 1], pred[i:i + 1])
    t, p = truth.argmax(-1) == 1, pred.argmax(-1) == 1
    tp, fp, fn = (t & p).sum(), (~t & p).sum(), (t & ~p).sum()
    assert float(dice.result()) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-5)
    assert float(iou.result()) == pytest.approx(tp / (tp + fp + fn), abs=1e-5)
    assert [m.name for m in training_metrics(["bg", "CKD", "healthy"])[1:]] == [
        "dice_CKD", "iou_CKD", "dice_healthy", "iou_healthy"]
