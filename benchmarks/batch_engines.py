"""Batch prediction engines: images/s of `flexunet predict --engine local` vs `--engine ray`.

Three synthetic sets, RGB PNGs written to a temporary folder: one small image (the fixed
cost of a run), MINIS small ones (default 200 of 64 px: one window each, so the per-image
cost of an engine shows) and LARGE large ones (default 8 of 1024 px: many windows each, so
the compute dominates). Each set is predicted by serving.batch.run_batch with the local
engine and with the Ray engine (serving.ray_engine) at 1 and 2 workers, into a fresh
output folder each time, `--rounds` times round-robin (the best time counts), with the
default settings (overlap 0.25, Gaussian, batch 4; threads: all cores for local, the
cores / workers per Ray actor). Reported: wall seconds (a Ray run includes starting its
actors: every `flexunet predict --engine ray` pays that), images/s, and the overhead per
image vs local, (ray seconds - local seconds) / images. The Ray instance is started once
before (its start-up time is reported on its own). The masks of every run are compared
byte for byte with the local engine's.

Model: --model, default models/model.onnx when `make repro` exported one, else a tiny
ONNX model (tests/onnx_models.py, needs onnx). A model that takes images whole (the
kidney model's card: scale 'whole') is timed tiled, through a copy whose card says so.

    python benchmarks/batch_engines.py [--model models/model.onnx] [--minis 200] [--large 8]

Results: benchmarks/results/batch_engines.json and .md (the table in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench_results import write_results  # noqa: E402
from bench_results import machine_summary  # noqa: E402

ENGINES = (("local", None), ("ray", 1), ("ray", 2))


def write_images(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    """`count` RGB PNGs of size x size: smooth blobs plus noise (so the masks are not uniform)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    paths = []
    for i in range(count):
        fy, fx = rng.uniform(3, 12, 2)
        base = 128 + 80 * np.sin(x / fx + i) * np.cos(y / fy)
        image = np.clip(base[..., None] + rng.normal(0, 15, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img{i:04d}.png")
        paths.append(folder / f"img{i:04d}.png")
    return paths


def masks(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def run_set(name: str, inputs: list[Path], model: str, tmp: Path, rounds: int) -> dict:
    """Every engine `rounds` times, round-robin (load drifting on a shared machine hits all
    alike); the best time of each counts."""
    from serving.batch import LocalEngine, run_batch
    from serving.load import load_predictor
    from serving.ray_engine import RayEngine

    times: dict[int | None, list[float]] = {workers: [] for _, workers in ENGINES}
    identical: dict[int | None, bool] = {}
    reference = None
    for r in range(rounds):
        for _, workers in ENGINES:
            engine = LocalEngine(load_predictor(model)) if workers is None else RayEngine(model, workers=workers)
            out = tmp / f"{name}-{workers}-{r}"
            t0 = time.perf_counter()
            summary = run_batch(engine, inputs, out, progress=False)
            times[workers].append(time.perf_counter() - t0)
            assert summary.ok == len(inputs), summary.line()
            written = masks(out)
            reference = reference or written
            identical[workers] = identical.get(workers, True) and written == reference
            print(f"{name}: {label(workers)}: {times[workers][-1]:.1f} s", flush=True)
    runs = []
    for _, workers in ENGINES:
        best = min(times[workers])
        run = {"engine": label(workers), "seconds": round(best, 2), "all_seconds": [round(t, 2) for t in times[workers]],
               "images_per_second": round(len(inputs) / best, 2), "masks_identical_to_local": identical[workers]}
        if workers is not None:
            run["overhead_ms_per_image"] = round(1000 * (best - min(times[None])) / len(inputs), 1)
        runs.append(run)
    return {"images": len(inputs), "runs": runs}


def label(workers: int | None) -> str:
    return "local" if workers is None else f"ray, {workers} worker{'s' * (workers > 1)}"


def markdown(result: dict) -> str:
    mc = result["machine"]
    lines = [f"Machine: {mc['cpu']}, {mc['cores']} cores, vector ISA {mc['vector_isa']}; onnxruntime "
             f"{result['onnxruntime']}, Ray {result['ray']}. Model: {result['model']} (tile {result['tile_size']}). "
             f"Ray start-up (ray.init, once, not in the runs): {result['ray_init_seconds']} s. Load average "
             f"(1/5/15 min) at start {result['loadavg_start']}, at end {result['loadavg_end']} (a shared machine).",
             "", f"Best of {result['rounds']} round-robin runs each.", "",
             "| images | engine | seconds | images/s | overhead vs local, ms/image | masks = local's |",
             "|---|---|---:|---:|---:|---|"]
    for name, s in result["sets"].items():
        for run in s["runs"]:
            lines.append(f"| {s['images']} x {name} | {run['engine']} | {run['seconds']} | {run['images_per_second']} "
                         f"| {run.get('overhead_ms_per_image', '')} "
                         f"| {'yes' if run['masks_identical_to_local'] else '**no**'} |")
    lines += ["", "A Ray run's seconds include starting its actors (one onnxruntime session each): the one-image "
                  "run shows that fixed cost. Threads: all cores for local, cores / workers per Ray actor."]
    return "\n".join(lines) + "\n"


def tiled_copy(model: Path, out: Path) -> Path:
    """The model with its card's scale set to 'tiled', so large images are predicted window
    by window (compute-bound) instead of whole at the model size."""
    import dataclasses

    import onnx

    from serving.card import METADATA_KEY, ModelCard

    proto = onnx.load(str(model))
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = dataclasses.replace(ModelCard.from_json(prop.value), scale="tiled").to_json()
    onnx.save_model(proto, str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: models/model.onnx if present, else a tiny model")
    parser.add_argument("--minis", type=int, default=200)
    parser.add_argument("--mini-size", type=int, default=64)
    parser.add_argument("--large", type=int, default=8)
    parser.add_argument("--large-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each engine (the best counts)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "batch_engines"))
    args = parser.parse_args()

    import onnxruntime
    import ray

    from serving.card import read_card, sha256_file
    from serving.ray_engine import connect

    loadavg_start = " ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="batch-engines-") as tmp_name:
        tmp = Path(tmp_name)
        model, name = args.model, args.model
        if model is None and (REPO / "models" / "model.onnx").is_file():
            model, name = str(REPO / "models" / "model.onnx"), "models/model.onnx"
        if model is None:
            from tests.onnx_models import make_tiny_onnx

            model, name = str(make_tiny_onnx(tmp / "tiny.onnx")), "tiny ONNX model (tests/onnx_models.py)"
        name += f", sha256 {sha256_file(model)[:12]}"
        if read_card(model).scale == "whole":   # the kidney model takes images whole: tile it, as the engines are timed on windows
            model = str(tiled_copy(Path(model), tmp / "tiled.onnx"))
            name += ", its card set to scale 'tiled' (windows of its training size)"
        t0 = time.perf_counter()
        connect()
        ray_init = time.perf_counter() - t0
        sets = {f"{args.mini_size} px (the fixed cost)": write_images(tmp / "one", 1, args.mini_size, 2),   # the fixed cost
                f"{args.mini_size} px": write_images(tmp / "minis", args.minis, args.mini_size, 0),
                f"{args.large_size} px": write_images(tmp / "large", args.large, args.large_size, 1)}
        result = {"machine": machine_summary(), "onnxruntime": onnxruntime.__version__, "ray": ray.__version__,
                  "model": name, "tile_size": read_card(model).tile_size,
                  "ray_init_seconds": round(ray_init, 2), "loadavg_start": loadavg_start,
                  "rounds": args.rounds,
                  "sets": {name: run_set(f"set{i}", inputs, model, tmp, args.rounds)
                           for i, (name, inputs) in enumerate(sets.items())}}
        result["loadavg_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
        ray.shutdown()
    write_results(args.out, result, markdown)


if __name__ == "__main__":
    main()
