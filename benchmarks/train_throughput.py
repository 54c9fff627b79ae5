"""Training throughput of FlexUNet vs what this CPU can do at all.

Reports, in one run on the same machine:
- training images/s of the configured model (Adam step on in-memory batches, and through
  the real tf.data pipeline when the prepared dataset exists);
- achieved GFLOP/s = images/s x 3 x forward FLOPs (a training step is ~3 forward passes:
  forward, gradient w.r.t. activations, gradient w.r.t. weights);
- the machine's float32 matrix-multiply GFLOP/s, measured with TensorFlow itself.

Forward FLOPs are counted from the model's layers (2 x MACs of every convolution).

    python benchmarks/train_throughput.py [--params params.yaml] [--steps 30]

Results: benchmarks/results/train_throughput.json (and .md, the README table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cli import quiet_tensorflow  # noqa: E402

quiet_tensorflow(debug=False)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.layout import Layout  # noqa: E402
from pipeline.params import Params, load_params  # noqa: E402
from pipeline.train import compile_model  # noqa: E402


def forward_flops(model: keras.Model) -> int:
    """2 x multiply-accumulates of every Conv2D / Conv2DTranspose for one image."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2DTranspose):
            _, h, w, c_in = layer.input.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * c_in * kh * kw * layer.filters
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * layer.input.shape[-1] * c_out
    return int(total)


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    tf.linalg.matmul(a, b).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        c = tf.linalg.matmul(a, b)
    c.numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def train_images_per_second(params: Params, steps: int) -> float:
    m, t = params.model, params.train
    model = compile_model(params)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (t.batch_size, m.image_height, m.image_width, m.image_channels)).astype(np.float32)
    y = np.eye(m.num_classes, dtype=np.float32)[rng.integers(0, m.num_classes, x.shape[:3])]
    for _ in range(3):  # trace + warm-up
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * t.batch_size / (time.perf_counter() - start)


def pipeline_images_per_second(params: Params, root: Path) -> tuple[float, float] | None:
    """(input pipeline alone, model.fit through it) images/s on the prepared train split:
    the first says whether decoding + augmentation could be the bottleneck."""
    from pipeline.data.dataset import find_pairs, make_dataset

    layout = Layout(root, params)
    if not (layout.data_dir / "train").is_dir():
        return None
    pairs = find_pairs(layout.data_dir / "train")
    ds = make_dataset(pairs, params.mask, channels=params.model.image_channels, batch_size=params.train.batch_size,
                      augment=params.train.augment, shuffle_seed=0)
    for _ in ds.take(2):
        pass
    start = time.perf_counter()
    for _ in ds:
        pass
    alone = len(pairs) / (time.perf_counter() - start)
    model = compile_model(params)
    model.fit(ds.take(2), epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0)
    return alone, len(pairs) / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput"))
    args = parser.parse_args()
    params = load_params(args.params)
    m = params.model
    flops = forward_flops(compile_model(params))
    ips = train_images_per_second(params, args.steps)
    result = {
        "model": f"{m.image_width}x{m.image_height}, {m.num_layers} levels, base_filters {m.base_filters}, "
                 f"base_kernels {m.base_kernels[0]}x{m.base_kernels[1]}, batch {params.train.batch_size}",
        "forward_gflop_per_image": round(flops / 1e9, 3),
        "train_images_per_second": round(ips, 2),
        "achieved_train_gflops": round(ips * 3 * flops / 1e9, 1),
        "matmul_fp32_gflops": round(matmul_gflops(), 1),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "tensorflow": tf.__version__,
    }
    pipe = pipeline_images_per_second(params, REPO)
    result["input_pipeline_alone_images_per_second"] = round(pipe[0], 1) if pipe else None
    result["pipeline_images_per_second"] = round(pipe[1], 2) if pipe else None
    result["fraction_of_matmul_peak"] = round(result["achieved_train_gflops"] / result["matmul_fp32_gflops"], 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.items())
    out.with_suffix(".md").write_text(f"| measure | value |\n|---|---|\n{rows}\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
