"""TKV of whole synthetic scans through `flexunet predict`: errors with and without the volume
rules, seconds per scan, and the memory of a large scan.

Fourteen held-out synthetic subjects (numbers 1001-1014, seven CKD and seven healthy: no
training set of any row below holds them) are each written as a whole coronal scan by
`flexunet synthesize --volume`'s function: 18 slices of 5 mm (both kidneys whole, with
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
    python benchmarks/volume_tkv.py --levers [NAME ...]    # the levers table (`checkout`: only the first row)

Results: benchmarks/results/volume_tkv.{json,md}, docs/tkv_volumes_bland_altman.png and
the first scan's QC montage, docs/qc_montage.png.

--levers: what would move the TKV. Each lever (a name and params.yaml overrides) runs
prepare, train, evaluate and export in a fresh project (bench_results.scratch_project,
`train.use_tuned_params: false`), then the scans above through its ONNX model; the table
(benchmarks/results/volume_tkv_levers.{json,md}) has its TKV errors with and without the
rules next to its real-sample kidney Dice, so a lever that helps scans but hurts real
slices shows it. The first row is this checkout's model.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402

from bench_results import machine_summary, run_stages, scratch_project, write_results  # noqa: E402

SPACING_MM, SLICES, ORIENTATION = 1.5, 18, "LPS"
SUBJECTS = [(1001 + i, ("CKD", "healthy")[i % 2]) for i in range(14)]
PLOT = REPO / "docs" / "tkv_volumes_bland_altman.png"
MONTAGE = REPO / "docs" / "qc_montage.png"
# How many slices a training scan holds, how far apart, and how many of its kidney-free
# ones are kept: each row spells the whole recipe out, so it means the same whatever the
# defaults. 4 slices of 5 mm cover the kidneys' middle 20 mm; 8 cover their whole depth.
# Rows with fewer subjects hold about the default's number of training images.
FOUR = ["dataset.slices_per_scan=4", "dataset.kidney_free_fraction=0.1"]
EIGHT = ["dataset.slices_per_scan=8", "dataset.kidney_free_fraction=0.5"]
TWELVE = ["dataset.slices_per_scan=12"]
LEVERS: dict[str, list[str]] = {
    "4 slices of 5 mm, 10 % of kidney-free ones kept": FOUR,
    "4 slices of 10 mm": [*FOUR, "dataset.slice_mm=10"],
    "5 slices of 8 mm, 50 % kidney-free": ["dataset.slices_per_scan=5", "dataset.slice_mm=8",
                                           "dataset.kidney_free_fraction=0.5"],
    "8 slices of 5 mm, 50 % kidney-free (the default's data)": EIGHT,
    "the default's data, train.epochs 6": [*EIGHT, "train.epochs=6"],
    "8 slices, 30 % kidney-free, num_subjects 64": [*EIGHT[:1], "dataset.kidney_free_fraction=0.3",
                                                    "dataset.num_subjects=64"],
    "12 slices, 50 % kidney-free, num_subjects 40": [*TWELVE, "dataset.kidney_free_fraction=0.5",
                                                     "dataset.num_subjects=40"],
    "12 slices, all kidney-free, num_subjects 32": [*TWELVE, "dataset.kidney_free_fraction=1.0",
                                                    "dataset.num_subjects=32"],
}
COMMON = ["train.use_tuned_params=false", "mlflow.log_model=false"]


def predict_scans(model: Path, subjects: list[tuple[int, str]], seed: int, folder: Path,
                  montage_to: Path | None = None) -> list[dict]:
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
    if montage_to is not None:   # the first scan's QC montage, for docs/serving.md
        shutil.copyfile(folder / "out" / "qc" / f"sub-{subjects[0][0]:03d}.png", montage_to)
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
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "volume_tkv"))
    parser.add_argument("--levers", nargs="*", default=None, metavar="NAME",
                        help="the levers table instead (default: every lever; names keep the other rows)")
    a = parser.parse_args()
    from pipeline.config.load import load_params
    from pipeline.plots import bland_altman

    seed = load_params(REPO / "params.yaml", {}).dataset.seed
    if a.levers is not None:
        levers(a.levers, Path(a.model), seed)
        return
    with tempfile.TemporaryDirectory(prefix="flexunet-tkv-") as tmp:
        rows = predict_scans(Path(a.model), SUBJECTS, seed, Path(tmp), montage_to=MONTAGE)
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


def levers(names: list[str], model: Path, seed: int) -> None:
    """Rerun the named levers (none named: all; `checkout`: only this checkout's row), keep the other rows."""
    names = [] if names == ["checkout"] else (names or list(LEVERS))
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}; known: {list(LEVERS)}")
    out = REPO / "benchmarks" / "results" / "volume_tkv_levers"
    rows = json.loads(out.with_suffix(".json").read_text())["levers"] if out.with_suffix(".json").is_file() else {}
    real = json.loads((REPO / "metrics" / "real_sample.json").read_text())
    trained = json.loads((REPO / "metrics" / "train.json").read_text())
    with tempfile.TemporaryDirectory(prefix="flexunet-tkv-") as tmp:
        rows["this checkout's model"] = {"overrides": [], "real_kidney_dice": real["real_kidney_dice"],
                                         "seconds": {"train": trained.get("train_seconds")},
                                         **summarise(predict_scans(model, SUBJECTS, seed, Path(tmp)))}
    for name in names:
        print(f"{name} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="flexunet-lever-") as tmp:
            root = Path(tmp)
            seconds = run_stages(root, ("prepare", "train", "evaluate", "export"),
                                 scratch_project(root) + COMMON + LEVERS[name], label=name)
            scans = predict_scans(root / "models" / "model.onnx", SUBJECTS, seed, root / "scans")
            real = json.loads((root / "metrics" / "real_sample.json").read_text())
            test = json.loads((root / "metrics" / "eval.json").read_text())
        rows[name] = {"overrides": LEVERS[name], "real_kidney_dice": real["real_kidney_dice"],
                      "test_mean_foreground_dice": test["mean_foreground_dice"], "seconds": seconds, **summarise(scans)}
        print(json.dumps({name: rows[name]}), flush=True)
    order = ["this checkout's model", *LEVERS]
    write_results(out, {"machine": machine_summary(), "levers": {n: rows[n] for n in order if n in rows}}, lever_table)


def lever_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['vector_isa']}. TKV of the 14 held-out synthetic scans; "
             f"each lever: prepare + train + evaluate + export, {' '.join(COMMON)}.", "",
             "| lever | real kidney Dice | TKV bias, rules (ml) | mean abs error, rules | within 10 % | "
             "mean abs error, no rules | diagnosis accuracy | train (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["levers"].items():
        w, wo = r["with_rules"], r["without_rules"]
        train = (r.get("seconds") or {}).get("train")
        lines.append(f"| {name} | {r['real_kidney_dice']:.3f} | {w['bias_ml']:+.1f} | {w['mean_abs_percent_error']:.1f} % | "
                     f"{w['within_10_percent']} of {w['scans']} | {wo['mean_abs_percent_error']:.1f} % | "
                     f"{r['diagnosis_accuracy']:.2f} | {'-' if train is None else f'{train:.0f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
