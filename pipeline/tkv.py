"""Total Kidney Volume (TKV): what the kidney-t2w data exists to measure, and its precision.

For every test-split scan the manifest lists (its slices and the volume of one voxel at
the model size: synthetic or kidney-nifti), TKV = kidney pixels x voxel volume, from the
predicted masks and from the true ones, in ml (both kidneys, either class). Reported:
- agreement: mean bias (predicted - true), its SD and the 95 % limits of agreement
  (bias +/- 1.96 SD) over the test scans, with a Bland-Altman plot;
- precision: for subjects scanned more than once (same session), the coefficient of
  variation (SD / mean) of their predicted TKV, next to that of their true TKV.
Each scan is one point: repeat scans of a subject appear separately (marked in the plot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.plots import bland_altman
from serving.atomic import write_json


def scan_volumes(manifest: dict[str, Any], counts: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Predicted and true TKV (ml) of each test scan; counts: stem -> (predicted, true) kidney pixels."""
    rows = []
    for scan in manifest.get("scans", []):
        if scan.get("split") != "test" or not scan["stems"]:
            continue
        missing = [s for s in scan["stems"] if s not in counts]
        if missing:
            raise KeyError(f"test slices {missing[:3]} of scan {scan['subject_id']}/{scan['scan']} were not evaluated")
        pred = sum(counts[s][0] for s in scan["stems"]) * scan["voxel_ml"]
        true = sum(counts[s][1] for s in scan["stems"]) * scan["voxel_ml"]
        rows.append({"subject_id": scan["subject_id"], "scan": scan["scan"], "group": scan.get("group"),
                     "predicted_ml": round(pred, 3), "true_ml": round(true, 3)})
    return rows


def agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"available": False, "reason": "no test scans with subject and voxel-size information"}
    pred = np.array([r["predicted_ml"] for r in rows])
    true = np.array([r["true_ml"] for r in rows])
    diff = pred - true
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    out: dict[str, Any] = {
        "available": True, "scans": len(rows), "subjects": len({r["subject_id"] for r in rows}),
        "mean_true_ml": float(true.mean()), "mean_predicted_ml": float(pred.mean()),
        "bias_ml": bias, "sd_ml": sd, "loa_low_ml": bias - 1.96 * sd, "loa_high_ml": bias + 1.96 * sd,
        "mean_abs_percent_error": float(np.mean(np.abs(diff) / np.maximum(true, 1e-9)) * 100),
    }
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
