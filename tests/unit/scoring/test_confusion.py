"""The one Dice rule and the confusion-matrix scores (pipeline/scoring/confusion.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.scoring.confusion import Accumulator, confusion, dice_scores, overlap_metrics
from tests.conftest import class_probs


def test_dice_scores_by_hand():
    truth = np.array([0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 0, 2, 2, 1])
    scores = dice_scores(confusion(truth, pred, 3), ["bg", "a", "b"], "x_")
    assert scores["x_dice_a"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert scores["x_dice_b"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert scores["x_mean_foreground_dice"] == pytest.approx((0.5 + 0.8) / 2)
    absent = dice_scores(confusion(np.zeros(4, int), np.zeros(4, int), 3), ["bg", "a", "b"], "y_")
    assert absent["y_dice_a"] is None and absent["y_mean_foreground_dice"] is None


def test_overlap_metrics_by_hand_and_none_for_absent_classes():
    truth = np.array([0, 1, 1, 1, 0, 0])
    pred = np.array([0, 1, 1, 0, 1, 0])
    m = overlap_metrics(confusion(truth, pred, 3), ["bg", "a", "b"])
    assert m["dice_a"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["iou_a"] == pytest.approx(2 / 4) and m["precision_a"] == m["recall_a"] == pytest.approx(2 / 3)
    assert m["dice_b"] is None and m["iou_b"] is None and m["precision_b"] is None
    assert m["mean_foreground_dice"] == m["dice_a"]            # the absent class takes no part
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)


def test_accumulator_reports_the_rule_and_the_pixelwise_argmax():
    truth = np.zeros((1, 4, 4), np.uint8)
    truth[0, :2] = 2                                   # 8 healthy pixels
    pred = truth.copy()
    pred[0, 0, :2] = 1                                 # 2 of them predicted CKD (weakly)
    conf = np.where(pred == 1, 0.5, 0.9)
    onehot = np.eye(3, dtype=np.float32)[truth]
    names = ["background", "CKD", "healthy"]
    single = Accumulator(3, single_foreground_class=True)
    single.update(onehot, class_probs(pred, conf), 0.0)
    m = single.metrics(names)
    assert m["dice_healthy"] == 1.0 and m["dice_CKD"] is None  # CKD in neither truth nor labels
    assert m["pixelwise_dice_healthy"] == pytest.approx(2 * 6 / (2 * 6 + 2))
    assert m["pixelwise_dice_CKD"] == 0.0
    plain = Accumulator(3)
    plain.update(onehot, class_probs(pred, conf), 0.0)
    assert plain.metrics(names)["dice_healthy"] == m["pixelwise_dice_healthy"]
    assert not any(k.startswith("pixelwise_") for k in plain.metrics(names))
