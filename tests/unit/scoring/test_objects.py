"""Object-level scores (pipeline/scoring/objects.py) on masks drawn by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.scoring.objects import ComponentCounts, ObjectCounts, ObjectScores, component_sanity, detection_scores


def _boxes(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]], value: int = 1) -> np.ndarray:
    """Rectangles (row0, row1, col0, col1), ends inclusive."""
    mask = np.zeros(shape, dtype=np.int64)
    for r0, r1, c0, c1 in boxes:
        mask[r0:r1 + 1, c0:c1 + 1] = value
    return mask


# A: 16 px, found smaller (12 px: IoU 0.75, Dice 6/7, area error -0.25).
# B: 16 px, found larger (20 px: IoU 0.8, Dice 8/9, area error +0.25).
# C: 24 px, found as two 8 px pieces (IoU 1/3 each: no match, two unmatched predictions).
# one 4 px false positive far from everything.
TRUTH = _boxes((20, 30), [(1, 4, 1, 4), (1, 4, 8, 11), (10, 13, 1, 6)])
PRED = _boxes((20, 30), [(1, 4, 1, 3), (1, 4, 8, 12), (10, 13, 1, 2), (10, 13, 5, 6), (16, 17, 20, 21)])


def test_detection_by_hand_two_matches_a_split_object_and_a_false_positive():
    counts = detection_scores(TRUTH, PRED)
    assert (counts.true, counts.predicted, counts.matched) == (3, 5, 2)
    m = counts.metrics()
    assert m["object_precision"] == pytest.approx(2 / 5)
    assert m["object_recall"] == pytest.approx(2 / 3)
    assert m["object_f1"] == pytest.approx(2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3)) == pytest.approx(0.5)
    assert m["object_dice_mean"] == pytest.approx((6 / 7 + 8 / 9) / 2)
    assert m["object_area_error_mean"] == pytest.approx(0.0)           # -0.25 and +0.25
    assert m["object_abs_area_error_mean"] == pytest.approx(0.25)


def test_a_lower_threshold_matches_one_piece_of_the_split_object():
    # At IoU >= 0.3 each 8 px piece of C (IoU 1/3) is a candidate; one object matches once.
    counts = detection_scores(TRUTH, PRED, iou=0.3)
    assert counts.matched == 3 and counts.predicted == 5
    assert counts.dice_sum == pytest.approx(6 / 7 + 8 / 9 + 2 * 8 / 32)


def test_assignment_takes_the_most_matches_when_candidates_are_shared():
    # T1 (32 px) has candidates P1 (IoU 0.5) and P2 (12/47); T2 (12 px) has P2 (12/27).
    truth = _boxes((10, 10), [(0, 3, 0, 7), (5, 8, 5, 7)])
    pred = _boxes((10, 10), [(0, 3, 0, 3), (0, 8, 5, 7)])
    pred[0:4, 4] = 0                      # keep P1 and P2 apart
    counts = detection_scores(truth, pred, iou=0.25)
    assert counts.matched == 2
    assert counts.dice_sum == pytest.approx(2 * 16 / 48 + 2 * 12 / 39)
    assert detection_scores(truth, pred).matched == 1   # at 0.5: T1-P1 only (exactly 0.5 counts)


def test_diagonal_neighbours_are_one_object_and_classes_are_separate():
    staircase = np.eye(5, dtype=np.int64)
    assert detection_scores(staircase, staircase).true == 1          # 8-connected
    counts = detection_scores(staircase, 2 * staircase)               # predicted as class 2
    assert (counts.true, counts.predicted, counts.matched) == (1, 0, 0)
    assert counts.metrics()["object_precision"] is None and counts.metrics()["object_f1"] == 0.0


def test_absent_objects_score_none_and_counts_add_up():
    empty = np.zeros((8, 8), dtype=np.int64)
    m = detection_scores(empty, empty).metrics()
    assert m["objects_true"] == m["objects_predicted"] == 0
    assert all(m[k] is None for k in ("object_precision", "object_recall", "object_f1", "object_dice_mean",
                                      "object_area_error_mean", "object_abs_area_error_mean"))
    total = ObjectCounts()
    total += detection_scores(TRUTH, PRED)
    total += detection_scores(TRUTH, TRUTH)
    assert (total.true, total.predicted, total.matched) == (6, 8, 5)
    assert total.metrics()["object_f1"] == pytest.approx(10 / 14)
    with pytest.raises(ValueError, match="differ in shape"):
        detection_scores(empty, np.zeros((8, 9), dtype=np.int64))


def test_component_sanity_counts_what_lies_beyond_two_kidneys():
    slice_ = _boxes((24, 24), [(2, 12, 2, 7), (2, 10, 14, 18)], value=1)   # two kidneys
    assert component_sanity(slice_) == 0
    slice_[20, 1] = 2                                                       # a 1 px stray of the other class
    slice_[20:22, 20] = 1                                                   # a 2 px stray
    assert component_sanity(slice_) == 2
    counts = ComponentCounts()
    for s in (slice_, _boxes((24, 24), [(2, 12, 2, 7)]), np.zeros((24, 24), dtype=np.int64)):
        counts.add(s)
    assert counts.metrics() == {"stray_components": 2, "stray_components_per_slice": pytest.approx(2 / 3),
                                "slices_with_stray_components": 1, "stray_pixels": 3}
    assert ComponentCounts().metrics()["stray_components_per_slice"] is None


def test_object_scores_follow_the_mode_over_a_batch():
    truth, pred = np.stack([TRUTH, TRUTH]), np.stack([PRED, TRUTH])
    detection = ObjectScores("detection", num_classes=2)
    detection.add(truth, pred)
    assert detection.metrics()["objects_matched"] == 5 and detection.metrics()["objects_true"] == 6
    components = ObjectScores("components", num_classes=2)
    components.add(truth, pred)   # PRED: 12, 20, 8, 8, 4 px (strays 8 + 8 + 4); TRUTH: 16, 16, 24 (stray 16)
    assert components.metrics()["stray_components"] == 4 and components.metrics()["stray_pixels"] == 20 + 16
    none = ObjectScores("none", num_classes=2)
    none.add(truth, pred)
    assert none.metrics() == {}
    with pytest.raises(ValueError, match="detection, components or none"):
        ObjectScores("pixels", 2)
