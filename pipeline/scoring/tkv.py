"""Total Kidney Volume (TKV): what the kidney-t2w data exists to measure, and its precision.

Every test-split scan the manifest lists (its slices in order, the volume of one voxel at
the model size, the slicing plane; synthetic or kidney-nifti) is put back together from
the evaluated slices and measured by serving.kidneys, the functions `flexunet predict`
applies to a scan: the predicted kidney with and without the volume rules (one kidney per
side, small components dropped, holes filled), and the true kidney, each split into right
and left. A scan's slices include those its split leaves out (kidney-free ones, kept for
TKV only), so a false kidney anywhere in the scan counts. Each scan also gets one
diagnosis (the rules' summed probabilities), scored against its group.

Reported (metrics/tkv.json), for the rules' TKV and, under `without_rules`, the plain one:
- agreement: mean bias (predicted - true), its SD and the 95 % limits of agreement
  (bias +/- 1.96 SD) over the test subjects (each subject's first scan; `scan_*` over
  every scan), with a Bland-Altman plot of both;
- precision: for subjects scanned more than once (same session), the coefficient of
  variation (SD / mean) of their predicted TKV, next to that of their true TKV.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_json
from pipeline.plots import bland_altman
from serving.kidneys import apply_rules, body_midline, diagnose, kidney_volumes
from serving.preparation import display_geometry

WITH, WITHOUT = "predicted_ml", "predicted_ml_without_rules"


@dataclass(frozen=True)
class SlicePrediction:
    """What TKV needs of one evaluated slice (model size)."""

    predicted: np.ndarray     # bool (h, w): the model's kidney (argmax not background)
    foreground: np.ndarray    # float16 (h, w, K-1): the foreground classes' probabilities
    truth: np.ndarray         # bool (h, w): the true kidney
    image: np.ndarray         # uint8 (h, w): the slice (grey), where the body's midline is found


def scan_volumes(manifest: dict[str, Any], slices: dict[str, SlicePrediction], *, class_names: list[str],
                 min_component_ml: float) -> list[dict[str, Any]]:
    """Predicted (with and without the volume rules) and true TKV (ml) of each test scan."""
    plane = (manifest.get("scale") or {}).get("plane") or "coronal"
    rows = []
    for scan in manifest.get("scans", []):
        if scan.get("split") != "test" or not scan["stems"]:
            continue
        stems = sorted(scan["stems"] + scan.get("tkv_extra_stems", []), key=_slice_order)
        missing = [s for s in stems if s not in slices]
        if missing:
            raise KeyError(f"test slices {missing[:3]} of scan {scan['subject_id']}/{scan['scan']} were not evaluated")
        h, w = slices[stems[0]].truth.shape
        g = display_geometry(len(stems), h, w, plane=plane)
        predicted = g.stack_to_ras(np.stack([slices[s].predicted for s in stems]))
        truth = g.stack_to_ras(np.stack([slices[s].truth for s in stems]))
        voxel = scan["voxel_ml"]
        midline = body_midline(g.stack_to_ras(np.stack([slices[s].image for s in stems])))
        kept = apply_rules(predicted, voxel, plane_axis=g.axis, min_component_ml=min_component_ml, midline=midline)
        mass = g.stack_to_ras(np.stack([slices[s].foreground for s in stems]))[kept].sum(axis=0, dtype=np.float64)
        diagnosis, probability = diagnose(mass)
        ruled, plain, true = (kidney_volumes(v, voxel, midline) for v in (kept, predicted, truth))
        row = {"subject_id": scan["subject_id"], "scan": scan["scan"], "group": scan.get("group"),
               WITH: round(ruled.tkv_ml, 3), WITHOUT: round(plain.tkv_ml, 3), "true_ml": round(true.tkv_ml, 3),
               "predicted_right_ml": round(ruled.right_ml, 3), "predicted_left_ml": round(ruled.left_ml, 3),
               "true_right_ml": round(true.right_ml, 3), "true_left_ml": round(true.left_ml, 3),
               "predicted_class": None if diagnosis is None else class_names[diagnosis],
               "class_probability": probability}
        if "true_tkv_ml_native" in scan:   # real data: the truth before resampling to the model size
            row["true_native_ml"] = round(scan["true_tkv_ml_native"], 3)
        rows.append(row)
    return rows


def _slice_order(stem: str) -> list[int | str]:
    """`sub-001_scan1_z07` sorts before `..._z10` and `..._z100` (numbers compared as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", stem)]


def _limits(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    diff = pred - true
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    return {"bias_ml": bias, "sd_ml": sd, "loa_low_ml": bias - 1.96 * sd, "loa_high_ml": bias + 1.96 * sd}


def agreement(rows: list[dict[str, Any]], key: str = WITH) -> dict[str, Any]:
    """Bland-Altman statistics of `key` against the truth. Headline: one point per subject
    (its first scan), so a subject scanned five times does not count five times; `scan_*`:
    every scan."""
    if not rows:
        return {"available": False, "reason": "no test scans with subject and voxel-size information"}
    first = [min((r for r in rows if r["subject_id"] == s), key=lambda r: r["scan"])
             for s in sorted({r["subject_id"] for r in rows})]
    pred = np.array([r[key] for r in first])
    true = np.array([r["true_ml"] for r in first])
    all_pred = np.array([r[key] for r in rows])
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
            p = np.array([r[key] for r in scans])
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


def tkv_report(manifest: dict[str, Any], slices: dict[str, SlicePrediction], json_path: Path, plot_path: Path, *,
               class_names: list[str], min_component_ml: float) -> dict[str, Any]:
    """Write metrics/tkv.json and the Bland-Altman PNG (a note in the figure if unavailable)."""
    rows = scan_volumes(manifest, slices, class_names=class_names, min_component_ml=min_component_ml)
    stats = agreement(rows)
    if rows:
        without = {k: v for k, v in agreement(rows, WITHOUT).items() if not k.startswith("repeat_subject")}
        judged = [r["predicted_class"] == r["group"] for r in rows if r["group"] in class_names]
        stats.update(min_component_ml=min_component_ml, without_rules=without,
                     volume_class_accuracy=float(np.mean(judged)) if judged else None)
    write_json(json_path, {**stats, "per_scan": rows})
    bland_altman(rows, [(WITH, "with the volume rules", stats), (WITHOUT, "without", stats.get("without_rules", {}))]
                 if rows else [], plot_path, reason=stats.get("reason"))
    return stats
