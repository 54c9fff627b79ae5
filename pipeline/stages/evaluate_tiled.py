"""evaluate_tiled stage: the exported ONNX model over the whole mini_test images, tiled.

Writes what a user's batch prediction writes (`outputs/tiled_predictions/`: palette masks,
overlays, predictions.csv) through the same `serving.batch` code, then scores it against
the true masks, next to the seed's plain inference (whole image resized to the model
size, predicted once, labels resized back):

- `tiled_*` / `resized_*`: per-class and mean foreground Dice of both;
- `seam_*` / `interior_*`: Dice inside strips of `predict.seam_width` px either side of
  every inner window border vs everywhere else, so a blending problem shows up as a gap;
- `tiles` / `skipped_tiles`: windows run over all images, and those skipped as background
  (`predict.tissue_threshold`);
- `tiled_object*` / `tiled_stray_*`: the object scores of `evaluate.object_metrics` on
  the whole tiled masks, where an object cut by a window border is still one object (the
  evaluate stage's glomeruli test split is tiles, whose borders cut objects);
- `tiled_uncertainty_auroc`: how well the 8-bit uncertainty maps the prediction wrote
  (uncertainty/<stem>.png) single out the wrong pixels of the tiled masks.
Images no larger than a tile have no seams; their seam metrics are absent (null).

kidney-t2w: the real sample (evaluate.real_sample) is also predicted by `flexunet predict`
(serving.batch, into a temporary folder) and scored as evaluate scores it:
`predict_real_kidney_dice` and its interval, the figure a user of `flexunet predict` gets,
next to evaluate's `real_kidney_dice` from the Keras model.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.pairs import find_pairs, mini_test_pairs
from pipeline.data.masks import ids_to_rgb, read_mask
from pipeline.layout import Layout
from pipeline.panels import make_panel
from pipeline.scoring.confusion import confusion, dice_scores
from pipeline.scoring.auroc import UncertaintyAuroc
from pipeline.scoring.objects import ObjectScores
from pipeline.scoring.real_sample import KIDNEY_DICE, not_scored, score_sample
from pipeline.tracking import find_project_root, start_run
from common.atomic import remove_on_failure, write_json
from common.errors import FlexUNetError
from serving.batch import predict_folder
from serving.outputs import UNCERTAINTY_DIR
from common.imageio import read_image, resize_image, resize_labels, save_rgb_png
from serving.labels import to_labels
from serving.predictor import TiledPredictor
from serving.tiling import window_starts

log = logging.getLogger(__name__)


def seam_mask(height: int, width: int, tile: int, overlap: float, half_width: int) -> np.ndarray:
    """True within `half_width` px of an inner window border (where one window ends or
    the next begins), the pixels whose probabilities come from a blend of windows."""
    mask = np.zeros((height, width), dtype=bool)
    for axis, length in ((0, height), (1, width)):
        starts = window_starts(length, tile, overlap) if length > tile else [0]
        borders = {b for s in starts for b in (s, s + tile) if 0 < b < length}
        for b in borders:
            sl = slice(max(0, b - half_width), min(length, b + half_width))
            if axis == 0:
                mask[sl, :] = True
            else:
                mask[:, sl] = True
    return mask


def resized_prediction(predictor: TiledPredictor, image: np.ndarray, size: int) -> np.ndarray:
    """The seed's plain inference: resize to the model size, one forward pass, labels back."""
    h, w = image.shape[:2]
    small = resize_image(image, size, size).astype(np.float32)
    ids = to_labels(predictor.predict_fn(small[None])[0],
                    single_foreground_class=predictor.card.single_foreground_class)
    return resize_labels(ids, w, h)


def evaluate_tiled(layout: Layout) -> dict[str, Any]:
    p, q = layout.params, layout.params.predict
    predictor = TiledPredictor.from_onnx(layout.onnx_file, q.tiling())
    pairs = mini_test_pairs(layout.data_dir, fallback=p.dataset.num_mini_test)   # no mini_test: test images
    out_dir = layout.tiled_predictions
    outputs = [out_dir, layout.metrics / "tiled.json", layout.plots / "tiled_panel.png"]
    n, names, tile = p.model.num_classes, p.mask.class_names, predictor.tile_size
    with remove_on_failure(outputs):
        summary = predict_folder(predictor, [pair.image for pair in pairs], out_dir, overwrite=True, overlay=True)
        conf = {k: np.zeros((n, n), np.int64) for k in ("tiled", "resized", "seam", "interior")}
        objects, uncertainty = ObjectScores(p.evaluate.object_metrics, n, predictor.min_object_px), UncertaintyAuroc()
        panel_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for pair in pairs:
            image = read_image(pair.image, p.model.image_channels)
            truth = read_mask(pair.mask, p.mask)
            tiled = read_mask(out_dir / f"{pair.image.stem}.png", p.mask)
            conf["tiled"] += confusion(truth, tiled, n)
            objects.add(truth, tiled)
            # the 8-bit map `flexunet predict` wrote beside the mask: what a reviewer sorts by
            stored = read_image(out_dir / UNCERTAINTY_DIR / f"{pair.image.stem}.png", 1)[..., 0]
            uncertainty.add(stored / 255.0, tiled != truth)
            conf["resized"] += confusion(truth, resized_prediction(predictor, image, p.model.image_width), n)
            seams = seam_mask(*truth.shape, tile, q.overlap, q.seam_width)
            if seams.any():
                conf["seam"] += confusion(truth[seams], tiled[seams], n)
                conf["interior"] += confusion(truth[~seams], tiled[~seams], n)
            if len(panel_rows) < p.evaluate.num_panels:
                colours = p.mask.colours
                panel_rows.append((image, ids_to_rgb(truth, colours), ids_to_rgb(tiled, colours)))
        report: dict[str, Any] = {"images": len(pairs), "tile_size": tile, "overlap": q.overlap, "blend": q.blend,
                                  "tta": q.tta, "tissue_threshold": q.tissue_threshold, "failed": summary.failed,
                                  "tiles": summary.tiles, "skipped_tiles": summary.skipped_tiles,
                                  "megapixels_per_second": round(summary.mp_per_s, 4),
                                  "object_metrics": p.evaluate.object_metrics,
                                  **{f"tiled_{k}": v for k, v in objects.metrics().items()},
                                  **{f"tiled_{k}": v for k, v in uncertainty.metrics().items()}}
        for key, matrix in conf.items():
            report.update(dice_scores(matrix, names, f"{key}_") if matrix.sum() else
                          {f"{key}_mean_foreground_dice": None})
        if report["seam_mean_foreground_dice"] is not None and report["interior_mean_foreground_dice"] is not None:
            report["seam_cost"] = report["interior_mean_foreground_dice"] - report["seam_mean_foreground_dice"]
        report.update(_real_sample_by_predict(layout, predictor))
        write_json(layout.metrics / "tiled.json", report)
        save_rgb_png(layout.plots / "tiled_panel.png",
                     make_panel(*map(list, zip(*panel_rows)), titles=("input", "truth", "tiled prediction")))
        _log_to_mlflow(layout, report)
    log.info("tiled mini_test: mean foreground Dice %.4f tiled vs %.4f resized (%d images)",
             report["tiled_mean_foreground_dice"] or 0, report["resized_mean_foreground_dice"] or 0, len(pairs))
    return report


def _real_sample_by_predict(layout: Layout, predictor: TiledPredictor) -> dict[str, Any]:
    """The real sample's kidney Dice of `flexunet predict`'s masks (empty when not scored)."""
    p = layout.params
    if not_scored(p) is not None:
        return {}
    images = [pair.image for pair in find_pairs(layout.root / str(p.evaluate.real_sample))]
    with tempfile.TemporaryDirectory(prefix="flexunet-real-") as tmp:
        summary = predict_folder(predictor, images, Path(tmp), overwrite=True)
        if summary.failed:
            raise FlexUNetError(f"flexunet predict failed on {summary.failed} real-sample slice(s): {summary.errors[0]}")
        report, _ = score_sample(p, layout.root, lambda path, _: read_mask(Path(tmp) / f"{path.stem}.png", p.mask))
    return {f"predict_{k}": report[k] for k in (KIDNEY_DICE, f"{KIDNEY_DICE}_ci_low", f"{KIDNEY_DICE}_ci_high")}


def _log_to_mlflow(layout: Layout, report: dict[str, Any]) -> None:
    run_id = layout.read_run()["run_id"]
    with start_run(layout.params.mlflow, find_project_root(layout.root), run_id=run_id) as run:
        run.log_numbers(report, prefix="mini_test_")
        run.log_artifact(layout.plots / "tiled_panel.png", "plots")
        run.log_artifact(layout.metrics / "tiled.json", "metrics")

