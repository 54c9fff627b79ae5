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

The real sample (evaluate.real_sample) is also predicted as `flexunet predict` predicts it
(serving.batch into a temporary folder, with `--spacing evaluate.real_sample_spacing`) and
scored into metrics/real_sample_predict.json, with plots/real_sample_predict_panel.png and
the same numbers in the MLflow run (no prefix): the figures a user of `flexunet predict`
gets.
- kidney-t2w: `predict_real_kidney_dice` and its interval, scored as evaluate scores the
  Keras model (pipeline/scoring/real_sample.py), next to evaluate's `real_kidney_dice`;
- glomeruli: the whole 1024 px tiles, the model's only real-sample score
  (pipeline/scoring/real_tiles.py): `real_glomerulus_dice`, `real_object_precision`,
  `real_object_recall`, `real_object_f1`, each with its interval, and a row per tile; the
  register stage's champion rule reads it.
Not scored (evaluate.real_sample null): `{"available": false, "reason": ...}`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.pairs import find_pairs, mini_test_pairs
from pipeline.data.masks import ids_to_rgb, read_mask
from pipeline.layout import Layout
from pipeline.panels import make_panel, notice_panel
from pipeline.scoring import real_sample, real_tiles
from pipeline.scoring.confusion import confusion, dice_scores
from pipeline.scoring.auroc import UncertaintyAuroc
from pipeline.scoring.objects import ObjectScores
from pipeline.scoring.real_sample import KIDNEY_DICE
from pipeline.tracking import find_project_root, start_run
from common.atomic import remove_on_failure, write_json
from common.errors import FlexUNetError
from serving.batch import predict_folder
from serving.outputs import UNCERTAINTY_DIR
from common.imageio import read_image, resize_image, resize_labels, save_rgb_png
from serving.labels import to_labels
from serving.predictor import TiledPredictor
from serving.tiling import window_starts

if TYPE_CHECKING:
    from pipeline.config.schema import MaskParams

log = logging.getLogger(__name__)

REAL_PANEL_SIDE = 256   # panel rows at this size: 6 tiles at 1024 px would make a 20 MB picture


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
    real_json, real_panel = layout.real_sample_predict_file, layout.plots / "real_sample_predict_panel.png"
    outputs = [out_dir, layout.metrics / "tiled.json", layout.plots / "tiled_panel.png", real_json, real_panel]
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
        write_json(layout.metrics / "tiled.json", report)
        save_rgb_png(layout.plots / "tiled_panel.png",
                     make_panel(*map(list, zip(*panel_rows)), titles=("input", "truth", "tiled prediction")))
        real, panel = real_sample_by_predict(layout, predictor)
        write_json(real_json, real)
        save_rgb_png(real_panel, panel)
        _log_to_mlflow(layout, report, real)
    log.info("tiled mini_test: mean foreground Dice %.4f tiled vs %.4f resized (%d images)",
             report["tiled_mean_foreground_dice"] or 0, report["resized_mean_foreground_dice"] or 0, len(pairs))
    log.info("%s", _real_line(real))
    return report


def real_sample_by_predict(layout: Layout, predictor: TiledPredictor) -> tuple[dict[str, Any], np.ndarray]:
    """metrics/real_sample_predict.json's report and its panel: the real sample through
    `flexunet predict` (see the module docstring)."""
    p = layout.params
    kidney = p.dataset.name == "kidney-t2w"   # whole slices; glomeruli: whole tiles
    reason = (real_sample if kidney else real_tiles).not_scored(p)
    if reason is not None:
        return {"available": False, "reason": reason}, notice_panel(f"real sample not scored: {reason}")
    # `flexunet predict --spacing`: the real images' pixel size, which their files do not record;
    # the speck size is the card's (predict.min_object_px, training-resolution pixels), scaled to it
    settings = predictor.settings.replace(spacing=p.evaluate.real_sample_spacing, min_object_px=None)
    at_scale = TiledPredictor(predictor.session, predictor.card, settings, source=predictor.source)
    images = [pair.image for pair in find_pairs(real_sample.sample_folder(p, layout.root))]
    with tempfile.TemporaryDirectory(prefix="flexunet-real-") as tmp:
        predicted = _predict_real(at_scale, images, Path(tmp), p.mask)
        if kidney:
            scored, cases = real_sample.score_sample(p, layout.root, lambda path, _: predicted(path))
            keys = (KIDNEY_DICE, f"{KIDNEY_DICE}_ci_low", f"{KIDNEY_DICE}_ci_high")
            report = {"available": True, "real_slices": scored["real_slices"], "spacing": settings.spacing,
                      **{f"predict_{k}": scored[k] for k in keys}, "folder": scored["folder"]}
        else:
            report, cases = real_tiles.score_tiles(p, layout.root, predicted, min_object_px=at_scale.min_object_px)
    return report, _real_panel(cases, p.mask.colours)


def _predict_real(predictor: TiledPredictor, images: list[Path], out: Path, mask: MaskParams
                  ) -> Callable[[Path], np.ndarray]:
    """Masks of `images` written by serving.batch into `out`; returns their reader."""
    summary = predict_folder(predictor, images, out, overwrite=True)
    if summary.failed:
        raise FlexUNetError(f"flexunet predict failed on {summary.failed} real-sample image(s): {summary.errors[0]}")
    return lambda path: read_mask(out / f"{path.stem}.png", mask)


def _real_panel(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]], colours: list[tuple[int, int, int]]
                ) -> np.ndarray:
    """input | truth | prediction per real image, each row REAL_PANEL_SIDE px square."""
    side = REAL_PANEL_SIDE
    rows = [[resize_image(image, side, side)] + [ids_to_rgb(resize_labels(ids, side, side), colours)
                                                 for ids in (truth, labels)] for image, truth, labels in cases]
    return make_panel(*map(list, zip(*rows)), titles=("input", "truth", "flexunet predict"))


def _real_line(real: dict[str, Any]) -> str:
    if not real.get("available"):
        return f"real sample through flexunet predict: not scored ({real['reason']})"
    if real_tiles.GLOMERULUS_DICE in real:
        return f"{real_tiles.summary_line(real)} through flexunet predict"
    dice, low, high = (real[f"predict_{KIDNEY_DICE}{end}"] for end in ("", "_ci_low", "_ci_high"))
    return (f"real sample through flexunet predict ({real['real_slices']} slices): kidney Dice "
            + ("n/a" if dice is None else f"{dice:.2f} [{low:.2f}, {high:.2f}]"))


def _log_to_mlflow(layout: Layout, report: dict[str, Any], real: dict[str, Any]) -> None:
    run_id = layout.read_run()["run_id"]
    with start_run(layout.params.mlflow, find_project_root(layout.root), run_id=run_id) as run:
        run.log_numbers(report, prefix="mini_test_")
        run.log_artifact(layout.plots / "tiled_panel.png", "plots")
        run.log_artifact(layout.metrics / "tiled.json", "metrics")
        # real_sample_predict.json's names, unprefixed: evaluate logs its own real_* under other names
        run.log_numbers({k: v for k, v in real.items() if k.startswith(("real_", "predict_real_"))})
        run.log_artifact(layout.plots / "real_sample_predict_panel.png", "plots")
        run.log_artifact(layout.real_sample_predict_file, "metrics")
