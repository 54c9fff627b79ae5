"""Whole-slide prediction: peak memory and time of `flexunet predict` on a pyramidal TIFF.

1. **The big slide.** A SIZE x SIZE (default 50 000) synthetic PAS slide with a fixed 10 %
   tissue fraction (`flexunet synthesize --whole-slide`, pipeline/data/synthetic/
   whole_slide.py) is predicted by `flexunet predict` in a child process, with the model
   card's background skip (the glomeruli model skips glass by default) and the default
   outputs (OME-Zarr labels, zarr uncertainty, QuPath GeoJSON). Reported: peak RSS of the
   child (getrusage of the children, so the generator never counts), wall seconds,
   windows run and skipped, the predictions.csv's estimate of the time the skip saved,
   objects found, and the size of the outputs.
2. **Streaming vs in memory.** The same generator's COMPARE x COMPARE (default 8192)
   slide, skip off, predicted twice: as the pyramidal TIFF (lazy windows, OME-Zarr out)
   and as a PNG of the same pixels (decoded whole, PNG out). Both in child processes;
   reported: seconds per megapixel of each and their ratio (the streamed path should
   stay within 10 % of the in-memory one).

Model: --model, default models/model.onnx (a glomeruli model: `flexunet preset
glomeruli-cpu && make repro`). The slides are generated in --workdir (default a temporary
folder; the 50 000 px slide takes a few GB of disk) and kept there with --keep.

    python benchmarks/wsi_memory.py [--size 50000] [--compare 8192] [--model models/model.onnx]

Results: benchmarks/results/wsi_memory.json and .md (the table in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_results import machine_summary, write_results  # noqa: E402

SEED = 7


def run_child(args: list[str]) -> tuple[float, float]:
    """Run a command; (wall seconds, its peak RSS in MB). Each measured command runs in a
    fresh grandchild via a tiny wrapper, so RUSAGE_CHILDREN holds that command alone."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - t0
    return seconds, int(out.stdout.strip().splitlines()[-1]) / 1024


def flexunet(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def synthesize(path: Path, size: int) -> float:
    if path.is_file():
        return 0.0
    seconds, _ = run_child(flexunet("synthesize", "--whole-slide", str(path), "--size", str(size),
                                    "--seed", str(SEED)))
    return seconds


def table_row(out: Path) -> dict:
    with (out / "predictions.csv").open(newline="") as fh:
        return next(csv.DictReader(fh))


def folder_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def big_slide(work: Path, size: int, model: str) -> dict:
    slide = work / f"slide{size}.ome.tif"
    made = synthesize(slide, size)
    out = work / f"out{size}"
    shutil.rmtree(out, ignore_errors=True)
    seconds, rss = run_child(flexunet("predict", "--model", model, "--input", str(slide), "--output", str(out)))
    row = table_row(out)
    stem = "slide%d" % size
    return {
        "size": size, "slide_mb": round(slide.stat().st_size / 2**20, 1), "synthesize_seconds": round(made, 1),
        "peak_rss_mb": round(rss, 1), "wall_seconds": round(seconds, 1), "predict_seconds": float(row["seconds"]),
        "tiles": int(row["tiles"]), "skipped_tiles": int(row["skipped_tiles"]),
        "skipped_fraction": round(int(row["skipped_tiles"]) / int(row["tiles"]), 4),
        "seconds_saved_estimate": float(row["seconds_saved"] or 0), "objects": int(row["objects"] or 0),
        "uncertainty_mean": float(row["uncertainty_mean"]),
        "ome_zarr_mb": round(folder_mb(out / f"{stem}.ome.zarr"), 1),
        "uncertainty_zarr_mb": round(folder_mb(out / f"{stem}.uncertainty.zarr"), 1),
        "geojson_mb": round(folder_mb(out / f"{stem}.geojson"), 2),
    }


def compare(work: Path, size: int, model: str, rounds: int) -> dict:
    """Seconds per MP: the slide streamed (OME-Zarr out) vs its pixels as a PNG in memory (PNG out)."""
    import numpy as np
    from PIL import Image

    from serving.slide import open_slide

    slide = work / f"slide{size}.ome.tif"
    synthesize(slide, size)
    png = work / f"slide{size}.png"
    if not png.is_file():
        with open_slide(slide) as s:
            Image.fromarray(np.asarray(s.read(0))).save(png, compress_level=1)
    mp = size * size / 1e6
    best: dict[str, float] = {}
    for _ in range(rounds):   # alternate, so a slow spell of a shared machine hits both
        for name, path, fmt in (("streamed", slide, "ome-zarr"), ("in_memory", png, "png")):
            out = work / f"cmp-{name}"
            shutil.rmtree(out, ignore_errors=True)
            run_child(flexunet("predict", "--model", model, "--input", str(path), "--output", str(out),
                               "--tissue-threshold", "0", "--format", fmt, "--no-geojson", "--allow-large-images"))
            best[name] = min(best.get(name, float("inf")), float(table_row(out)["seconds"]))
    return {"size": size, "megapixels": round(mp, 2),
            "streamed_s_per_mp": round(best["streamed"] / mp, 4), "in_memory_s_per_mp": round(best["in_memory"] / mp, 4),
            "ratio": round(best["streamed"] / best["in_memory"], 4)}


def model_label(path: str) -> str:
    """Which model: its dataset (from the card) and the first 12 hex digits of its sha256."""
    from serving.card import read_card, sha256_file

    return f"{read_card(path).dataset} model, sha256 {sha256_file(path)[:12]}"


def markdown(r: dict) -> str:
    m, b, c = r["machine"], r["big"], r["compare"]
    return "\n".join([
        f"Whole-slide prediction (`python benchmarks/wsi_memory.py`), {m['cpu']}, {m['cores']} cores, "
        f"{m['vector_isa']}; model {r['model']}.",
        "",
        "| slide | tissue skip | windows run / all | peak RSS | wall time | skip saved (est.) | objects | OME-Zarr | GeoJSON |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {b['size']} x {b['size']} px pyramidal OME-TIFF ({b['slide_mb']} MB), 10 % tissue | on (card: 220) | "
        f"{b['tiles'] - b['skipped_tiles']} / {b['tiles']} ({100 * b['skipped_fraction']:.1f} % skipped) | "
        f"**{b['peak_rss_mb']:.0f} MB** | {b['wall_seconds'] / 60:.1f} min | {b['seconds_saved_estimate'] / 60:.0f} min | "
        f"{b['objects']} | {b['ome_zarr_mb']} MB | {b['geojson_mb']} MB |",
        "",
        f"Streaming vs in memory, {c['size']} x {c['size']} px, skip off (best of {r['rounds']}): "
        f"streamed {c['streamed_s_per_mp']:.3f} s/MP, in memory {c['in_memory_s_per_mp']:.3f} s/MP, "
        f"ratio **{c['ratio']:.3f}**.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=50000)
    parser.add_argument("--compare", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=str(REPO / "models" / "model.onnx"))
    parser.add_argument("--workdir", default=None, help="where the slides go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the slides and outputs in --workdir")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "wsi_memory"))
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsi-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = {"machine": machine_summary(), "model": model_label(args.model), "rounds": args.rounds,
                  "compare": compare(work, args.compare, args.model, args.rounds),
                  "big": big_slide(work, args.size, args.model)}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_results(args.out, result, markdown)
    print(json.dumps(result["big"], indent=2))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
