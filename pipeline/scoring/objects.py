"""Object-level scores: what a pixel Dice hides.

A pixel Dice of 0.9 can be one glomerulus missed among twenty or twenty found with ragged
borders; a kidney Dice of 0.95 can carry a dozen specks of false kidney in the liver,
which add a little to TKV and a lot to a reader's distrust. Two views, chosen by
`evaluate.object_metrics`:

- detection (glomeruli): connected components of truth and prediction, one class at a
  time, matched one-to-one at IoU >= 0.5; counts, precision / recall / F1 of objects, and
  the Dice and relative area error of the matched pairs;
- components (kidney slices, two kidneys each): predicted foreground components beyond
  the two largest of a slice ("strays"), which no kidney can be.

Components are 8-connected, for truth and prediction alike: a predicted border is a
staircase of argmax decisions, and a 1-px diagonal bridge of it should not split one
object in two (4-connectivity would turn every such bridge into an extra object, a false
positive or a stray that is an artefact of the rule, not of the model). The price is that
two objects touching only at a corner count as one.

Counts are summed over images and divided once, and a score with nothing to score is
None, not 0 or 1 (the rule of pipeline/scoring/confusion.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from serving.objects import CONNECTIVITY, is_object

STRUCTURE = ndimage.generate_binary_structure(2, 2 if CONNECTIVITY == 8 else 1)


def _components(mask: np.ndarray, min_pixels: int = 0) -> tuple[np.ndarray, int]:
    """Connected components (serving.objects' connectivity), without those under min_pixels."""
    labels, count = ndimage.label(mask, structure=STRUCTURE)
    if min_pixels > 1 and count:
        area = np.bincount(labels.ravel(), minlength=count + 1)
        keep = is_object(area, min_pixels)
        keep[0] = False
        labels, count = ndimage.label(keep[labels], structure=STRUCTURE)
    return labels, int(count)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


@dataclass
class ObjectCounts:
    """Object counts and sums over matched pairs; `+=` adds another image's."""

    true: int = 0
    predicted: int = 0
    matched: int = 0
    dice_sum: float = 0.0
    area_error_sum: float = 0.0       # sum of (pred - true) / true over matched pairs
    abs_area_error_sum: float = 0.0

    def __iadd__(self, other: ObjectCounts) -> ObjectCounts:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def metrics(self) -> dict[str, int | float | None]:
        """Precision is None without predicted objects, recall without true ones; F1
        (2 matched / (true + predicted), the Dice of object sets) only without either."""
        return {
            "objects_true": self.true,
            "objects_predicted": self.predicted,
            "objects_matched": self.matched,
            "object_precision": _ratio(self.matched, self.predicted),
            "object_recall": _ratio(self.matched, self.true),
            "object_f1": _ratio(2 * self.matched, self.true + self.predicted),
            "object_dice_mean": _ratio(self.dice_sum, self.matched),
            "object_area_error_mean": _ratio(self.area_error_sum, self.matched),
            "object_abs_area_error_mean": _ratio(self.abs_area_error_sum, self.matched),
        }


def _match(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Row/column pairs of a one-to-one matching among the pairs with iou >= threshold.

    At a threshold >= 0.5 each object has at most one candidate, so the candidates are
    the matching. Even at exactly 0.5: two candidates of one object would have to be its
    two halves (each IoU 0.5 only if it lies inside the object and covers half of it),
    and two halves of a connected object touch, so they would be one component. Below
    0.5 an object can have several; then linear_sum_assignment picks the most matches
    and, among those, the largest summed IoU: a weight of (n + 1) + IoU per candidate
    makes one more match worth more than any IoU gain, n being the most matches possible.
    """
    eligible = iou >= threshold
    rows, cols = np.nonzero(eligible)
    if len(np.unique(rows)) == len(rows) and len(np.unique(cols)) == len(cols):
        return list(zip(rows.tolist(), cols.tolist()))
    weight = np.where(eligible, min(iou.shape) + 1 + iou, 0.0)
    r, c = linear_sum_assignment(weight, maximize=True)
    return [(i, j) for i, j in zip(r.tolist(), c.tolist()) if eligible[i, j]]


def detection_scores(truth: np.ndarray, pred: np.ndarray, class_id: int = 1, iou: float = 0.5,
                     min_object_px: int = 0) -> ObjectCounts:
    """Objects of one class in one image (2-D class-id masks of the same shape); predicted
    objects under min_object_px pixels are specks (serving.objects.is_object), as in the
    GeoJSON a user gets. True objects are all counted."""
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    if not 0 < iou <= 1:
        raise ValueError(f"iou threshold must be in (0, 1], got {iou}")
    t_labels, n_true = _components(truth == class_id)
    p_labels, n_pred = _components(pred == class_id, min_object_px)
    counts = ObjectCounts(true=n_true, predicted=n_pred)
    if not (n_true and n_pred):
        return counts
    t_area = np.bincount(t_labels.ravel(), minlength=n_true + 1)[1:]
    p_area = np.bincount(p_labels.ravel(), minlength=n_pred + 1)[1:]
    both = (t_labels > 0) & (p_labels > 0)
    # Only overlapping pairs: a dense n_true x n_pred table of a noisy whole-slide mask
    # with thousands of specks would not fit in memory.
    codes, inter = np.unique(t_labels[both].astype(np.int64) * (n_pred + 1) + p_labels[both], return_counts=True)
    ti, pi = codes // (n_pred + 1) - 1, codes % (n_pred + 1) - 1
    union = t_area[ti] + p_area[pi] - inter
    pair_iou = inter / union
    keep = pair_iou >= iou
    ti, pi, inter, pair_iou = ti[keep], pi[keep], inter[keep], pair_iou[keep]
    if not len(ti):
        return counts
    t_ids, t_idx = np.unique(ti, return_inverse=True)
    p_ids, p_idx = np.unique(pi, return_inverse=True)
    table = np.zeros((len(t_ids), len(p_ids)))   # IoU of the candidates, 0 elsewhere
    table[t_idx, p_idx] = pair_iou
    overlap = np.zeros_like(table)
    overlap[t_idx, p_idx] = inter
    for r, c in _match(table, iou):
        a_true, a_pred = t_area[t_ids[r]], p_area[p_ids[c]]
        error = (a_pred - a_true) / a_true
        counts.matched += 1
        counts.dice_sum += 2 * overlap[r, c] / (a_true + a_pred)
        counts.area_error_sum += error
        counts.abs_area_error_sum += abs(error)
    return counts


def _strays(pred: np.ndarray, keep: int) -> tuple[int, int]:
    """(components, pixels) of the foreground beyond the `keep` largest components."""
    labels, count = _components(pred != 0)
    if count <= keep:
        return 0, 0
    areas = np.sort(np.bincount(labels.ravel())[1:])
    return count - keep, int(areas[:-keep].sum()) if keep else int(areas.sum())


def component_sanity(pred: np.ndarray, keep: int = 2) -> int:
    """Predicted foreground components (any class != 0) of one slice beyond its `keep`
    largest: a kidney slice holds at most two kidneys, so anything more is false."""
    return _strays(pred, keep)[0]


@dataclass
class ComponentCounts:
    """Strays summed over slices; `add` one predicted slice at a time."""

    keep: int = 2
    slices: int = 0
    stray_components: int = 0
    slices_with_stray_components: int = 0
    stray_pixels: int = 0

    def add(self, pred: np.ndarray) -> None:
        components, pixels = _strays(pred, self.keep)
        self.slices += 1
        self.stray_components += components
        self.slices_with_stray_components += components > 0
        self.stray_pixels += pixels

    def metrics(self) -> dict[str, int | float | None]:
        return {
            "stray_components": self.stray_components,
            "stray_components_per_slice": _ratio(self.stray_components, self.slices),
            "slices_with_stray_components": self.slices_with_stray_components,
            "stray_pixels": self.stray_pixels,
        }


class ObjectScores:
    """The object view `evaluate.object_metrics` asks for, over many images.

    detection: every foreground class on its own (an object is found only by one of its
    class), summed into one set of counts; components: strays of the predicted slices
    (the truth is not needed); none: no keys.
    """

    def __init__(self, mode: str, num_classes: int, min_object_px: int = 0):
        if mode not in ("detection", "components", "none"):
            raise ValueError(f"object metrics mode must be detection, components or none, got {mode!r}")
        self.mode, self.num_classes, self.min_object_px = mode, num_classes, min_object_px
        self.detection = ObjectCounts()
        self.components = ComponentCounts()

    def add(self, truth: np.ndarray, pred: np.ndarray) -> None:
        """One image (H, W) or a batch (N, H, W) of class ids."""
        if truth.ndim == 3:
            for t, p in zip(truth, pred):
                self.add(t, p)
            return
        if self.mode == "detection":
            for class_id in range(1, self.num_classes):
                self.detection += detection_scores(truth, pred, class_id, min_object_px=self.min_object_px)
        elif self.mode == "components":
            self.components.add(pred)

    def metrics(self) -> dict[str, int | float | None]:
        if self.mode == "detection":
            return self.detection.metrics()
        if self.mode == "components":
            return self.components.metrics()
        return {}
