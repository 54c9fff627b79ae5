"""Export-time space-to-depth (export.space_to_depth): time per window for 0..N levels on phases.

The default model of params.yaml (models/model.keras weights if present, else the same
architecture randomly initialised: speed does not depend on the weights) is exported with
0 (plain), 1, 2, ... top levels on 2x2 phases. Each export is timed alone in a fresh
process (one onnxruntime session per process: the idle threads of another session would
compete) through serving's own session options, on batches of model-size windows:
warm-up, then the median of RUNS runs; --rounds rounds alternate the models and each
model's best round counts. Every variant's probabilities on two random windows are
compared with the plain export's.

    python benchmarks/space_to_depth.py [--batch-size 4] [--rounds 3]

Results: benchmarks/results/space_to_depth.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

RUNS = 30


def windows(batch: int, size: int, channels: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (batch, size, size, channels)).astype(np.float32)


def time_model(path: str, batch: int) -> dict[str, float]:
    """Median and best ms per window of one exported model (run in its own process)."""
    from serving._onnx_session import open_session

    session, card = open_session(Path(path))
    x = windows(batch, card.tile_size, card.channels)
    for _ in range(3):
        session(x)
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        session(x)
        times.append(time.perf_counter() - start)
    return {"median_ms": 1000 * float(np.median(times)) / batch, "best_ms": 1000 * min(times) / batch}


def export_all(params_path: Path, out: Path) -> dict[str, Any]:
    from pipeline.cli import quiet_tensorflow

    quiet_tensorflow(debug=False)
    import keras

    from pipeline.export import card_for, session, space_to_depth_levels, to_onnx
    from pipeline.model import build_flexunet
    from pipeline.params import load_params

    params = load_params(params_path)
    trained = REPO / "models" / "model.keras"
    if trained.is_file():
        model, weights = keras.models.load_model(trained, compile=False), "models/model.keras"
    else:
        keras.utils.set_random_seed(params.train.seed)
        model, weights = build_flexunet(params.model), f"random init (seed {params.train.seed})"
    m = params.model
    x = windows(2, m.image_width, m.image_channels)
    models, plain = {}, None
    for levels in range(m.num_layers):
        path = to_onnx(model, out / f"levels{levels}.onnx", card_for(params, None, None),
                       opset=params.export.opset, phase_levels=levels)
        probs = session(path).run(None, {"image": x})[0]
        plain = probs if plain is None else plain
        models[levels] = {"path": str(path), "max_abs_vs_plain": float(np.abs(probs - plain).max())}
    return {"models": models, "auto_levels": space_to_depth_levels(params), "weights": weights,
            "model": f"{m.image_width} px, {m.num_layers} levels, base_filters {m.base_filters}, "
                     f"{m.base_kernels[0]}x{m.base_kernels[1]}"}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Space-to-depth export of the default model ({report['model']}, weights: {report['weights']}) on "
             f"{report['cpu']}, {report['cores']} cores; onnxruntime {report['onnxruntime']}; batches of "
             f"{report['batch_size']} windows, median of {RUNS} runs, best of {report['rounds']} alternating rounds, "
             f"each model alone in its process.", "",
             "| levels on 2x2 phases | ms per window | vs plain | max abs(p - p_plain) |", "|---|---:|---:|---:|"]
    plain = report["levels"]["0"]["median_ms"]
    for levels, r in report["levels"].items():
        mark = " (auto)" if int(levels) == report["auto_levels"] else ""
        lines.append(f"| {levels}{' (plain)' if levels == '0' else ''}{mark} | {r['median_ms']:.2f} | "
                     f"{plain / r['median_ms']:.2f}x | {r['max_abs_vs_plain']:.1e} |")
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time:
        print(json.dumps(time_model(args.time, args.batch_size)))
        return
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="s2d-bench-") as tmp:
        exported = export_all(Path(args.params), Path(tmp))
        best: dict[int, dict[str, float]] = {}
        for _ in range(args.rounds):
            for levels, info in exported["models"].items():
                out = subprocess.run([sys.executable, __file__, "--time", info["path"], "--batch-size",
                                      str(args.batch_size)], check=True, capture_output=True, text=True)
                timing = json.loads(out.stdout.strip().splitlines()[-1])
                if levels not in best or timing["median_ms"] < best[levels]["median_ms"]:
                    best[levels] = timing
                print(f"levels {levels}: {timing['median_ms']:.2f} ms per window", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    report = {"model": exported["model"], "weights": exported["weights"], "auto_levels": exported["auto_levels"],
              "batch_size": args.batch_size, "rounds": args.rounds, "cpu": cpu, "cores": os.cpu_count(),
              "onnxruntime": onnxruntime.__version__, "command": "python benchmarks/space_to_depth.py",
              "levels": {str(k): {**best[k], "max_abs_vs_plain": v["max_abs_vs_plain"]}
                         for k, v in exported["models"].items()}}
    results = REPO / "benchmarks" / "results"
    (results / "space_to_depth.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "space_to_depth.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
