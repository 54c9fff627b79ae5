"""Total Kidney Volume: per-scan volumes from slice counts, Bland-Altman agreement, repeat CV."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.scoring.tkv import agreement, scan_volumes, tkv_report

MANIFEST = {"scans": [
    {"subject_id": "A", "scan": 1, "group": "CKD", "split": "test", "voxel_ml": 0.5, "stems": ["a1_0", "a1_1"]},
    {"subject_id": "A", "scan": 2, "group": "CKD", "split": "test", "voxel_ml": 0.5, "stems": ["a2_0"]},
    {"subject_id": "B", "scan": 1, "group": "healthy", "split": "test", "voxel_ml": 0.25, "stems": ["b1_0"]},
    {"subject_id": "C", "scan": 1, "group": "healthy", "split": "train", "voxel_ml": 0.25, "stems": ["c1_0"]},
]}
COUNTS = {"a1_0": (100, 90), "a1_1": (120, 110), "a2_0": (190, 200), "b1_0": (400, 380)}


def test_scan_volumes_sum_slices_times_voxel_volume_on_test_scans_only():
    rows = scan_volumes(MANIFEST, COUNTS)
    assert [(r["subject_id"], r["scan"]) for r in rows] == [("A", 1), ("A", 2), ("B", 1)]
    assert rows[0]["predicted_ml"] == pytest.approx((100 + 120) * 0.5)
    assert rows[0]["true_ml"] == pytest.approx((90 + 110) * 0.5)
    assert rows[2]["predicted_ml"] == pytest.approx(400 * 0.25)
    with pytest.raises(KeyError, match="a2_0"):
        scan_volumes(MANIFEST, {k: v for k, v in COUNTS.items() if k != "a2_0"})


def test_agreement_bias_limits_and_repeat_cv():
    rows = scan_volumes(MANIFEST, COUNTS)
    stats = agreement(rows)
    pred = np.array([110.0, 95.0, 100.0])
    true = np.array([100.0, 100.0, 95.0])
    diff = pred - true
    assert stats["scans"] == 3 and stats["subjects"] == 2
    per_subject = diff[[0, 2]]   # A's first scan and B: one point per subject
    assert stats["bias_ml"] == pytest.approx(per_subject.mean())
    assert stats["sd_ml"] == pytest.approx(per_subject.std(ddof=1))
    assert stats["loa_high_ml"] - stats["loa_low_ml"] == pytest.approx(2 * 1.96 * per_subject.std(ddof=1))
    assert stats["scan_bias_ml"] == pytest.approx(diff.mean())
    assert stats["scan_sd_ml"] == pytest.approx(diff.std(ddof=1))
    assert stats["repeat_subjects"] == 1
    a_pred = pred[:2]
    assert stats["repeat_cv_predicted_percent"] == pytest.approx(a_pred.std(ddof=1) / a_pred.mean() * 100)
    assert stats["repeat_cv_true_percent"] == pytest.approx(0.0)
    assert agreement([])["available"] is False
    single = agreement([r for r in rows if r["subject_id"] == "B"] + rows[:1])
    assert single["repeat_subjects"] == 0 and single["repeat_cv_reason"] == "no test subject has repeat scans"


def test_dropped_slices_of_a_test_scan_count_towards_its_tkv():
    manifest = {"scans": [{**MANIFEST["scans"][2], "tkv_extra_stems": ["b1_x"]}]}
    rows = scan_volumes(manifest, {**COUNTS, "b1_x": (40, 0)})
    assert rows[0]["predicted_ml"] == pytest.approx((400 + 40) * 0.25)
    assert rows[0]["true_ml"] == pytest.approx(380 * 0.25)


def test_report_writes_json_and_plot(tmp_path):
    stats = tkv_report(MANIFEST, COUNTS, tmp_path / "tkv.json", tmp_path / "ba.png")
    written = json.loads((tmp_path / "tkv.json").read_text())
    assert written["bias_ml"] == pytest.approx(stats["bias_ml"]) and len(written["per_scan"]) == 3
    assert (tmp_path / "ba.png").stat().st_size > 5000
    empty = tkv_report({"subjects": []}, {}, tmp_path / "none.json", tmp_path / "none.png")
    assert empty["available"] is False and (tmp_path / "none.png").is_file()
