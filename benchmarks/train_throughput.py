"""Training throughput of FlexUNet against what this CPU can do at all, for both of
TensorFlow's CPU kernel paths.

TensorFlow runs convolutions with oneDNN only where it enables oneDNN by default (Linux
x86 CPUs with AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX) or where TF_ENABLE_ONEDNN_OPTS=1;
everywhere else, AVX2-only CPUs included, it runs its Eigen kernels, which the pip wheel
compiles for AVX (no FMA, no AVX-512), so they are the same instructions on every x86-64
CPU. `train.onednn: false` (the default) chooses Eigen everywhere. This benchmark measures
both paths in one run, each in its own process:

- `portable` (TF_ENABLE_ONEDNN_OPTS=0): the arithmetic an AVX2-only machine runs; on an
  AVX-512 machine, the stand-in for one (it runs faster there, but the same kernels);
- `onednn` (TF_ENABLE_ONEDNN_OPTS=1): oneDNN's JIT kernels for this CPU's widest ISA.

For each: float32 matmul GFLOP/s through TensorFlow (the peak that path reaches here);
Keras training images/s on in-memory batches for the default model and its first kernel
replaced by 3, 5, 7 and 11 (the issue's sweep), with and without XLA for the default;
achieved GFLOP/s = images/s x 3 x forward FLOPs (pipeline.model.architecture.forward_flops);
its fraction of the matmul peak; and the default model trained through the real input
pipeline (decoded split in memory, batched in-graph augmentation). The machine block
records the CPU, its vector ISA (AVX2, AVX-512, AMX), and NumPy's sgemm GFLOP/s with
OpenBLAS's own kernel for this CPU and with its Haswell (AVX2) kernel.

    python benchmarks/train_throughput.py [--params params.yaml] [--images 48] [--modes portable,onednn]

Results: benchmarks/results/train_throughput.json (and .md, the table in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_results import cpu_flags, cpu_name, vector_isa, write_results  # noqa: E402

MODES = {"portable": "0", "onednn": "1"}
KERNELS = (3, 5, 7, 11)


# --------------------------------------------------------------------------- machine (no TensorFlow)
def tf_onednn_by_default(flags: set[str]) -> bool:
    """TensorFlow's own Linux policy (tensorflow/core/util/port.cc, DefaultOneDnnPolicy)."""
    return bool(flags & {"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"})


def numpy_sgemm(coretype: str | None, n: int = 2048, repeats: int = 10) -> float:
    """NumPy float32 matmul GFLOP/s in a fresh process (OpenBLAS reads OPENBLAS_CORETYPE at load)."""
    code = (f"import numpy as np, time\na = np.random.default_rng(0).random(({n}, {n}), dtype=np.float32)\n"
            f"b = a.copy(); a @ b\nbest = 0.0\nfor _ in range(3):\n    t = time.perf_counter()\n"
            f"    for _ in range({repeats}): a @ b\n    best = max(best, 2 * {n}**3 * {repeats} / "
            f"(time.perf_counter() - t) / 1e9)\nprint(best)")
    env = {**os.environ, **({"OPENBLAS_CORETYPE": coretype} if coretype else {})}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip()), 1)


# --------------------------------------------------------------------------- one kernel path (TensorFlow)
def _worker(params_path: str, images: int) -> dict:
    from pipeline.cli import quiet_tensorflow

    quiet_tensorflow(debug=False)
    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline.model.architecture import forward_flops
    from pipeline.config.load import load_params
    from pipeline.model.fit import compile_model, onednn_enabled

    def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
        a, b = tf.random.normal((n, n)), tf.random.normal((n, n))
        tf.linalg.matmul(a, b).numpy()
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                c = tf.linalg.matmul(a, b)
            c.numpy()
            best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
        return round(best, 1)

    def fit_rate(params, jit: bool) -> float:
        """Best of two timed epochs of `images` random images (after a warm-up epoch)."""
        model = compile_model(params)
        model.jit_compile = jit
        m, bs = params.model, params.train.batch_size
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (images, m.image_height, m.image_width, m.image_channels)).astype(np.float32)
        y = np.eye(m.num_classes, dtype=np.float32)[rng.integers(0, m.num_classes, x.shape[:3])]
        model.fit(x[:2 * bs], y[:2 * bs], batch_size=bs, epochs=1, verbose=0)
        best = 0.0
        for _ in range(2):
            start = time.perf_counter()
            model.fit(x, y, batch_size=bs, epochs=1, verbose=0)
            best = max(best, images / (time.perf_counter() - start))
        keras.backend.clear_session()
        return round(best, 2)

    base = load_params(params_path)
    peak = matmul_gflops()
    rows = []
    for kernel, jit in [(base.model.base_kernels[0], True)] + [(k, False) for k in KERNELS]:
        params = load_params(params_path, {"model.base_kernels": [kernel, kernel]})
        flops = forward_flops(params.model)
        rate = fit_rate(params, jit)
        rows.append({"first_kernel": kernel, "xla": jit, "forward_gflop_per_image": round(flops / 1e9, 3),
                     "train_images_per_second": rate, "achieved_gflops": round(rate * 3 * flops / 1e9, 1),
                     "fraction_of_matmul_peak": round(rate * 3 * flops / 1e9 / peak, 3)})
    return {"onednn": onednn_enabled(), "tf_matmul_gflops": peak, "rows": rows,
            "pipeline": pipeline_rates(base), "tensorflow": tf.__version__}


def pipeline_rates(params) -> dict | None:
    """The default model through the train stage's own input pipeline: the stream alone,
    and one model.fit epoch through it (images/s)."""
    from pipeline.data.tfdata import load_arrays, load_split, steps_per_epoch, training_stream
    from pipeline.layout import Layout
    from pipeline.model.fit import compile_model

    layout, m, t = Layout(REPO, params), params.model, params.train
    if not (layout.data_dir / "train").is_dir():
        return None
    pairs = load_split(layout.data_dir, "train", params.mask, (m.image_width, m.image_height))
    split = load_arrays(pairs, params.mask, channels=m.image_channels, size=(m.image_width, m.image_height))

    def stream(epochs: int):
        return training_stream(split, batch_size=t.batch_size, epochs=epochs, seed=0, augment=t.augment,
                               num_classes=m.num_classes)

    for _ in stream(1).take(2):
        pass
    start = time.perf_counter()
    for _ in stream(1):
        pass
    alone = len(pairs) / (time.perf_counter() - start)
    model = compile_model(params, steps_per_epoch(len(pairs), t.batch_size))
    steps = steps_per_epoch(len(pairs), t.batch_size)
    model.fit(stream(1), epochs=1, steps_per_epoch=steps, verbose=0)
    start = time.perf_counter()
    model.fit(stream(1), epochs=1, steps_per_epoch=steps, verbose=0)
    return {"images": len(pairs), "stream_alone_images_per_second": round(alone, 1),
            "fit_images_per_second": round(len(pairs) / (time.perf_counter() - start), 2)}


# --------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    mc = result["machine"]
    lines = [f"Machine: {mc['cpu']}, {mc['cores']} cores, vector ISA {mc['vector_isa']} "
             f"(TensorFlow enables oneDNN by default here: {'yes' if mc['tf_onednn_by_default'] else 'no'}); "
             f"NumPy sgemm {mc['numpy_sgemm_gflops']} GFLOP/s, {mc['numpy_sgemm_avx2_gflops']} with OpenBLAS's "
             f"AVX2 (Haswell) kernel. TensorFlow {result.get('tensorflow', '?')}. Model: {result['model']}.", "",
             "| kernels | TF matmul GFLOP/s | first kernel | XLA | forward GFLOP/image | train images/s "
             "| achieved GFLOP/s | of matmul peak |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for mode, run in result["modes"].items():
        for row in run["rows"]:
            lines.append(f"| {mode} | {run['tf_matmul_gflops']} | {row['first_kernel']}x{row['first_kernel']} "
                         f"| {'yes' if row['xla'] else 'no'} | {row['forward_gflop_per_image']} "
                         f"| {row['train_images_per_second']} | {row['achieved_gflops']} "
                         f"| {row['fraction_of_matmul_peak']:.0%} |")
    lines += ["", "| kernels | train split | input stream alone, images/s | model.fit through it, images/s |",
              "|---|---:|---:|---:|"]
    for mode, run in result["modes"].items():
        p = run.get("pipeline")
        if p:
            lines.append(f"| {mode} | {p['images']} | {p['stream_alone_images_per_second']} "
                         f"| {p['fit_images_per_second']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--images", type=int, default=48, help="random images per timed epoch")
    parser.add_argument("--modes", default="portable,onednn")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.params, args.images)))
        return
    from pipeline.config.load import load_params

    m, t = load_params(args.params).model, load_params(args.params).train
    flags = cpu_flags()
    result: dict = {
        "model": f"{m.image_width}x{m.image_height}, {m.num_layers} levels, base_filters {m.base_filters}, "
                 f"base_kernels {m.base_kernels[0]}x{m.base_kernels[1]}, batch {t.batch_size}",
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "vector_isa": vector_isa(flags),
                    "avx512_vnni": "avx512_vnni" in flags, "avx512_bf16": "avx512_bf16" in flags,
                    "tf_onednn_by_default": tf_onednn_by_default(flags),
                    "numpy_sgemm_gflops": numpy_sgemm(None), "numpy_sgemm_avx2_gflops": numpy_sgemm("Haswell")},
        "modes": {},
    }
    for mode in args.modes.split(","):
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": MODES[mode], "TF_CPP_MIN_LOG_LEVEL": "2"}
        out = subprocess.run([sys.executable, __file__, "--worker", "--params", args.params,
                              "--images", str(args.images)], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{mode} worker failed:\n{out.stderr[-3000:]}")
        run = json.loads(out.stdout.strip().splitlines()[-1])
        result["tensorflow"] = run.pop("tensorflow")
        result["modes"][mode] = run
        print(f"{mode}: {json.dumps(run)}", flush=True)
    write_results(args.out, result, markdown)


if __name__ == "__main__":
    main()
