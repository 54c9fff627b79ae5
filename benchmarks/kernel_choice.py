"""What the default's 3x3 first kernel gives up against the seed's 11x11: test Dice, real-sample Dice, time.

Trains the default configuration (params.yaml, without the tuned values) once per first
kernel and seed, each in its own project folder under a temporary directory, on scans of
4 slices through the kidneys' middle (the data these rows were measured on; the default
now holds 8: benchmarks/volume_tkv.py --levers), then evaluates it. The 3x3 runs use the default's
portable TensorFlow kernels; the 11x11 runs use oneDNN (`train.onednn: true`), which trains
them about 4x faster on an AVX-512 machine and rounds differently: a Dice comparison, not a
bit-for-bit one.

    python benchmarks/kernel_choice.py [--kernels 3,11] [--seeds 137,7,23] [--onednn-for 11]

Results: benchmarks/results/kernel_choice.json (and .md, the table in docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_results import machine_summary, run_stages, scratch_project, write_results  # noqa: E402


def run_one(kernel: int, seed: int, onednn: bool, folder: Path) -> dict:
    overrides = [f"model.base_kernels=[{kernel}, {kernel}]", f"train.seed={seed}", "train.use_tuned_params=false",
                 f"train.onednn={str(onednn).lower()}", "train.epoch_change_infer=false", "mlflow.log_model=false",
                 "mlflow.experiment_name=kernel-choice"]
    overrides += ["dataset.slices_per_scan=4", "dataset.kidney_free_fraction=0.1"]
    run_stages(folder, ("prepare", "train", "evaluate"), scratch_project(folder) + overrides,
               label=f"{kernel}x{kernel}, seed {seed}")
    trained = json.loads((folder / "metrics" / "train.json").read_text())
    evaluated = json.loads((folder / "metrics" / "eval.json").read_text())
    real = json.loads((folder / "metrics" / "real_sample.json").read_text())
    return {"first_kernel": kernel, "seed": seed, "onednn": onednn, "epochs_run": trained["epochs_run"],
            "train_seconds": trained.get("train_seconds"),
            "seconds_per_epoch": round(trained["train_seconds"] / trained["epochs_run"], 1)
            if trained.get("train_seconds") else None,
            "forward_gflop_per_image": trained.get("forward_gflop_per_image"),
            "final_val_loss": trained.get("final_val_loss"),
            "test_mean_foreground_dice": evaluated["mean_foreground_dice"],
            "test_dice_CKD": evaluated.get("dice_CKD"), "test_dice_healthy": evaluated.get("dice_healthy"),
            "real_kidney_dice": real.get("real_kidney_dice")}   # absent with evaluate.real_sample: null


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(result: dict) -> str:
    mc = result["machine"]
    lines = [f"Machine: {mc['cpu']}, {mc['cores']} cores, vector ISA {mc['vector_isa']}. Default params "
             f"(10 epochs, warm-up + cosine, BatchNorm, 8 filters, 6 levels, 128 px), untuned; only the first "
             f"kernel and the seed vary.", "",
             "| first kernel | TF kernels | seed | forward GFLOP/image | s per epoch here | final val loss "
             "| test mean foreground Dice | real-sample kidney Dice |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['first_kernel']}x{r['first_kernel']} | {'oneDNN' if r['onednn'] else 'portable'} "
                     f"| {r['seed']} | {r['forward_gflop_per_image']} | {r['seconds_per_epoch']} "
                     f"| {r['final_val_loss']:.4f} | {r['test_mean_foreground_dice']:.4f} | {_f(r['real_kidney_dice'])} |")
    lines += ["", "| first kernel | mean test Dice over seeds | min | max | mean real-sample kidney Dice |",
              "|---:|---:|---:|---:|---:|"]
    for k, s in result["summary"].items():
        lines.append(f"| {k}x{k} | {s['mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} | {_f(s['real_mean'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="3,11")
    parser.add_argument("--seeds", default="137,7,23")
    parser.add_argument("--onednn-for", default="11", help="first kernels trained with oneDNN (faster, not portable)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kernel_choice"))
    args = parser.parse_args()
    kernels = [int(k) for k in args.kernels.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    fast = {int(k) for k in args.onednn_for.split(",") if k}
    runs = []
    with tempfile.TemporaryDirectory(prefix="kernel-choice-") as tmp:
        for kernel in kernels:
            for seed in seeds:
                began = time.monotonic()
                runs.append(run_one(kernel, seed, kernel in fast, Path(tmp) / f"k{kernel}-s{seed}"))
                print(f"{kernel}x{kernel} seed {seed}: test Dice {runs[-1]['test_mean_foreground_dice']:.4f} "
                      f"({time.monotonic() - began:.0f} s)", flush=True)
    summary = {}
    for kernel in kernels:
        values = [r["test_mean_foreground_dice"] for r in runs if r["first_kernel"] == kernel]
        real = [r["real_kidney_dice"] for r in runs if r["first_kernel"] == kernel and r["real_kidney_dice"] is not None]
        summary[kernel] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                           "real_mean": statistics.fmean(real) if real else None}
    result = {"machine": machine_summary(),
              "runs": runs, "summary": summary}
    write_results(args.out, result, markdown)


if __name__ == "__main__":
    main()
