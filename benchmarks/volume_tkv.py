"""TKV of whole synthetic scans through `flexunet predict`: errors with and without the volume
rules, seconds per scan, and the memory of a large scan.

The test-split subjects of the default dataset (data/kidney-t2w/manifest.json: their ids
and groups; anatomy the model never trained on) are each written as a whole coronal scan
by `flexunet synthesize --volume`'s function: 18 slices of 5 mm (both kidneys whole, with
kidney-free slices in front and behind), 1.5 mm in plane (256 x 256, the resolution of the
real T2w scans), the realistic rendering, stored LPS as scanners store them. Each is
predicted by serving.batch (the local engine, default settings) with the model, and its
TKV, right and left kidney volume and diagnosis compared with the synthetic truth.

Reported: per scan and in all, the TKV error (ml and %) with the rules (what
predictions.csv reports) and without them (`tkv_ml_without_rules`), the Bland-Altman
agreement of both (pipeline.scoring.tkv.agreement) and its plot, the side-wise errors,
the diagnosis accuracy, seconds per scan; and for one large scan (512 x 512 x 64 voxels,
0.75 x 0.75 x 1.5 mm) the peak of Python-tracked memory (tracemalloc, NumPy included;
onnxruntime's own buffers are not) against the size of its input decoded as float32.

    python benchmarks/volume_tkv.py [--model models/model.onnx]

Results: benchmarks/results/volume_tkv.{json,md}, docs/tkv_volumes_bland_altman.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402

from bench_results import machine_summary, write_results  # noqa: E402

SPACING_MM, SLICES, ORIENTATION = 1.5, 18, "LPS"
PLOT = REPO / "docs" / "tkv_volumes_bland_altman.png"


def test_subjects(manifest: Path) -> list[tuple[int, str]]:
    records = json.loads(manifest.read_text())["subjects"]
    return [(int(r["subject_id"].split("-")[1]), r["group"]) for r in records if r["split"] == "test"]


def predict_scans(model: Path, subjects: list[tuple[int, str]], seed: int, folder: Path) -> list[dict]:
    from pipeline.data.synthetic.volume import synthetic_volume, write_volume
    from serving.batch import predict_folder
    from serving.load import load_predictor

    truth = {}
    for number, group in subjects:
        volume = synthetic_volume(number, group, seed=seed, spacing_mm=SPACING_MM, slices=SLICES,
                                  orientation=ORIENTATION)
        write_volume(folder / "in" / f"sub-{number:03d}.nii.gz", volume)
        truth[f"sub-{number:03d}"] = (group, volume.true_ml)
    predict_folder(load_predictor(model), sorted((folder / "in").iterdir()), folder / "out", progress=False)
    rows = []
    with (folder / "out" / "predictions.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            subject = Path(r["file"]).name.removesuffix(".nii.gz")
            group, true = truth[subject]
            rows.append({"subject_id": subject, "scan": 1, "group": group, "true_ml": round(true["tkv_ml"], 2),
                         "predicted_ml": float(r["tkv_ml"]), "predicted_ml_without_rules": float(r["tkv_ml_without_rules"]),
                         "true_right_ml": round(true["right_kidney_ml"], 2), "true_left_ml": round(true["left_kidney_ml"], 2),
                         "predicted_right_ml": float(r["right_kidney_ml"]), "predicted_left_ml": float(r["left_kidney_ml"]),
                         "diagnosis": r["diagnosis"], "seconds": float(r["seconds"])})
    return rows


def large_scan_memory(model: Path, seed: int, folder: Path) -> dict:
    """Peak tracemalloc of predicting one 512 x 512 x 64 scan, against its decoded input."""
    from pipeline.data.synthetic.volume import synthetic_volume, write_volume
    from serving.batch import predict_folder
    from serving.load import load_predictor

    volume = synthetic_volume(1, "CKD", seed=seed, spacing_mm=0.75, slice_mm=1.5, slices=64, orientation="LPS")
    path = folder / "large" / "large.nii.gz"
    write_volume(path, volume)
    voxels = int(volume.image.size)
    del volume
    predictor = load_predictor(model)
    tracemalloc.start()
    start = time.perf_counter()
    predict_folder(predictor, [path], folder / "large_out", progress=False)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"shape": "512x64x512", "voxels": voxels, "seconds": round(seconds, 2), "peak_mb": round(peak / 2**20, 1),
            "input_float32_mb": round(voxels * 4 / 2**20, 1), "budget_mb": round(voxels * 7 / 2**20, 1)}


def summarise(rows: list[dict]) -> dict:
    from pipeline.scoring.tkv import agreement

    def percent(key: str) -> list[float]:
        return [100 * (r[key] - r["true_ml"]) / r["true_ml"] for r in rows]

    out = {}
    for name, key in (("with_rules", "predicted_ml"), ("without_rules", "predicted_ml_without_rules")):
        errors = np.array(percent(key))
        stats = agreement(rows, key)
        out[name] = {"bias_ml": round(stats["bias_ml"], 2), "loa_low_ml": round(stats["loa_low_ml"], 2),
                     "loa_high_ml": round(stats["loa_high_ml"], 2),
                     "mean_abs_percent_error": round(float(np.abs(errors).mean()), 2),
                     "within_10_percent": int((np.abs(errors) <= 10).sum()), "scans": len(rows)}
    side = np.array([[r["predicted_right_ml"] - r["true_right_ml"], r["predicted_left_ml"] - r["true_left_ml"]]
                     for r in rows])
    out["side_mean_abs_error_ml"] = {"right": round(float(np.abs(side[:, 0]).mean()), 2),
                                     "left": round(float(np.abs(side[:, 1]).mean()), 2)}
    out["diagnosis_accuracy"] = round(float(np.mean([r["diagnosis"] == r["group"] for r in rows])), 3)
    out["seconds_per_scan"] = round(float(np.mean([r["seconds"] for r in rows])), 3)
    return out


def markdown(result: dict) -> str:
    m, s = result["machine"], result["summary"]
    lines = [f"TKV of {s['with_rules']['scans']} whole synthetic test scans ({result['scan']}) predicted by "
             f"`flexunet predict` with {result['model']}, on {m['cpu']} ({m['cores']} cores, {m['vector_isa']}).", "",
             "| | bias (ml) | 95 % limits (ml) | mean abs error | scans within 10 % |", "|---|---:|---:|---:|---:|"]
    for name, label in (("with_rules", "with the volume rules"), ("without_rules", "without")):
        v = s[name]
        lines.append(f"| {label} | {v['bias_ml']:+.1f} | {v['loa_low_ml']:+.1f} .. {v['loa_high_ml']:+.1f} | "
                     f"{v['mean_abs_percent_error']:.1f} % | {v['within_10_percent']} of {v['scans']} |")
    lines += ["", f"Side-wise mean absolute error (rules): right {s['side_mean_abs_error_ml']['right']:.1f} ml, left "
              f"{s['side_mean_abs_error_ml']['left']:.1f} ml; diagnosis accuracy {s['diagnosis_accuracy']:.2f}; "
              f"{s['seconds_per_scan']:.2f} s per scan (read, predict, rules, write).", "",
              "| scan | group | true TKV | with rules | without | diagnosis |", "|---|---|---:|---:|---:|---|"]
    for r in result["scans"]:
        lines.append(f"| {r['subject_id']} | {r['group']} | {r['true_ml']:.1f} | {r['predicted_ml']:.1f} | "
                     f"{r['predicted_ml_without_rules']:.1f} | {r['diagnosis'] or 'none'} |")
    big = result["large_scan"]
    lines += ["", f"Large scan ({big['shape']} voxels): {big['seconds']:.1f} s, peak traced memory {big['peak_mb']:.0f} MB "
              f"(its input decoded as float32: {big['input_float32_mb']:.0f} MB; the uint8 scan, labels and "
              f"uncertainty plus float16 probabilities: {big['budget_mb']:.0f} MB).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "model.onnx"))
    parser.add_argument("--manifest", default=str(REPO / "data" / "kidney-t2w" / "manifest.json"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "volume_tkv"))
    a = parser.parse_args()
    from pipeline.config.load import load_params
    from pipeline.plots import bland_altman

    seed = load_params(REPO / "params.yaml", {}).dataset.seed
    with tempfile.TemporaryDirectory(prefix="flexunet-tkv-") as tmp:
        rows = predict_scans(Path(a.model), test_subjects(Path(a.manifest)), seed, Path(tmp))
        large = large_scan_memory(Path(a.model), seed, Path(tmp))
    summary = summarise(rows)
    from pipeline.scoring.tkv import agreement

    bland_altman(rows, [("predicted_ml", "with the volume rules", agreement(rows, "predicted_ml")),
                        ("predicted_ml_without_rules", "without", agreement(rows, "predicted_ml_without_rules"))],
                 PLOT, title="TKV of whole synthetic test scans")
    result = {"machine": machine_summary(), "model": Path(a.model).name,
              "scan": f"{SLICES} slices x 5 mm, {SPACING_MM} mm in plane, {ORIENTATION}", "summary": summary,
              "scans": rows, "large_scan": large}
    write_results(a.out, result, markdown)


if __name__ == "__main__":
    main()
