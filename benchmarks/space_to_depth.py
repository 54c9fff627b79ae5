"""Export-time space-to-depth (export.space_to_depth): time per window for 0..N levels on phases.

The default model of params.yaml with the study's values (models/model.keras weights if present, else the same
architecture randomly initialised: speed does not depend on the weights) is exported with
0 (plain), 1, 2, ... top levels on 2x2 phases. Each export is timed alone in a fresh
process (one onnxruntime session per process: the idle threads of another session would
compete) through serving's own session options, on batches of model-size windows:
warm-up, then the median of RUNS runs; --rounds rounds alternate the models and each
model's best round counts. Every variant's probabilities on two random windows are
compared with the plain export's.

    python benchmarks/space_to_depth.py [--batch-size 4] [--rounds 3]

It also times single 9x9 and 7x7 convolutions with 16 and 32 output channels: the
one-block speed the export's cost model assumes (space_to_depth.ONE_BLOCK_SPEED).

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
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

RUNS = 30
# One 16-channel output block vs two, at the half-resolution level's size: the measurement
# behind space_to_depth.ONE_BLOCK_SPEED.
CONVS = [(9, 16), (9, 32), (7, 16), (7, 32)]


def run_self(flag: str, value: str, batch: int) -> dict[str, float]:
    """This script with --time/--conv in a fresh process: one onnxruntime session alone."""
    out = subprocess.run([sys.executable, __file__, flag, value, "--batch-size", str(batch)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def windows(batch: int, size: int, channels: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (batch, size, size, channels)).astype(np.float32)


def run_times(run: Callable[[], Any]) -> list[float]:
    """Seconds of RUNS calls after 3 warm-up calls (the first plans onnxruntime's memory)."""
    for _ in range(3):
        run()
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def time_model(path: str, batch: int) -> dict[str, float]:
    """Median and best ms per window of one exported model (run in its own process)."""
    from serving._onnx_session import open_session

    session, card = open_session(Path(path))
    x = windows(batch, card.tile_size, card.channels)
    times = run_times(lambda: session(x))
    return {"median_ms": 1000 * float(np.median(times)) / batch, "best_ms": 1000 * min(times) / batch}


def conv_speed(channels_out: int, kernel: int, batch: int = 4, size: int = 64, channels_in: int = 16) -> float:
    """GMAC/s of one Conv + ReLU through serving's session options (run in its own process)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from serving._onnx_session import session_options

    rng = np.random.default_rng(0)
    weights = helper.make_tensor("w", TensorProto.FLOAT, [channels_out, channels_in, kernel, kernel],
                                 rng.normal(size=channels_out * channels_in * kernel * kernel).astype(np.float32))
    bias = helper.make_tensor("b", TensorProto.FLOAT, [channels_out], np.zeros(channels_out, np.float32))
    pad = kernel // 2
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[pad] * 4), helper.make_node("Relu", ["c"], ["y"])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels_in, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels_out, size, size])], [weights, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(None),
                                   providers=["CPUExecutionProvider"])
    x = rng.uniform(size=(batch, channels_in, size, size)).astype(np.float32)
    times = run_times(lambda: session.run(None, {"x": x}))
    return batch * size * size * channels_in * channels_out * kernel * kernel / float(np.median(times)) / 1e9


def export_all(params_path: Path, out: Path) -> dict[str, Any]:
    from pipeline.cli import quiet_tensorflow

    quiet_tensorflow(debug=False)
    from benchmarks.bench_results import default_model
    from pipeline.stages.export import card_for, session, space_to_depth_levels, to_onnx
    from pipeline.config.load import load_params

    params = load_params(params_path)
    model, weights, params = default_model(params)
    m = params.model
    x = windows(2, m.image_width, m.image_channels)
    models, plain = {}, None
    for levels in range(m.num_layers):
        path = to_onnx(model, out / f"levels{levels}.onnx", card_for(params, None, {}),
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
    speeds = ", ".join(f"{k}: {v:.2f}" for k, v in report["one_block_speed"].items())
    rates = "; ".join(f"{k}: {v:.0f}" for k, v in report["conv_gmacs"].items())
    lines += ["", f"One 16-channel output block runs at this fraction of the speed of two (64x64, batch "
                  f"{report['batch_size']}): {speeds} (GMAC/s, {rates}). pipeline/model/space_to_depth.py's cost model "
                  f"assumes 0.64 (ONE_BLOCK_SPEED).", "", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--time", help=argparse.SUPPRESS)
    parser.add_argument("--conv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time:
        print(json.dumps(time_model(args.time, args.batch_size)))
        return
    if args.conv:
        kernel, channels_out = (int(v) for v in args.conv.split(","))
        print(json.dumps({"gmacs": conv_speed(channels_out, kernel, args.batch_size)}))
        return
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="s2d-bench-") as tmp:
        exported = export_all(Path(args.params), Path(tmp))
        best: dict[int, dict[str, float]] = {}
        convs: dict[str, float] = {}
        for _ in range(args.rounds):
            for levels, info in exported["models"].items():
                timing = run_self("--time", info["path"], args.batch_size)
                if levels not in best or timing["median_ms"] < best[levels]["median_ms"]:
                    best[levels] = timing
                print(f"levels {levels}: {timing['median_ms']:.2f} ms per window", flush=True)
            for kernel, channels_out in CONVS:
                key = f"{kernel}x{kernel}, 16 -> {channels_out} channels"
                convs[key] = max(convs.get(key, 0.0), run_self("--conv", f"{kernel},{channels_out}",
                                                                args.batch_size)["gmacs"])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    report = {"model": exported["model"], "weights": exported["weights"], "auto_levels": exported["auto_levels"],
              "batch_size": args.batch_size, "rounds": args.rounds, "cpu": cpu, "cores": os.cpu_count(),
              "onnxruntime": onnxruntime.__version__, "command": "python benchmarks/space_to_depth.py",
              "levels": {str(k): {**best[k], "max_abs_vs_plain": v["max_abs_vs_plain"]}
                         for k, v in exported["models"].items()},
              "conv_gmacs": convs,
              "one_block_speed": {f"{k}x{k}": convs[f"{k}x{k}, 16 -> 16 channels"] / convs[f"{k}x{k}, 16 -> 32 channels"]
                                  for k, _ in CONVS[::2]}}
    results = REPO / "benchmarks" / "results"
    (results / "space_to_depth.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "space_to_depth.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
