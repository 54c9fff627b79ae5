"""Total Kidney Volume: per-scan volumes put back together from slices, with and without the
volume rules, Bland-Altman agreement, repeat CV, the per-scan diagnosis."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.scoring.tkv import SlicePrediction, agreement, scan_volumes, tkv_report

NAMES = ["background", "CKD", "healthy"]
H, W = 8, 12     # display slices: columns run from the patient's right (left edge) to the left


def _slice(pred: list[tuple[int, int, int, int]], truth: list[tuple[int, int, int, int]], ckd: float = 0.8
           ) -> SlicePrediction:
    """Boxes (row0, row1, col0, col1) of predicted and true kidney; CKD probability `ckd`."""
    p, t = np.zeros((H, W), bool), np.zeros((H, W), bool)
    for r0, r1, c0, c1 in pred:
        p[r0:r1, c0:c1] = True
    for r0, r1, c0, c1 in truth:
        t[r0:r1, c0:c1] = True
    fg = np.zeros((H, W, 2), np.float16)
    fg[p] = (ckd, 0.95 - ckd)
    return SlicePrediction(p, fg, t, np.full((H, W), 120, np.uint8))   # body everywhere: the midline is the middle


RIGHT = (2, 6, 1, 4)       # 12 px on the image's left: the patient's right kidney
LEFT = (2, 6, 8, 11)       # 12 px on the patient's left
SPECK = (0, 1, 10, 11)     # 1 px stray on the left, apart from the left kidney
SLICES = {
    "a1_z0": _slice([RIGHT, LEFT, SPECK], [RIGHT, LEFT]),     # predicted 25 px, true 24
    "a1_z1": _slice([RIGHT], [RIGHT, LEFT]),                  # predicted 12, true 24
    "b1_z0": _slice([RIGHT, LEFT], [RIGHT], ckd=0.2),         # a healthy scan's slice: predicted 24, true 12
}
MANIFEST = {"scale": {"plane": "coronal"}, "scans": [
    {"subject_id": "A", "scan": 1, "group": "CKD", "split": "test", "voxel_ml": 0.5, "stems": ["a1_z1", "a1_z0"]},
    {"subject_id": "B", "scan": 1, "group": "healthy", "split": "test", "voxel_ml": 0.25, "stems": ["b1_z0"]},
    {"subject_id": "C", "scan": 1, "group": "healthy", "split": "train", "voxel_ml": 0.25, "stems": ["c1_z0"]},
]}


def test_scan_volumes_with_and_without_the_rules_on_test_scans_only():
    rows = scan_volumes(MANIFEST, SLICES, class_names=NAMES, min_component_ml=2.0)
    assert [(r["subject_id"], r["scan"]) for r in rows] == [("A", 1), ("B", 1)]
    a, b = rows
    assert a["predicted_ml_without_rules"] == pytest.approx(37 * 0.5)
    assert a["predicted_ml"] == pytest.approx(36 * 0.5)          # the speck is a second component on the left
    assert a["true_ml"] == pytest.approx(48 * 0.5)
    assert (a["predicted_right_ml"], a["predicted_left_ml"]) == pytest.approx((24 * 0.5, 12 * 0.5))
    assert (a["true_right_ml"], a["true_left_ml"]) == pytest.approx((24 * 0.5, 24 * 0.5))
    assert a["predicted_class"] == "CKD" and a["class_probability"] == pytest.approx(0.8 / 0.95, abs=1e-3)
    assert b["predicted_class"] == "healthy" and b["true_ml"] == pytest.approx(12 * 0.25)
    # a left kidney under min_component_ml is dropped: 12 px x 0.25 ml = 3 ml < 4 ml
    small = scan_volumes(MANIFEST, SLICES, class_names=NAMES, min_component_ml=4.0)[1]
    assert small["predicted_ml"] == pytest.approx(0.0) and small["predicted_class"] is None
    with pytest.raises(KeyError, match="a1_z0"):
        scan_volumes(MANIFEST, {k: v for k, v in SLICES.items() if k != "a1_z0"}, class_names=NAMES,
                     min_component_ml=0.0)


def test_holes_in_a_slice_are_filled_by_the_rules():
    ring = _slice([(1, 7, 1, 6)], [(1, 7, 1, 6)])
    ring.predicted[3:5, 3] = False       # a hole inside the right kidney's outline
    manifest = {"scans": [{**MANIFEST["scans"][1], "stems": ["r"]}]}
    row = scan_volumes(manifest, {"r": ring}, class_names=NAMES, min_component_ml=0.0)[0]
    assert row["predicted_ml_without_rules"] == pytest.approx(28 * 0.25)
    assert row["predicted_ml"] == pytest.approx(30 * 0.25) == row["true_ml"]


def test_agreement_bias_limits_and_repeat_cv():
    rows = [{"subject_id": "A", "scan": 1, "predicted_ml": 110.0, "true_ml": 100.0},
            {"subject_id": "A", "scan": 2, "predicted_ml": 95.0, "true_ml": 100.0},
            {"subject_id": "B", "scan": 1, "predicted_ml": 100.0, "true_ml": 95.0}]
    stats = agreement(rows)
    pred, true = np.array([110.0, 95.0, 100.0]), np.array([100.0, 100.0, 95.0])
    diff = pred - true
    assert stats["scans"] == 3 and stats["subjects"] == 2
    per_subject = diff[[0, 2]]   # A's first scan and B: one point per subject
    assert stats["bias_ml"] == pytest.approx(per_subject.mean())
    assert stats["sd_ml"] == pytest.approx(per_subject.std(ddof=1))
    assert stats["loa_high_ml"] - stats["loa_low_ml"] == pytest.approx(2 * 1.96 * per_subject.std(ddof=1))
    assert stats["scan_bias_ml"] == pytest.approx(diff.mean())
    assert stats["repeat_subjects"] == 1
    assert stats["repeat_cv_predicted_percent"] == pytest.approx(pred[:2].std(ddof=1) / pred[:2].mean() * 100)
    assert stats["repeat_cv_true_percent"] == pytest.approx(0.0)
    assert agreement([])["available"] is False
    single = agreement(rows[1:])
    assert single["repeat_subjects"] == 0 and single["repeat_cv_reason"] == "no test subject has repeat scans"


def test_dropped_slices_of_a_test_scan_count_towards_its_tkv():
    manifest = {"scans": [{**MANIFEST["scans"][1], "tkv_extra_stems": ["b1_z1"]}]}
    extra = _slice([(0, 2, 0, 2)], [])      # a kidney-free slice with a false kidney touching the right one
    rows = scan_volumes(manifest, {**SLICES, "b1_z1": extra}, class_names=NAMES, min_component_ml=0.0)
    assert rows[0]["predicted_ml_without_rules"] == pytest.approx((24 + 4) * 0.25)
    assert rows[0]["true_ml"] == pytest.approx(12 * 0.25)


def test_report_writes_both_agreements_the_class_accuracy_and_the_plot(tmp_path):
    stats = tkv_report(MANIFEST, SLICES, tmp_path / "tkv.json", tmp_path / "ba.png", class_names=NAMES,
                       min_component_ml=2.0)
    written = json.loads((tmp_path / "tkv.json").read_text())
    assert written["bias_ml"] == pytest.approx(stats["bias_ml"]) and len(written["per_scan"]) == 2
    assert written["without_rules"]["bias_ml"] == pytest.approx(((37 - 48) * 0.5 + (24 - 12) * 0.25) / 2)
    assert written["volume_class_accuracy"] == 1.0 and written["min_component_ml"] == 2.0
    assert (tmp_path / "ba.png").stat().st_size > 5000
    empty = tkv_report({"subjects": []}, {}, tmp_path / "none.json", tmp_path / "none.png", class_names=NAMES,
                       min_component_ml=0.0)
    assert empty["available"] is False and (tmp_path / "none.png").is_file()
