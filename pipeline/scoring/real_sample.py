"""Scores on the real development sample (data/real-sample/kidney-t2w), with bootstrap intervals.

The synthetic test split says how well a model learnt the generator; these 8 real slices
say whether it segments real anatomy and contrast at all. Eight slices make a point
estimate that moves a lot with one slice, so every score comes with a 95 % bootstrap
interval over slices: resample the slices with replacement, recompute the pooled score,
take the 2.5 / 97.5 percentiles. The interval shows how little 8 slices can tell apart.

Each slice is predicted as `flexunet predict` predicts it (serving.preparation): the
whole slice padded to a square and resampled to the model size, one forward pass, the
probabilities resampled back onto the slice, labels by serving.labels (one diagnosis per
slice). Scores are pooled over slices (pixel counts summed, then
divided: pipeline/scoring/confusion.py's rule):
- `real_kidney_dice`: kidney (any foreground class) vs background;
- `real_dice_<class>`: per foreground class (CKD, healthy);
- `real_class_accuracy`: per slice, whether the predicted kidney's class is the slice's
  true class (a slice with no predicted kidney is wrong); slices without a true kidney
  take no part.
TF-free: the forward pass is a function the caller passes in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import DataError
from common.imageio import read_image
from pipeline.data.masks import SnapCount, blend_tolerant, read_mask
from pipeline.data.pairs import find_pairs

from pipeline.scoring.confusion import confusion, dice_scores
from serving.labels import to_labels
from serving.preparation import whole_slice_probs

# 2000 resamples put the percentile of a 95 % interval within about +/-0.005 of its limit
# for Dice-like scores; seeded, so a rerun writes the same interval.
RESAMPLES = 2000
SEED = 137
PERCENTILES = (2.5, 97.5)
KIDNEY = "kidney"
KIDNEY_DICE = "real_kidney_dice"   # the headline key of metrics/real_sample.json (register reads it)

Predict = Callable[[np.ndarray], np.ndarray]   # (1, h, w, C) float32 -> (1, h, w, K) probabilities
LabelsOf = Callable[[Path, np.ndarray], np.ndarray]   # (image file, its pixels) -> predicted class ids

if TYPE_CHECKING:
    from pipeline.config.schema import Params


def not_scored(params: Params) -> str | None:
    """Why the real sample is not scored for these params, or None when it is."""
    if params.evaluate.real_sample is None:
        return "evaluate.real_sample is null"
    if params.dataset.name == "glomeruli":
        return ("glomeruli tiles are scored whole, through `flexunet predict`, by evaluate_tiled "
                "(pipeline/scoring/real_tiles.py: metrics/real_sample_predict.json)")
    if params.dataset.name != "kidney-t2w":
        return f"the real sample is kidney-t2w; this dataset is {params.dataset.name}"
    return None


def score_sample(params: Params, root: Path, labels_of: LabelsOf
                 ) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """metrics/real_sample.json's report for the predictions `labels_of` gives each slice of
    evaluate.real_sample, and the (image, truth, labels) of every slice, for panels."""
    folder = sample_folder(params, root)
    rules, count = blend_tolerant(params.mask), SnapCount()   # its masks were resized after colouring
    scores, cases = [], []
    for pair in find_pairs(folder):
        image = read_image(pair.image, params.model.image_channels)
        truth = read_mask(pair.mask, rules, count)
        if truth.shape != image.shape[:2]:
            raise DataError(f"{pair.mask}: {truth.shape[1]}x{truth.shape[0]} px, its image "
                            f"{image.shape[1]}x{image.shape[0]}; a mask must match its image")
        labels = labels_of(pair.image, image)
        scores.append(score_slice(pair.image.stem, truth, labels, params.model.num_classes))
        cases.append((image, truth, labels))
    report = real_sample_report(scores, params.mask.class_names, snapped_pixels=count.snapped, mask_pixels=count.pixels)
    return {**report, "folder": params.evaluate.real_sample}, cases


def sample_folder(params: Params, root: Path) -> Path:
    """evaluate.real_sample's folder under `root`, or a DataError saying how to restore it."""
    folder = root / str(params.evaluate.real_sample)
    if not (folder / "images").is_dir():
        raise DataError(f"{folder}: real sample missing (evaluate.real_sample); restore it "
                        f"(git checkout -- {params.evaluate.real_sample}) or set evaluate.real_sample: null")
    return folder


def whole_slice_labels(predict: Predict, image: np.ndarray, size: int, single_foreground_class: bool) -> np.ndarray:
    """Class ids on the slice's grid, as `flexunet predict` labels it with a whole-slice model."""
    probs = whole_slice_probs(lambda x: np.asarray(predict(x)), image, size)
    return to_labels(probs, single_foreground_class=single_foreground_class)


def slice_class(ids: np.ndarray, num_classes: int) -> int | None:
    """The foreground class holding most of the slice's foreground pixels, None without any."""
    counts = np.bincount(ids.ravel(), minlength=num_classes)[1:]
    return int(counts.argmax()) + 1 if counts.any() else None


@dataclass(frozen=True)
class SliceScore:
    stem: str
    confusion: np.ndarray          # (K, K): true class x predicted class, pixels
    true_class: int | None
    predicted_class: int | None

    @property
    def class_correct(self) -> bool:
        return self.predicted_class is not None and self.predicted_class == self.true_class


def score_slice(stem: str, truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> SliceScore:
    return SliceScore(stem, confusion(truth, predicted, num_classes), slice_class(truth, num_classes),
                      slice_class(predicted, num_classes))


def _kidney_matrix(matrices: np.ndarray) -> np.ndarray:
    """(..., K, K) -> (..., 2, 2): background vs any foreground class."""
    bb = matrices[..., 0, 0]
    bk = matrices[..., 0, 1:].sum(-1)
    kb = matrices[..., 1:, 0].sum(-1)
    kk = matrices[..., 1:, 1:].sum((-1, -2))
    return np.stack([np.stack([bb, bk], -1), np.stack([kb, kk], -1)], -2)


def stacked_dice(matrices: np.ndarray, c: int) -> np.ndarray:
    """Dice of class c for each (K, K) matrix of a stack; NaN where the class is absent
    from truth and prediction (confusion.py's None)."""
    tp = matrices[..., c, c].astype(np.float64)
    den = matrices[..., :, c].sum(-1) + matrices[..., c, :].sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.maximum(den, 1), np.nan)


def point_scores(scores: list[SliceScore], class_names: list[str]) -> dict[str, float | None]:
    """The pooled scores of a set of slices (no interval)."""
    total = sum((s.confusion for s in scores), np.zeros_like(scores[0].confusion))
    out: dict[str, float | None] = {
        KIDNEY_DICE: dice_scores(_kidney_matrix(total), ["background", KIDNEY])[f"dice_{KIDNEY}"]}
    out.update({k: v for k, v in dice_scores(total, class_names, prefix="real_").items()
                if k != "real_mean_foreground_dice"})
    judged = [s.class_correct for s in scores if s.true_class is not None]
    out["real_class_accuracy"] = float(np.mean(judged)) if judged else None
    return out


def bootstrap_intervals(scores: list[SliceScore], class_names: list[str], resamples: int = RESAMPLES,
                        seed: int = SEED) -> dict[str, float | None]:
    """`<key>_ci_low` / `<key>_ci_high` for every key of point_scores: percentiles of the
    score over `resamples` resamples of the slices with replacement. A resample where a
    score is undefined (its class drawn nowhere) is left out of that score's percentiles."""
    matrices = np.stack([s.confusion for s in scores])
    draws = resample_draws(len(scores), resamples, seed)
    pooled = matrices[draws].sum(axis=1)                                   # (resamples, K, K)
    values = {KIDNEY_DICE: stacked_dice(_kidney_matrix(pooled), 1)}
    for c in range(1, len(class_names)):
        values[f"real_dice_{class_names[c]}"] = stacked_dice(pooled, c)
    judged = np.array([s.true_class is not None for s in scores])
    correct = np.array([s.class_correct for s in scores], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        values["real_class_accuracy"] = np.where(judged[draws].sum(1) > 0, (correct * judged)[draws].sum(1)
                                                 / np.maximum(judged[draws].sum(1), 1), np.nan)
    return percentile_intervals(values)


def resample_draws(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) indices: each row one resample of n items with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_intervals(values: dict[str, np.ndarray]) -> dict[str, float | None]:
    """`<key>_ci_low` / `<key>_ci_high`: the PERCENTILES of each key's resampled scores,
    NaN (undefined in that resample) left out; None when no resample defines it."""
    out: dict[str, float | None] = {}
    for key, v in values.items():
        defined = v[np.isfinite(v)]
        low, high = np.percentile(defined, PERCENTILES) if defined.size else (None, None)
        out[f"{key}_ci_low"] = None if low is None else float(low)
        out[f"{key}_ci_high"] = None if high is None else float(high)
    return out


def real_sample_report(scores: list[SliceScore], class_names: list[str], *, snapped_pixels: int, mask_pixels: int,
                       resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """metrics/real_sample.json: pooled scores, their intervals, and one row per slice."""
    if not scores:
        raise ValueError("no slices to score")
    point, ci = point_scores(scores, class_names), bootstrap_intervals(scores, class_names, resamples, seed)
    per_slice = []
    for s in scores:
        kidney = dice_scores(_kidney_matrix(s.confusion), ["background", KIDNEY])[f"dice_{KIDNEY}"]
        per_slice.append({"stem": s.stem, "true_class": _name(s.true_class, class_names),
                          "predicted_class": _name(s.predicted_class, class_names),
                          "kidney_dice": kidney, "true_kidney_px": int(s.confusion[1:, :].sum()),
                          "predicted_kidney_px": int(s.confusion[:, 1:].sum())})
    ordered: dict[str, Any] = {"available": True, "real_slices": len(scores)}
    for key, value in point.items():
        ordered.update({key: value, f"{key}_ci_low": ci[f"{key}_ci_low"], f"{key}_ci_high": ci[f"{key}_ci_high"]})
    return {**ordered, "real_snapped_pixels": snapped_pixels, "real_mask_pixels": mask_pixels,
            "bootstrap_resamples": resamples, "bootstrap_seed": seed, "interval": "95 % percentile bootstrap over slices",
            "per_slice": per_slice}


def _name(class_id: int | None, class_names: list[str]) -> str | None:
    return None if class_id is None else class_names[class_id]


def summary_line(report: dict[str, Any], class_names: list[str]) -> str:
    """`real sample (8 slices): kidney Dice 0.81 [0.74, 0.87], CKD ..., class accuracy ...`."""
    def part(label: str, key: str) -> str:
        value, low, high = report.get(key), report.get(f"{key}_ci_low"), report.get(f"{key}_ci_high")
        if value is None:
            return f"{label} n/a"
        interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
        return f"{label} {value:.2f}{interval}"

    parts = [part("kidney Dice", KIDNEY_DICE)]
    parts += [part(f"{name} Dice", f"real_dice_{name}") for name in class_names[1:]]
    parts.append(part("class accuracy", "real_class_accuracy"))
    return f"real sample ({report['real_slices']} slices): " + ", ".join(parts)
