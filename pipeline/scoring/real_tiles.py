"""Scores on the real glomeruli sample (data/real-sample/glomeruli-pas), with bootstrap intervals.

Six real 1024 px PAS tiles holding 9 glomeruli say whether a model trained on synthetic
tiles finds real glomeruli in real stain, at the scale `flexunet predict --spacing` puts
them. The tiles are predicted whole by `flexunet predict`'s code (the evaluate_tiled
stage, through serving.batch); this module scores the masks it wrote:

- `real_glomerulus_dice`: glomerulus (any foreground class) vs background, pixel counts
  summed over tiles, then divided (pipeline/scoring/confusion.py's rule);
- `real_object_precision` / `_recall` / `_f1`: glomeruli as objects, matched one-to-one
  at IoU >= 0.5 (pipeline/scoring/objects.py), predicted objects under min_object_px
  dropped as serving drops them; counts summed over tiles, then divided.

Each comes with a 95 % percentile bootstrap interval over tiles, as
pipeline/scoring/real_sample.py does for the kidney slices (same resamples, seed and
percentiles): a tile keeps its 2x2 confusion and object counts, so a resample is a sum of
rows. Six tiles are a development check: the interval shows how wide that leaves a score.

Pure NumPy (and SciPy's labelling): no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from common.errors import DataError
from common.imageio import read_image
from pipeline.data.masks import read_mask
from pipeline.data.pairs import find_pairs
from pipeline.scoring.confusion import confusion
from pipeline.scoring.objects import STRUCTURE, detection_scores
from pipeline.scoring.real_sample import (
    RESAMPLES, SEED, percentile_intervals, resample_draws, sample_folder, stacked_dice,
)

if TYPE_CHECKING:
    from pipeline.config.schema import Params

GLOMERULUS_DICE = "real_glomerulus_dice"   # the headline key of metrics/real_sample_predict.json (register reads it)
OBJECT_F1 = "real_object_f1"               # its object floor's key (evaluate.min_real_object_f1)
IOU = 0.5                                  # objects match at IoU >= this (pipeline/scoring/objects.py)

LabelsOf = Callable[[Path], np.ndarray]    # an image file -> the class ids predicted for it


def not_scored(params: Params) -> str | None:
    """Why the real glomeruli tiles are not scored for these params, or None when they are."""
    if params.evaluate.real_sample is None:
        return "evaluate.real_sample is null"
    if params.dataset.name != "glomeruli":
        return (f"{params.dataset.name}: the real sample is scored whole-slice "
                "(pipeline/scoring/real_sample.py), not as glomeruli tiles")
    return None


@dataclass(frozen=True)
class TileScore:
    stem: str
    confusion: np.ndarray   # (2, 2): true x predicted, background / glomerulus, pixels
    true: int               # glomeruli in the truth
    predicted: int          # predicted glomeruli of at least min_object_px
    matched: int            # pairs at IoU >= 0.5


def score_tile(stem: str, truth: np.ndarray, predicted: np.ndarray, min_object_px: int = 0) -> TileScore:
    """One tile's counts; truth and prediction are class ids, any foreground class a glomerulus."""
    t, p = (truth != 0).astype(np.uint8), (predicted != 0).astype(np.uint8)
    objects = detection_scores(t, p, class_id=1, iou=IOU, min_object_px=min_object_px)
    return TileScore(stem, confusion(t, p, 2), objects.true, objects.predicted, objects.matched)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den per element, NaN where den is 0 (a score with nothing to score)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _scores(matrices: np.ndarray, true: np.ndarray, predicted: np.ndarray, matched: np.ndarray
            ) -> dict[str, np.ndarray]:
    """The four scores of pooled counts; any leading axes (one per resample) are kept."""
    return {GLOMERULUS_DICE: stacked_dice(matrices, 1),
            "real_object_precision": _ratio(matched, predicted),
            "real_object_recall": _ratio(matched, true),
            OBJECT_F1: _ratio(2 * matched, true + predicted)}


def _columns(tiles: list[TileScore]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (np.stack([s.confusion for s in tiles]), np.array([s.true for s in tiles]),
            np.array([s.predicted for s in tiles]), np.array([s.matched for s in tiles]))


def point_scores(tiles: list[TileScore]) -> dict[str, float | None]:
    """The pooled scores of a set of tiles (no interval); None where undefined."""
    matrices, true, predicted, matched = _columns(tiles)
    pooled = _scores(matrices.sum(0), true.sum(), predicted.sum(), matched.sum())
    return {k: float(v) if np.isfinite(v) else None for k, v in pooled.items()}


def bootstrap_intervals(tiles: list[TileScore], resamples: int = RESAMPLES, seed: int = SEED
                        ) -> dict[str, float | None]:
    """`<key>_ci_low` / `<key>_ci_high` for every key of point_scores, over `resamples`
    resamples of the tiles with replacement (real_sample.py's draws and percentiles)."""
    matrices, true, predicted, matched = _columns(tiles)
    draws = resample_draws(len(tiles), resamples, seed)
    values = _scores(matrices[draws].sum(1), true[draws].sum(1), predicted[draws].sum(1), matched[draws].sum(1))
    return percentile_intervals(values)


def real_tiles_report(tiles: list[TileScore], *, spacing: float | None, min_object_px: int,
                      resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """metrics/real_sample_predict.json for glomeruli: pooled scores, intervals, one row per tile."""
    if not tiles:
        raise ValueError("no tiles to score")
    point, ci = point_scores(tiles), bootstrap_intervals(tiles, resamples, seed)
    out: dict[str, Any] = {"available": True, "real_tiles": len(tiles), "spacing": spacing}
    for key, value in point.items():
        out.update({key: value, f"{key}_ci_low": ci[f"{key}_ci_low"], f"{key}_ci_high": ci[f"{key}_ci_high"]})
    out.update({"real_objects_true": sum(s.true for s in tiles),
                "real_objects_predicted": sum(s.predicted for s in tiles),
                "real_objects_matched": sum(s.matched for s in tiles),
                "object_iou": IOU, "min_object_px": min_object_px, "bootstrap_resamples": resamples,
                "bootstrap_seed": seed, "interval": "95 % percentile bootstrap over tiles"})
    out["per_tile"] = [{"stem": s.stem, "glomerulus_dice": point_scores([s])[GLOMERULUS_DICE],
                        "objects_true": s.true, "objects_predicted": s.predicted, "objects_matched": s.matched}
                       for s in tiles]
    return out


def score_tiles(params: Params, root: Path, labels_of: LabelsOf, *, min_object_px: int
                ) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """The report for the predictions `labels_of` gives each tile of evaluate.real_sample,
    and the (image, truth, labels) of every tile, for panels."""
    tiles, cases = [], []
    for pair in find_pairs(sample_folder(params, root)):
        image = read_image(pair.image, params.model.image_channels)
        truth = read_mask(pair.mask, params.mask)
        if truth.shape != image.shape[:2]:
            raise DataError(f"{pair.mask}: {truth.shape[1]}x{truth.shape[0]} px, its image "
                            f"{image.shape[1]}x{image.shape[0]}; a mask must match its image")
        labels = labels_of(pair.image)
        tiles.append(score_tile(pair.image.stem, truth, labels, min_object_px))
        cases.append((image, truth, labels))
    report = real_tiles_report(tiles, spacing=params.evaluate.real_sample_spacing, min_object_px=min_object_px)
    return {**report, "folder": params.evaluate.real_sample}, cases


def summary_line(report: dict[str, Any]) -> str:
    """`real glomeruli (6 tiles, 0.5 um/px): glomerulus Dice 0.81 [0.74, 0.87], object F1 ...`."""
    def part(label: str, key: str) -> str:
        value, low, high = report.get(key), report.get(f"{key}_ci_low"), report.get(f"{key}_ci_high")
        if value is None:
            return f"{label} n/a"
        return f"{label} {value:.2f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else "")

    scale = "as stored" if report.get("spacing") is None else f"{report['spacing']:g} um/px"
    parts = [part("glomerulus Dice", GLOMERULUS_DICE), part("object precision", "real_object_precision"),
             part("recall", "real_object_recall"), part("F1", OBJECT_F1)]
    return f"real glomeruli ({report['real_tiles']} tiles, {scale}): " + ", ".join(parts)


def object_diameters(mask: np.ndarray) -> list[float]:
    """Equivalent diameters (px: the diameter of a disc of the same area) of the foreground
    objects of a class-id or boolean mask, 8-connected as the object scores count them."""
    labels, count = ndimage.label(np.asarray(mask) != 0, structure=STRUCTURE)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return [float(2 * np.sqrt(a / np.pi)) for a in areas]


def sample_diameters(folder: Path | str) -> list[float]:
    """The glomeruli's equivalent diameters over a sample's masks (masks/: black background,
    any other colour glomerulus), sorted: how the sample's pixel size was estimated
    (data/real-sample/glomeruli-pas/README.md, "Resolution")."""
    masks = [pair.mask for pair in find_pairs(Path(folder))]
    return sorted(d for path in masks for d in object_diameters(read_image(path, 3).any(axis=-1)))
