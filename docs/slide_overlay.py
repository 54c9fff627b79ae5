"""Render docs/slide_geojson.png: the QuPath GeoJSON of `flexunet predict` drawn over its slide.

Synthesises a small whole slide (`flexunet synthesize --whole-slide`, with its truth mask),
predicts it with `flexunet predict` (OME-Zarr + GeoJSON outputs, the model card's glass
skip), and draws the GeoJSON polygons exactly as QuPath would place them (level-0 pixel
coordinates, the class colour from properties.classification) over the slide: the whole
slide on the left, one island at full resolution on the right with the true glomerulus
outlines for comparison and the skipped glass windows shaded.

    python docs/slide_overlay.py [--model models/model.onnx] [--size 4096] [--out docs/slide_geojson.png]

The model must be a glomeruli model (`flexunet preset glomeruli-cpu && make repro`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "model.onnx"))
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "docs" / "slide_geojson.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import tifffile
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath
    from scipy import ndimage

    import zarr

    from pipeline.scoring.objects import detection_scores
    from serving.load import load_predictor
    from serving.slide import open_slide

    with tempfile.TemporaryDirectory(prefix="slide-overlay-") as tmp:
        work = Path(tmp)
        slide, truth_path, out = work / "slide.ome.tif", work / "truth.tif", work / "out"
        cli = [sys.executable, "-m", "pipeline.cli"]
        subprocess.run([*cli, "synthesize", "--whole-slide", str(slide), "--size", str(args.size),
                        "--seed", str(args.seed), "--mask", str(truth_path)], check=True)
        subprocess.run([*cli, "predict", "--model", args.model, "--input", str(slide), "--output", str(out)],
                       check=True)
        features = json.loads((out / "slide.geojson").read_text())["features"]
        with open_slide(slide) as s:
            image = np.asarray(s.read(0))
        truth = tifffile.imread(truth_path) > 0
        pred = zarr.open_group(str(out / "slide.ome.zarr"), mode="r")["labels/segmentation/0"][:]
        card_min = load_predictor(args.model).min_object_px
        scores = detection_scores(truth.astype(np.uint8), pred, 1, min_object_px=card_min).metrics()
        with (out / "predictions.csv").open() as fh:
            header, row = [line.rstrip("\n").split(",") for line in fh][:2]
        stats = dict(zip(header, row))

    def patch(geometry: dict, colour: tuple[float, ...], lw: float) -> PathPatch:
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        verts, codes = [], []
        for polygon in polygons:
            for ring in polygon:
                verts += ring
                codes += [MplPath.MOVETO] + [MplPath.LINETO] * (len(ring) - 2) + [MplPath.CLOSEPOLY]
        return PathPatch(MplPath(verts, codes), facecolor=(*colour[:3], 0.25), edgecolor=colour, lw=lw)

    # The island with the most predicted objects, framed at full resolution.
    centres = np.array([np.mean(f["geometry"]["coordinates"][0] if f["geometry"]["type"] == "Polygon"
                                else f["geometry"]["coordinates"][0][0], axis=0) for f in features]) \
        if features else np.array([[args.size / 2, args.size / 2]])
    half = 320
    counts = [np.sum(np.all(np.abs(centres - c) < half, axis=1)) for c in centres]
    cx, cy = centres[int(np.argmax(counts))]
    x0, y0 = int(np.clip(cx - half, 0, args.size - 2 * half)), int(np.clip(cy - half, 0, args.size - 2 * half))

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 7.6), dpi=110)
    left.imshow(image, interpolation="lanczos")
    right.imshow(image[y0: y0 + 2 * half, x0: x0 + 2 * half], extent=(x0, x0 + 2 * half, y0 + 2 * half, y0),
                 interpolation="nearest")
    for f in features:
        colour = tuple(v / 255 for v in f["properties"]["classification"]["color"])
        left.add_patch(patch(f["geometry"], colour, 0.8))
        right.add_patch(patch(f["geometry"], colour, 1.4))
    crop = truth[y0: y0 + 2 * half, x0: x0 + 2 * half].astype(np.float32)
    right.contour(np.arange(x0, x0 + 2 * half) + 0.5, np.arange(y0, y0 + 2 * half) + 0.5, crop, levels=[0.5],
                  colors="cyan", linewidths=1.6, linestyles="--")
    true_objects = int(ndimage.label(truth, structure=np.ones((3, 3)))[1])
    left.add_patch(plt.Rectangle((x0, y0), 2 * half, 2 * half, fill=False, ec="black", lw=1.2, ls="--"))
    left.set_title(f"{args.size} x {args.size} px synthetic PAS slide, {stats['skipped_tiles']} of {stats['tiles']} "
                   f"windows skipped as glass\n{len(features)} GeoJSON objects, {true_objects} true glomeruli; "
                   f"object F1 {scores['object_f1']:.2f} at IoU >= 0.5 (precision {scores['object_precision']:.2f}, "
                   f"recall {scores['object_recall']:.2f})", fontsize=10)
    right.set_title("full resolution: predicted polygons (red, traced along pixel edges),\n"
                    "true outline (cyan, dashed)", fontsize=10)
    right.set_xlim(x0, x0 + 2 * half)
    right.set_ylim(y0 + 2 * half, y0)
    for ax in (left, right):
        ax.set_xlabel("level-0 x (px)")
        ax.set_ylabel("level-0 y (px)")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}: {len(features)} objects")


if __name__ == "__main__":
    main()
