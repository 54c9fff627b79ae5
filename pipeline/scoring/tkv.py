"""Total Kidney Volume (TKV): what the kidney-t2w data exists to measure, and its precision.

For every test-split scan the manifest lists (its slices and the volume of one voxel at
the model size: synthetic or kidney-nifti), TKV = kidney pixels x voxel volume, from the
predicted masks and from the true ones, in ml (both kidneys, either class). Reported:
- agreement: mean bias (predicted - true), its SD and the 95 % limits of agreement
  (bias +/- 1.96 SD) over the test subjects (each subject's first scan; `scan_*` over
  every scan), with a Bland-Altman plot;
- precision: for subjects scanned more than once (same session), the coefficient of
  variation (SD / mean) of their predicted TKV, next to that of their true TKV.
A scan's slices include those its split leaves out (kidney-free ones, kept for TKV only),
so a false kidney anywhere in the scan counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.plots import bland_altman
from common.atomic import write_json


def scan_volumes(manifest: dict[str, Any], counts: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Predicted and true TKV (ml) of each test scan; counts: stem -> (predicted, true) kidney pixels."""
    rows = []
    for scan in manifest.get("scans", []):
        if scan.get("split") != "test" or not scan["stems"]:
            continue
        stems = scan["stems"] + scan.get("tkv_extra_stems", [])
        missing = [s for s in stems if s not in counts]
        if missing:
            raise KeyError(f"test slices {missing[:3]} of scan {scan['subject_id']}/{scan['scan']} were not evaluated")
        pred = sum(counts[s][0] for s in stems) * scan["voxel_ml"]
        true = sum(counts[s][1] for s in stems) * scan["voxel_ml"]
        row = {"subject_id": scan["subject_id"], "scan": scan["scan"], "group": scan.get("group"),
               "predicted_ml": round(pred, 3), "true_ml": round(true, 3)}
        if "true_tkv_ml_native" in scan:   # real data: the truth before resampling to the model size
            row["true_native_ml"] = round(scan["true_tkv_ml_native"], 3)
        rows.append(row)
    return rows


def _limits(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    diff = pred - true
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    return {"bias_ml": bias, "sd_ml": sd, "loa_low_ml": bias - 1.96 * sd, "loa_high_ml": bias + 1.96 * sd}


def agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Bland-Altman statistics. Headline: one point per subject (its first scan), so a
    subject scanned five times does not count five times; `scan_*`: every scan."""
    if not rows:
        return {"available": False, "reason": "no test scans with subject and voxel-size information"}
    first = [min((r for r in rows if r["subject_id"] == s), key=lambda r: r["scan"])
             for s in sorted({r["subject_id"] for r in rows})]
    pred = np.array([r["predicted_ml"] for r in first])
    true = np.array([r["true_ml"] for r in first])
    all_pred = np.array([r["predicted_ml"] for r in rows])
    all_true = np.array([r["true_ml"] for r in rows])
    out: dict[str, Any] = {
        "available": True, "subjects": len(first), "scans": len(rows),
        "mean_true_ml": float(true.mean()), "mean_predicted_ml": float(pred.mean()), **_limits(pred, true),
        "mean_abs_percent_error": float(np.mean(np.abs(pred - true) / np.maximum(true, 1e-9)) * 100),
        **{f"scan_{k}": v for k, v in _limits(all_pred, all_true).items()},
    }
    native = [r for r in rows if "true_native_ml" in r]
    if native:   # how much of the "truth" is resampling to the model size
        out["true_resampling_bias_ml"] = float(np.mean([r["true_ml"] - r["true_native_ml"] for r in native]))
    repeats = {}
    for subject in sorted({r["subject_id"] for r in rows}):
        scans = [r for r in rows if r["subject_id"] == subject]
        if len(scans) > 1:
            p = np.array([r["predicted_ml"] for r in scans])
            t = np.array([r["true_ml"] for r in scans])
            repeats[subject] = {"scans": len(scans), "cv_predicted_percent": float(p.std(ddof=1) / p.mean() * 100),
                                "cv_true_percent": float(t.std(ddof=1) / t.mean() * 100)}
    out["repeat_subjects"] = len(repeats)
    if repeats:
        out["repeat_cv_predicted_percent"] = float(np.mean([v["cv_predicted_percent"] for v in repeats.values()]))
        out["repeat_cv_true_percent"] = float(np.mean([v["cv_true_percent"] for v in repeats.values()]))
    else:
        out["repeat_cv_reason"] = "no test subject has repeat scans"
    out["repeat_subject_cv"] = repeats
    return out


def tkv_report(manifest: dict[str, Any], counts: dict[str, tuple[int, int]], json_path: Path,
               plot_path: Path) -> dict[str, Any]:
    """Write metrics/tkv.json and the Bland-Altman PNG (a note in the figure if unavailable)."""
    rows = scan_volumes(manifest, counts)
    stats = agreement(rows)
    write_json(json_path, {**stats, "per_scan": rows})
    bland_altman(rows, stats, plot_path)
    return stats
