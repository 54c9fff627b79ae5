"""Tiled inference: our onnxruntime tiler vs the model's compute and vs the seed's tiler.

In one run, on a synthetic SIZE x SIZE RGB image (default 2048) and the default model of
params.yaml with the study's values (models/model.keras weights if present, else the same architecture randomly
initialised: speed does not depend on the weights), each variant in its own process so
its peak RSS is its own (VmHWM from /proc/self/status):

- single_pass: onnxruntime over the whole image in one call (the compute bound);
- tiled_<overlap>: serving.TiledPredictor.predict at overlap 0 / 0.25 / 0.5, Gaussian
  blending, batch 4; in the same process, alternating with it, `raw windows`: the same
  number of windows as fixed-shape batches straight through onnxruntime (no cutting,
  blending or argmax) -> overhead = tiled time / raw time - 1 (target <= 10 %). Also
  reported: the overhead within the tiled run itself, wall time / time inside
  onnxruntime - 1 (immune to load from other processes drifting between runs);
- seed_style: a reimplementation of the seed's tiler (below): Keras model.predict per
  tile, one at a time, fixed margins, crop, resize to the model size, argmax, paste;
- int8_0.25: our tiler at overlap 0.25 running the export stage's int8 model (static QDQ,
  calibrated on train images; needs the prepared dataset and models/model.keras), with
  that model's test Dice next to fp32's from the export stage's own compare();
- stream: predict() of a STREAM x STREAM image (default 16384) generated in the process:
  RSS after creating the input and the peak (target: peak - input <= 1.5 GB).

    python benchmarks/tiled_inference.py [--quick] [--params params.yaml]

--quick: 1024 image, 4096 stream, one repetition. Results: benchmarks/results/tiled_inference.json
and .md (the table in docs/benchmarks.md). Timings are the best of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
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

MB = 1024 * 1024
INT8_FILE = "model.int8.onnx"   # next to the fp32 model in the run's temporary folder


# ---------------------------------------------------------------------- measuring
def proc_status() -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """Smooth blobs + noise, uint8 RGB, built in row chunks (no float copy of the whole image)."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), dtype=np.uint8)
    x = np.arange(size, dtype=np.float32)
    for r0 in range(0, size, 512):
        y = np.arange(r0, min(size, r0 + 512), dtype=np.float32)[:, None]
        base = 128 + 70 * np.sin(x / 97.0)[None] * np.cos(y / 131.0)
        for c, shift in enumerate((0.0, 25.0, -25.0)):
            noise = rng.normal(0, 12, base.shape).astype(np.float32)
            image[r0: r0 + len(y), :, c] = np.clip(base + shift + noise, 0, 255)
    return image


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ---------------------------------------------------------------------- the seed's tiler
def seed_style_predict(model, image: np.ndarray, tile: int, margin: int) -> np.ndarray:
    """The seed's tiled inference (TensorflowUNetTiledInferencer.infer_tiles), reimplemented.

    The image is split into tile x tile blocks; each block is cropped with `margin` extra
    px on every side that stays inside the image (none at the borders), the crop resized
    (bilinear) to the model size, predicted alone with model.predict, argmaxed, the labels
    resized back (nearest) to the crop size, the margins cut off and the block pasted. No
    blending, one tile per call. (The seed also predicted the whole image resized, for its
    `bitwise_blending`; that extra call is left out here, in the seed's favour.)
    """
    from PIL import Image

    h, w = image.shape[:2]
    size = model.input_shape[1]
    out = np.zeros((h, w), np.uint8)
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            bottom, right = min(top + tile, h), min(left + tile, w)
            mt, ml = (margin if top - margin >= 0 else 0), (margin if left - margin >= 0 else 0)
            mb, mr = (margin if bottom + margin <= h else 0), (margin if right + margin <= w else 0)
            crop = image[top - mt: bottom + mb, left - ml: right + mr]
            small = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR), np.float32)
            probs = model.predict(small[None], verbose=0)[0]
            ids = Image.fromarray(probs.argmax(-1).astype(np.uint8))
            ids = np.asarray(ids.resize((crop.shape[1], crop.shape[0]), Image.NEAREST))
            out[top:bottom, left:right] = ids[mt: mt + bottom - top, ml: ml + right - left]
    return out


# ---------------------------------------------------------------------- workers (one process each)
def work_export(a: argparse.Namespace) -> dict[str, Any]:
    from pipeline.cli import quiet_tensorflow

    quiet_tensorflow(debug=False)
    import onnxruntime
    import tensorflow as tf

    from benchmarks.bench_results import default_model
    from pipeline.stages.export import card_for, space_to_depth_levels, to_onnx
    from pipeline.config.load import load_params

    params = load_params(a.params)
    model, weights, params = default_model(params)
    model.save(a.keras)
    to_onnx(model, Path(a.model), card_for(params, None, {}), opset=params.export.opset,
            phase_levels=space_to_depth_levels(params))
    m = params.model
    return {"weights": weights, "tile_size": m.image_width, "num_layers": m.num_layers, "base_filters": m.base_filters,
            "space_to_depth_levels": space_to_depth_levels(params),
            "base_kernels": list(m.base_kernels), "tensorflow": tf.__version__, "onnxruntime": onnxruntime.__version__,
            **int8_export(model, params, Path(a.model))}


def int8_export(model, params, fp32: Path) -> dict[str, Any]:
    """The export stage's int8 model (static QDQ, calibrated on train images) next to the
    fp32 one, with both models' test Dice and parity from the export stage's own compare().
    Needs the prepared dataset (make repro); without it the int8 rows are left out."""
    from pipeline.stages.export import compare, quantize_int8, session
    from pipeline.layout import Layout

    layout = Layout(REPO, params)
    if not (layout.data_dir / "train").is_dir() or not (REPO / "models" / "model.keras").is_file():
        print(f"int8 rows skipped: no trained model or no {layout.data_dir}/train (run make repro first)")
        return {}
    int8 = quantize_int8(fp32, fp32.with_name(INT8_FILE), layout)
    quality = compare(model, {"fp32": session(fp32), "int8": session(int8)}, layout)
    return {"int8": {k: quality[k] for k in ("fp32_mean_foreground_dice", "int8_mean_foreground_dice",
                                             "int8_max_abs_vs_tf", "int8_argmax_agreement_vs_tf")}}


class TimedSession:
    """Wraps a predictor's session to add up the seconds spent inside onnxruntime."""

    def __init__(self, session):
        self.session, self.seconds = session, 0.0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self.session(batch)
        self.seconds += time.perf_counter() - start
        return out


class Variants:
    """Each benchmarked variant as a zero-argument callable over the same image.

    Names: single_pass, tiled_<overlap>, raw_<overlap> (the same windows straight through
    onnxruntime), seed_style. Each callable is warmed up once before timing (a first
    onnxruntime run plans memory for its shape; Keras builds its predict function).
    """

    def __init__(self, a: argparse.Namespace, names: list[str], warm_up: bool = True):
        self.a, self.image, self.warm_up = a, synthetic_image(a.size), warm_up
        self.fns: dict[str, Any] = {}
        self.windows: dict[str, int] = {}
        self.in_model: dict[str, list[float]] = {}
        for name in names:
            getattr(self, "_" + name.split("_")[0])(name)

    def _single(self, name: str) -> None:
        from serving._onnx_session import open_session

        session, _ = open_session(Path(self.a.model), self.a.threads)
        batch = self.image[None].astype(np.float32)
        if self.warm_up:
            session(batch)
        self.fns[name], self.windows[name] = (lambda: session(batch)), 1

    def _predictor(self, overlap: float, model: str | None = None):
        from serving.predictor import TiledPredictor
        from serving.tiling import window_starts

        predictor = TiledPredictor.from_onnx(model or self.a.model, overlap=overlap, batch_size=self.a.batch_size,
                                             threads=self.a.threads)
        return predictor, len(window_starts(self.a.size, predictor.tile_size, overlap)) ** 2

    def _int8(self, name: str) -> None:
        """Our tiler, unchanged, running the int8 model of the export stage's quantiser."""
        self._tiled(name, str(Path(self.a.model).with_name(INT8_FILE)))

    def _tiled(self, name: str, model: str | None = None) -> None:
        predictor, self.windows[name] = self._predictor(float(name.split("_")[1]), model)
        timed = predictor.session = TimedSession(predictor.session)
        self.in_model[name] = []

        def run() -> None:
            timed.seconds = 0.0
            predictor.predict(self.image)
            self.in_model[name].append(timed.seconds)

        if self.warm_up:
            predictor.predict(self.image[: predictor.tile_size, : predictor.tile_size])
        self.fns[name] = run

    def _raw(self, name: str) -> None:
        predictor, windows = self._predictor(float(name.split("_")[1]))
        t, bs = predictor.tile_size, self.a.batch_size
        batch = self.image[:t, :t][None].repeat(bs, axis=0).astype(np.float32)
        calls = math.ceil(windows / bs)   # the tiler's fixed-shape batches, last one padded

        def run() -> None:
            for _ in range(calls):
                predictor.predict_fn(batch)

        if self.warm_up:
            predictor.predict_fn(batch)
        self.fns[name], self.windows[name] = run, windows

    def _seed(self, name: str) -> None:
        from pipeline.cli import quiet_tensorflow

        quiet_tensorflow(debug=False)
        import keras

        model = keras.models.load_model(self.a.keras, compile=False)
        tile = model.input_shape[1]
        if self.warm_up:
            model.predict(np.zeros((1, tile, tile, model.input_shape[3]), np.float32), verbose=0)
        self.fns[name] = lambda: seed_style_predict(model, self.image, tile, self.a.margin)
        self.windows[name] = math.ceil(self.a.size / tile) ** 2


def variant_names(int8: bool = False) -> list[str]:
    overlaps = ("0", "0.25", "0.5")
    return ["single_pass", *(f"{k}_{o}" for o in overlaps for k in ("raw", "tiled")), "seed_style",
            *(["int8_0.25"] if int8 else [])]


def work_timing(a: argparse.Namespace) -> dict[str, Any]:
    """All variants in one process, round-robin for --repeats rounds: load from other
    processes that comes and goes hits every variant alike; the best round of each counts."""
    v = Variants(a, variant_names(int8=(Path(a.model).with_name(INT8_FILE)).is_file()))
    times: dict[str, list[float]] = {name: [] for name in v.fns}
    for _ in range(a.repeats):
        for name, fn in v.fns.items():
            times[name].append(best_time(fn, 1))
    return {name: {"seconds": min(t), "seconds_all": t, "windows": v.windows[name],
                   **({"in_model_seconds": v.in_model[name][int(np.argmin(t))]} if name in v.in_model else {})}
            for name, t in times.items()}


def work_memory(a: argparse.Namespace) -> dict[str, Any]:
    """One variant, one run, alone in this process: its peak RSS."""
    v = Variants(a, [a.variant], warm_up=False)
    return {"seconds": best_time(v.fns[a.variant], 1)}


def work_stream(a: argparse.Namespace) -> dict[str, Any]:
    from serving.predictor import TiledPredictor

    predictor = TiledPredictor.from_onnx(a.model, overlap=0.25, batch_size=a.batch_size, threads=a.threads)
    before = proc_status()["VmRSS"]
    image = synthetic_image(a.size)
    after_input = proc_status()
    start = time.perf_counter()
    labels = predictor.predict(image)
    seconds = time.perf_counter() - start
    peak = proc_status()["VmHWM"]
    return {"seconds": seconds, "input_bytes": image.nbytes, "labels_bytes": labels.nbytes,
            "rss_before_input": before, "rss_after_input": after_input["VmRSS"], "peak_rss": peak,
            "peak_beyond_input": peak - image.nbytes, "peak_increase_during_predict": peak - after_input["VmRSS"]}


WORKERS = {"export": work_export, "timing": work_timing, "memory": work_memory, "stream": work_stream}


def run_worker(name: str, tmp: Path, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Run one variant in a fresh process; return its JSON result plus its own peak RSS."""
    out = tmp / f"{name}-{time.monotonic_ns()}.json"
    opts = {"params": args.params, "model": str(tmp / "model.onnx"), "keras": str(tmp / "model.keras"),
            "size": args.size, "repeats": args.repeats, "batch_size": args.batch_size, "margin": args.margin,
            **extra}
    cmd = [sys.executable, __file__, "--worker", name, "--result", str(out)]
    for key, value in opts.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[{time.strftime('%H:%M:%S')}] {name} {extra or ''}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def worker_main(a: argparse.Namespace) -> None:
    result = WORKERS[a.worker](a)
    result["peak_rss"] = proc_status()["VmHWM"]
    Path(a.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------- report
def summarise(timing: dict[str, Any], memory: dict[str, int], size: int) -> dict[str, Any]:
    """Per variant: best seconds, MP/s, peak RSS; ours also vs the seed and vs raw windows."""
    mp = size * size / 1e6
    seed = timing["seed_style"]["seconds"]
    out: dict[str, Any] = {}
    for name, t in timing.items():
        row = {**t, "megapixels_per_second": mp / t["seconds"], "peak_rss": memory.get(name)}
        if name.startswith(("tiled_", "int8_")):
            raw = timing["raw_" + name.split("_")[1]]["seconds"]
            row.update(speedup_vs_seed=seed / t["seconds"], overhead=t["seconds"] / raw - 1,
                       overhead_in_run=t["seconds"] / t["in_model_seconds"] - 1,
                       vs_single_pass=timing["single_pass"]["seconds"] / t["seconds"])
        if name.startswith("raw_") or name == "single_pass":
            row["speedup_vs_seed"] = seed / t["seconds"]
        out[name] = row
    return out


LABELS = {"single_pass": "onnxruntime, whole image in one pass (compute bound)",
          "seed_style": "seed-style tiler (Keras predict per tile, resize, paste)"}


def markdown(report: dict[str, Any]) -> str:
    r, size, env = report["variants"], report["size"], report["environment"]
    lines = [
        f"Tiled inference of a {size}x{size} RGB image with the default model ({env['model']}) on "
        f"{env['cpu']}, {env['cores']} cores, vector ISA {env.get('vector_isa', '?')}; onnxruntime {env['onnxruntime']}, batch {report['batch_size']}, "
        f"best of {report['repeats']} round-robin rounds.",
        "",
        "| variant | windows | seconds | MP/s | vs seed-style | tiling + blending overhead | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = ["single_pass", "tiled_0", "raw_0", "tiled_0.25", "raw_0.25", "tiled_0.5", "raw_0.5", "seed_style",
             "int8_0.25"]
    for name in (n for n in order if n in r):
        v = r[name]
        kind, _, ov = name.partition("_")
        label = LABELS.get(name) or {"tiled": f"**ours**, overlap {ov}, Gaussian",
                                     "int8": f"**ours**, overlap {ov}, Gaussian, **int8 model** (static QDQ)"}.get(
            kind, f"same windows, onnxruntime only (overlap {ov})")
        speed = f"{v['speedup_vs_seed']:.2f}x" if "speedup_vs_seed" in v else "1x"
        over = (f"{100 * v['overhead']:+.1f} % ({100 * v['overhead_in_run']:.1f} % in-run)"
                if "overhead" in v and kind == "tiled" else
                f"({100 * v['overhead_in_run']:.1f} % in-run)" if kind == "int8" else "")
        rss = f"{v['peak_rss'] / MB:.0f}" if v.get("peak_rss") else "-"
        lines.append(f"| {label} | {v['windows']} | {v['seconds']:.1f} | {v['megapixels_per_second']:.3f} "
                     f"| {speed} | {over} | {rss} |")
    if "stream" in report:
        s = report["stream"]
        lines += ["", f"Streaming {s['size']}x{s['size']} ({s['size'] ** 2 / 1e6:.0f} MP, overlap 0.25, predict -> uint8 "
                      f"labels): {s['seconds'] / 60:.1f} min, {s['megapixels_per_second']:.3f} MP/s. RSS after creating "
                      f"the {s['input_bytes'] / MB:.0f} MB input: {s['rss_after_input'] / MB:.0f} MB; peak "
                      f"{s['peak_rss'] / MB:.0f} MB, i.e. **{s['peak_beyond_input'] / MB:.0f} MB beyond the input** "
                      f"(incl. the {s['labels_bytes'] / MB:.0f} MB label array and the runtime; target <= 1536 MB)."]
    if "int8" in report:
        q = report["int8"]
        lines += ["", f"int8 model: the export stage's quantiser (`export.quantize_int8`: static QDQ, per-channel, "
                      f"U8S8, calibrated on 16 train images). Test mean foreground Dice {q['int8_mean_foreground_dice']:.4f} "
                      f"vs fp32 {q['fp32_mean_foreground_dice']:.4f}; vs TF: max |dp| {q['int8_max_abs_vs_tf']:.3f}, "
                      f"argmax agreement {100 * q['int8_argmax_agreement_vs_tf']:.2f} %. (The raw-window overhead "
                      f"column compares to fp32 windows, so only the in-run overhead is given.)"]
    lines += ["", targets_line(report)]
    lines += ["", "Overhead = our time / the same windows through onnxruntime alone - 1 (in-run: wall time / "
                  "time inside onnxruntime - 1, in the same run). Peak RSS: each variant alone in a fresh process "
                  "(VmHWM). Seed-style margin: " + str(report["seed_margin"]) + " px.",
              f"Load average (1/5/15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']}: the machine "
              f"is shared, so absolute MP/s vary between runs; the round-robin keeps ratios comparable.",
              f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def targets_line(report: dict[str, Any]) -> str:
    """Targets at overlap 0.25, and what the speed-up is made of (windows x time per window)."""
    v = report["variants"]
    ours, raw, seed = v["tiled_0.25"], v["raw_0.25"], v["seed_style"]
    per_ours = 1000 * raw["seconds"] / raw["windows"]
    per_seed = 1000 * seed["seconds"] / seed["windows"]
    # seed-style windows tile the image without overlap: one per window area
    per_area = v["single_pass"]["seconds"] / seed["windows"]
    bound = per_area * raw["windows"]
    met = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    return (f"Targets at overlap 0.25: overhead <= 10 %: {met(ours['overhead'] <= 0.10)} "
            f"({100 * ours['overhead']:+.1f} %); >= 3x the seed-style tiler: {met(ours['speedup_vs_seed'] >= 3)} "
            f"({ours['speedup_vs_seed']:.2f}x). Per window onnxruntime takes {per_ours:.1f} ms (batched) vs "
            f"{per_seed:.1f} ms per Keras predict call ({per_seed / per_ours:.1f}x), but overlap 0.25 runs "
            f"{raw['windows']} windows where the seed's non-overlapping tiles need {seed['windows']} "
            f"({raw['windows'] / seed['windows']:.2f}x). Even a tiler costing nothing, at the whole-image "
            f"compute rate ({1000 * per_area:.1f} ms per window area), would take {bound:.1f} s for them: "
            f"{seed['seconds'] / bound:.2f}x the seed-style tiler."
            + (f" With the int8 model the same tiler reaches {v['int8_0.25']['speedup_vs_seed']:.2f}x "
               f"({met(v['int8_0.25']['speedup_vs_seed'] >= 3)} in int8)." if "int8_0.25" in v else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--quick", action="store_true", help="1024 image, 4096 stream, 1 round")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--stream-size", type=int, default=None, help="0: skip the streaming run")
    parser.add_argument("--repeats", type=int, default=None, help="round-robin rounds (3; --quick 1)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--margin", type=int, default=16, help="seed-style margin in px (each side)")
    parser.add_argument("--out", default=None, help="results path without suffix "
                        "(default benchmarks/results/tiled_inference, or tiled_inference_quick with --quick)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--keras", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)
    args.size = args.size or (1024 if args.quick else 2048)
    args.repeats = args.repeats or (1 if args.quick else 3)
    out = Path(args.out or REPO / "benchmarks" / "results" / ("tiled_inference_quick" if args.quick else "tiled_inference"))
    stream = args.stream_size if args.stream_size is not None else (4096 if args.quick else 16384)
    from benchmarks.bench_results import machine_summary

    env = {"python": platform.python_version(),
           "loadavg_start": " ".join(f"{v:.1f}" for v in os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="tiled-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = run_worker("export", tmp, args)
        timing = run_worker("timing", tmp, args)
        timing.pop("peak_rss")  # of the all-variants process: meaningless per variant
        memory = {name: run_worker("memory", tmp, args, variant=name)["peak_rss"]
                  for name in ("single_pass", "tiled_0", "tiled_0.25", "tiled_0.5", "seed_style")}
        streamed = run_worker("stream", tmp, args, size=stream) | {"size": stream} if stream else None
    env.update(model=f"{model['tile_size']} px, {model['num_layers']} levels, base_filters {model['base_filters']}, "
                     f"{model['base_kernels'][0]}x{model['base_kernels'][1]}, weights: {model['weights']}"
                     + (f", exported with {model['space_to_depth_levels']} level(s) on 2x2 phases "
                        f"(export.space_to_depth)" if model.get("space_to_depth_levels") else ""),
               onnxruntime=model["onnxruntime"], tensorflow=model["tensorflow"], **machine_summary(),
               loadavg_end=" ".join(f"{v:.1f}" for v in os.getloadavg()))
    report: dict[str, Any] = {
        "size": args.size, "batch_size": args.batch_size, "repeats": args.repeats, "seed_margin": args.margin,
        "environment": env, "command": command_line(),
        "variants": summarise(timing, memory, args.size), **({"int8": model["int8"]} if "int8" in model else {})}
    if streamed:
        streamed["megapixels_per_second"] = stream**2 / 1e6 / streamed["seconds"]
        report["stream"] = streamed
    t25 = report["variants"]["tiled_0.25"]
    report["targets"] = {"overhead_le_10pct": t25["overhead"] <= 0.10,
                         "speedup_vs_seed_ge_3x": t25["speedup_vs_seed"] >= 3.0,
                         **({"int8_speedup_vs_seed_ge_3x": report["variants"]["int8_0.25"]["speedup_vs_seed"] >= 3.0}
                            if "int8_0.25" in report["variants"] else {}),
                         **({"stream_peak_beyond_input_le_1.5GB": streamed["peak_beyond_input"] <= 1.5 * 1024**3}
                            if streamed else {})}
    from common.atomic import write_json, write_text

    write_json(out.with_suffix(".json"), report)
    write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))


def command_line() -> str:
    """The command that reproduces these numbers (--out only moves the files: left out)."""
    argv, kept = sys.argv[1:], []
    while argv:
        arg = argv.pop(0)
        if arg == "--out":
            argv.pop(0) if argv else None
        elif not arg.startswith("--out="):
            kept.append(arg)
    return " ".join(["python benchmarks/tiled_inference.py", *kept])


if __name__ == "__main__":
    main()
