"""Object tracing speed: serving.objects.ObjectTracer on a synthetic slide-like label image.

A SIZE x SIZE (default 8192) uint8 label image with OBJECTS (default 2000) discs of radius
25..35 px at random places (overlapping discs merge, as touching glomeruli would), classes
1 and 2 at random, fed in bands of BAND rows (default 128) with or without float32
probabilities (K = 3, made per band outside the timed part). Timed: every add_band plus
objects(); then write_geojson. Checked against scipy.ndimage.label (4-connectivity): the
same number of objects and the same areas.

    python benchmarks/object_tracing.py [--size 8192] [--objects 2000] [--band 128]

Results: benchmarks/results/object_tracing.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_results import REPO, machine_summary, write_results  # noqa: E402
from serving.objects import ObjectTracer, write_geojson  # noqa: E402


def disc_labels(size: int, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.uint8)
    for _ in range(count):
        r = int(rng.integers(25, 36))
        cy, cx = (int(v) for v in rng.integers(0, size, 2))
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, size), max(cx - r, 0), min(cx + r + 1, size)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        labels[y0:y1, x0:x1][disc] = rng.integers(1, 3)
    return labels


def band_probs(labels: np.ndarray) -> np.ndarray:
    probs = np.full(labels.shape + (3,), 0.1, np.float32)
    np.put_along_axis(probs, labels[..., None].astype(np.int64), 0.8, axis=-1)
    return probs


def trace(labels: np.ndarray, band: int, with_probs: bool) -> tuple[float, list]:
    tracer = ObjectTracer(3)
    elapsed = 0.0
    for row0 in range(0, labels.shape[0], band):
        lab = labels[row0: row0 + band]
        probs = band_probs(lab) if with_probs else None
        t = time.perf_counter()
        tracer.add_band(row0, lab, probs)
        elapsed += time.perf_counter() - t
    t = time.perf_counter()
    objects = tracer.objects()
    return elapsed + time.perf_counter() - t, objects


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--objects", type=int, default=2000)
    ap.add_argument("--band", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "object_tracing"))
    a = ap.parse_args()

    labels = disc_labels(a.size, a.objects)
    from scipy import ndimage   # only for the check; serving stays scipy-free

    expected = []
    for c in (1, 2):
        comp, _ = ndimage.label(labels == c)
        expected += [(c, int(n)) for n in np.bincount(comp.ravel())[1:]]
    result = {"machine": machine_summary(), "size": a.size, "discs": a.objects, "band": a.band,
              "foreground_fraction": float((labels > 0).mean())}
    for with_probs in (False, True):
        times = []
        for _ in range(a.repeats):
            seconds, objects = trace(labels, a.band, with_probs)
            times.append(seconds)
        got = sorted((o.class_id, o.pixels) for o in objects)
        assert got == sorted(expected), "object count or areas differ from scipy.ndimage.label"
        assert all(o.polygon.is_valid and o.polygon.area == o.pixels for o in objects)
        result["probs" if with_probs else "labels_only"] = {"seconds": min(times), "objects": len(objects)}
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        n = write_geojson(Path(d) / "objects.geojson", objects, ["background", "a", "b"],
                          [(0, 0, 0), (255, 0, 0), (0, 255, 0)], mpp=0.5)
        result["geojson"] = {"seconds": time.perf_counter() - t, "features": n,
                             "megabytes": (Path(d) / "objects.geojson").stat().st_size / 1e6}
    tracemalloc.start()
    trace(labels, a.band, True)
    result["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    result["vertices"] = int(sum(len(o.polygon.exterior.coords) for o in objects))
    write_results(a.out, result, markdown)


def markdown(r: dict) -> str:
    m = r["machine"]
    return (
        f"Object tracing (serving/objects.py) of a {r['size']} x {r['size']} label image, {r['discs']} discs "
        f"of radius 25-35 px ({r['probs']['objects']} objects after overlaps merge, "
        f"{100 * r['foreground_fraction']:.1f} % foreground), bands of {r['band']} rows, "
        f"on {m['cpu']}, {m['cores']} cores, {m['vector_isa']}; best of repeats.\n\n"
        "| input | seconds | objects |\n|---|---:|---:|\n"
        f"| labels only | {r['labels_only']['seconds']:.2f} | {r['labels_only']['objects']} |\n"
        f"| labels + float32 probs (K=3) | {r['probs']['seconds']:.2f} | {r['probs']['objects']} |\n\n"
        f"write_geojson: {r['geojson']['features']} features, {r['geojson']['megabytes']:.1f} MB in "
        f"{r['geojson']['seconds']:.2f} s. Peak traced allocation while tracing with probs (tracemalloc, "
        f"band and probs included): {r['traced_peak_mb']:.0f} MB; {r['vertices']} exterior vertices. "
        "Objects and areas equal scipy.ndimage.label's.\n\n"
        "Command: `python benchmarks/object_tracing.py`\n"
    )


if __name__ == "__main__":
    main()
