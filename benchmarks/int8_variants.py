"""int8 quantisation variants of the exported default model: speed against fp32 and test Dice.

Why the export stage quantises the way it does (pipeline/stages/export.py, quantize_int8):
onnxruntime's static quantiser with QDQ nodes and per-channel weights, in several
flavours -- signed (S8S8) or unsigned (U8S8) activations, min-max / percentile / entropy
calibration on 16 or 64 train images, the softmax head kept in fp32 -- each timed on the
windows a 2048x2048 image needs at overlap 0.25 (111 batches of 4 at the model size,
best of 3 round-robin rounds) and scored on the test split with the pipeline's own
Accumulator (same labelling rule as evaluate).

    python benchmarks/int8_variants.py        # needs `make repro` (models/model.onnx, data/)

Results: benchmarks/results/int8_variants.{json,md}.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

ROUNDS, BATCHES, BATCH = 3, 111, 4


def main() -> None:
    from pipeline.cli import quiet_tensorflow

    quiet_tensorflow(debug=False)
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pipeline.data.tfdata import load_split, make_dataset
    from pipeline.scoring.confusion import Accumulator
    from pipeline.layout import Layout
    from pipeline.config.load import load_params
    from common.atomic import write_json, write_text

    params = load_params(REPO / "params.yaml")
    layout, size = Layout(REPO, params), params.model.image_width
    fp32 = layout.onnx_file
    if not fp32.is_file():
        sys.exit(f"{fp32}: not found; run `make repro` first")
    train = load_split(layout.data_dir, "train", params.mask, (size, size))

    def calibration(n: int) -> list[np.ndarray]:
        ds = make_dataset(train[:n], params.mask, channels=params.model.image_channels, batch_size=8)
        return [x.numpy() for x, _ in ds]

    class Reader(CalibrationDataReader):
        def __init__(self, batches):
            self.it = iter({"image": b} for b in batches)

        def get_next(self):
            return next(self.it, None)

    head = [n.name for n in __import__("onnx").load(str(fp32)).graph.node if n.op_type == "Conv"][-1]
    qdq = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8)
    variants = {
        "S8S8, min-max, 16 images (quantiser default)": dict(qdq, activation_type=QuantType.QInt8, n=16),
        "U8S8, min-max, 16 images (export stage)": dict(qdq, activation_type=QuantType.QUInt8, n=16),
        "U8S8, percentile, 64 images": dict(qdq, activation_type=QuantType.QUInt8, n=64,
                                            calibrate_method=CalibrationMethod.Percentile),
        "U8S8, entropy, 64 images": dict(qdq, activation_type=QuantType.QUInt8, n=64,
                                         calibrate_method=CalibrationMethod.Entropy),
        "U8S8, min-max, 16 images, head conv fp32": dict(qdq, activation_type=QuantType.QUInt8, n=16,
                                                          nodes_to_exclude=[head]),
    }
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {"fp32": ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"])}
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        for i, (name, kw) in enumerate(variants.items()):
            kw = dict(kw)
            out = Path(tmp) / f"v{i}.onnx"
            quantize_static(str(pre), str(out), Reader(calibration(kw.pop("n"))), **kw)
            sessions[name] = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])

    batch = np.random.default_rng(0).uniform(0, 255, (BATCH, size, size, 3)).astype(np.float32)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"image": batch})
    for _ in range(ROUNDS):
        for name, s in sessions.items():
            start = time.perf_counter()
            for _ in range(BATCHES):
                s.run(None, {"image": batch})
            times[name].append(time.perf_counter() - start)

    test = load_split(layout.data_dir, "test", params.mask, (size, size))
    acc = {k: Accumulator(params.model.num_classes, params.mask.single_foreground_class) for k in sessions}
    for images, onehot in make_dataset(test, params.mask, channels=params.model.image_channels,
                                       batch_size=params.evaluate.batch_size):
        for name, s in sessions.items():
            acc[name].update(onehot.numpy(), s.run(None, {"image": images.numpy()})[0], 0.0)

    base = min(times["fp32"])
    rows = {name: {"seconds": min(t), "speedup_vs_fp32": base / min(t),
                   "test_mean_foreground_dice": acc[name].metrics(params.mask.class_names)["mean_foreground_dice"]}
            for name, t in times.items()}
    report = {"windows": BATCHES * BATCH, "tile": size, "rounds": ROUNDS, "cpu_count": os.cpu_count(),
              "onnxruntime": ort.__version__, "variants": rows}
    lines = [f"{BATCHES * BATCH} windows of {size}x{size} (a 2048x2048 image at overlap 0.25), batch {BATCH}, "
             f"best of {ROUNDS} rounds, onnxruntime {ort.__version__}, {os.cpu_count()} cores.", "",
             "| model | seconds | vs fp32 | test mean foreground Dice |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r['seconds']:.2f} | {r['speedup_vs_fp32']:.2f}x | {r['test_mean_foreground_dice']:.4f} |"
              for n, r in rows.items()]
    lines += ["", "Command: `python benchmarks/int8_variants.py`"]
    out = REPO / "benchmarks" / "results" / "int8_variants"
    write_json(out.with_suffix(".json"), report)
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
