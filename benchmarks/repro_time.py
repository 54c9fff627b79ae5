"""The default pipeline from a fresh clone: time per stage, and the same result on any CPU.

Clones the committed repository into a temporary folder and runs `dvc repro` there stage by
stage (`dvc repro --single-item <stage>`, in dvc.yaml's order), timing each, with the
`.venv` of this checkout (installing is not counted). Nothing is reused: no data, no DVC
cache, no MLflow store, no Optuna study. It does this once per machine profile:

- `native`: this machine as it is;
- `avx2`: this machine made to take the code paths of a CPU without AVX-512 wherever a
  library picks its kernels at run time: NumPy (NPY_DISABLE_CPU_FEATURES of its AVX-512
  targets) and OpenBLAS (OPENBLAS_CORETYPE=Haswell). TensorFlow needs no setting:
  train.onednn is false, so it runs its Eigen kernels, which the wheel compiles for AVX
  without FMA and which therefore are the same instructions on every x86-64 CPU (and what
  TensorFlow runs on AVX2-only CPUs by its own policy). onnxruntime has no such switch:
  export's parity figures and the evaluate_tiled stage may differ in the last bits.

Then it compares what the issue asks to be equal: the dataset fingerprint, the best trial
and its value, the epochs run, and the test Dice. Results: benchmarks/results/repro_time.json
(and .md, the tables in docs/benchmarks.md).

    python benchmarks/repro_time.py [--profiles native,avx2] [--set KEY=VALUE ...]
    python benchmarks/repro_time.py --preset glomeruli-cpu --profiles native   # -> repro_time_glomeruli-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_results import write_results  # noqa: E402
from bench_results import machine_summary  # noqa: E402

NUMPY_AVX512_TARGETS = "X86_V4 AVX512_ICL AVX512_SPR"
PROFILES = {
    "native": {},
    "avx2": {"NPY_DISABLE_CPU_FEATURES": NUMPY_AVX512_TARGETS, "OPENBLAS_CORETYPE": "Haswell"},
}


def stages(root: Path) -> list[str]:
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def run_profile(name: str, overrides: list[str], preset: str | None = None, keep: Path | None = None) -> dict:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **PROFILES[name], "PATH": f"{bin_dir}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix=f"repro-{name}-") as tmp:
        root = Path(tmp) / "flexunet"
        subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
        if preset:
            subprocess.run([str(bin_dir / "flexunet"), "preset", preset], cwd=root, env=env, check=True,
                           capture_output=True)
        if overrides:
            params = yaml.safe_load((root / "params.yaml").read_text())
            for item in overrides:
                key, value = item.split("=", 1)
                node = params
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node[part]
                node[leaf] = yaml.safe_load(value)
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        seconds: dict[str, float] = {}
        total = time.perf_counter()
        for stage in stages(root):
            start = time.perf_counter()
            out = subprocess.run([str(bin_dir / "dvc"), "repro", "--single-item", stage], cwd=root, env=env,
                                 capture_output=True, text=True)
            seconds[stage] = round(time.perf_counter() - start, 1)
            if out.returncode:
                raise SystemExit(f"{name}: stage {stage} failed\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            print(f"{name}: {stage} {seconds[stage]} s", flush=True)
        seconds["total"] = round(time.perf_counter() - total, 1)

        if keep is not None:   # the run's metrics and plots, for the docs
            for folder in ("metrics", "plots"):
                shutil.copytree(root / folder, keep / name / folder, dirs_exist_ok=True)

        def metrics(file: str) -> dict:
            return json.loads((root / "metrics" / file).read_text())

        dataset = yaml.safe_load((root / "params.yaml").read_text())["dataset"]["name"]
        manifest = json.loads((root / "data" / dataset / "manifest.json").read_text())
        real = metrics("real_sample_predict.json")
        tkv = metrics("tkv.json") if (root / "metrics" / "tkv.json").is_file() else {}
        evaluation, train, tune = metrics("eval.json"), metrics("train.json"), metrics("tune.json")
        best = yaml.safe_load((root / "tune" / "best_params.yaml").read_text())
        return {
            "seconds": seconds, "env": PROFILES[name],
            "fingerprint": manifest.get("fingerprint"),
            "best_trial": tune["best_trial"], "best_value": tune["best_value"], "best_params": best["params"],
            "trials": {k: v for k, v in tune.items() if k.startswith("trials_")},
            "epochs_run": train["epochs_run"], "epochs_configured": train["epochs_configured"],
            "final_val_loss": train["final_val_loss"], "train_seconds": train["train_seconds"],
            "test_mean_foreground_dice": evaluation["mean_foreground_dice"],
            "test_dice": {k: v for k, v in evaluation.items() if k.startswith("dice_")},
            "tkv": {k: tkv.get(k) for k in ("bias_ml", "loa_low_ml", "loa_high_ml")},
            "real_sample_predict": {k: v for k, v in real.items() if k.startswith(("real_", "predict_real_"))
                                    and not isinstance(v, (list, dict))},
            "registered": json.loads((root / "models" / "registered.json").read_text()).get("decision"),
            "warnings": evaluation.get("warnings", []),
        }


def compare(runs: dict[str, dict]) -> dict:
    names = list(runs)
    if len(names) < 2:
        return {}
    a, b = (runs[n] for n in names[:2])
    return {
        "profiles": names[:2],
        "same_fingerprint": a["fingerprint"] == b["fingerprint"],
        "same_best_trial": (a["best_trial"], a["best_params"]) == (b["best_trial"], b["best_params"]),
        "best_value_difference": abs(a["best_value"] - b["best_value"]),
        "same_epochs": a["epochs_run"] == b["epochs_run"],
        "test_dice_difference": abs(a["test_mean_foreground_dice"] - b["test_mean_foreground_dice"]),
    }


def markdown(result: dict) -> str:
    mc, runs = result["machine"], result["runs"]
    names = list(runs)
    stage_names = [s for s in next(iter(runs.values()))["seconds"] if s != "total"]
    lines = [f"Machine: {mc['cpu']}, {mc['cores']} cores, vector ISA {mc['vector_isa']}. "
             f"Preset: {result.get('preset') or 'none'}. Overrides: {result['overrides'] or 'none'}.", "",
             "| stage | " + " | ".join(f"{n} (s)" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for stage in stage_names + ["total"]:
        lines.append(f"| {stage} | " + " | ".join(str(runs[n]["seconds"][stage]) for n in names) + " |")
    lines += ["", "| result | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in ("fingerprint", "best_trial", "best_value", "best_params", "epochs_run", "final_val_loss",
                "test_mean_foreground_dice", "tkv", "real_sample_predict", "registered"):
        lines.append(f"| {key} | " + " | ".join(f"`{runs[n][key]}`" if key in ("fingerprint", "best_params", "tkv", "real_sample_predict")
                                                 else str(runs[n][key]) for n in names) + " |")
    if result.get("comparison"):
        lines += ["", "Comparison: " + ", ".join(f"{k} {v}" for k, v in result["comparison"].items()
                                                 if k != "profiles")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="native,avx2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override in the clone, e.g. --set train.onednn=true")
    parser.add_argument("--preset", help="run `flexunet preset NAME` in the clone first (default: params.yaml as is)")
    parser.add_argument("--out", help="default: benchmarks/results/repro_time[_<preset>]")
    parser.add_argument("--keep", type=Path, help="copy each profile's metrics/ and plots/ to KEEP/<profile>/")
    args = parser.parse_args()
    args.out = args.out or str(REPO / "benchmarks" / "results" / ("repro_time" + (f"_{args.preset}" if args.preset else "")))
    if shutil.which("git") is None:
        raise SystemExit("git is needed to clone the repository")
    runs = {name: run_profile(name, args.set, args.preset, args.keep) for name in args.profiles.split(",")}
    result = {"machine": machine_summary(), "preset": args.preset,
              "overrides": args.set, "runs": runs, "comparison": compare(runs)}
    write_results(args.out, result, markdown)


if __name__ == "__main__":
    main()
