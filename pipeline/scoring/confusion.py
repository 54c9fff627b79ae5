"""Segmentation scores from confusion matrices: the one Dice rule of the project.

Counts are summed over a whole split (or a set of whole images) first and divided once,
so no score depends on the batch size or on how an image was tiled. A class that is
absent from both truth and prediction has no score (None), not 0 or 1: it did not take
part, and a mean over the classes that did is the honest summary.
"""

from __future__ import annotations

import numpy as np

from serving.labels import to_labels

SMOOTH = 1e-6  # the seed's soft-Dice smoothing (its dice_coef_multiclass); kept for that one metric


def confusion(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """confusion[t, p]: pixels of true class t predicted as p."""
    codes = truth.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(codes, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def dice_scores(matrix: np.ndarray, class_names: list[str], prefix: str = "") -> dict[str, float | None]:
    """Foreground Dice per class (`<prefix>dice_<name>`) and their mean (`<prefix>mean_foreground_dice`)."""
    out: dict[str, float | None] = {}
    for c in range(1, len(matrix)):
        tp = matrix[c, c]
        out[f"{prefix}dice_{class_names[c]}"] = _ratio(2 * tp, matrix[:, c].sum() + matrix[c, :].sum())
    out[f"{prefix}mean_foreground_dice"] = _mean(list(out.values()))
    return out


def overlap_metrics(matrix: np.ndarray, class_names: list[str]) -> dict[str, float | None]:
    """Dice (dice_scores' rule), IoU, precision and recall per foreground class, and pixel accuracy."""
    out = dice_scores(matrix, class_names)
    for c in range(1, len(matrix)):
        tp, predicted, true = matrix[c, c], matrix[:, c].sum(), matrix[c, :].sum()
        name = class_names[c]
        out[f"iou_{name}"] = _ratio(tp, predicted + true - tp)
        out[f"precision_{name}"] = _ratio(tp, predicted)
        out[f"recall_{name}"] = _ratio(tp, true)
    out["pixel_accuracy"] = _ratio(np.trace(matrix), matrix.sum())
    return out


class Accumulator:
    """Confusion matrix of the predicted labels plus soft-Dice sums, over many batches.

    Labels come from serving.labels.to_labels, the rule serving uses. With
    `single_foreground_class` the per-pixel argmax confusion is kept as well, so the
    report shows what the per-image class decision adds (`pixelwise_*` keys).
    """

    def __init__(self, num_classes: int, single_foreground_class: bool = False):
        self.n, self.single = num_classes, single_foreground_class
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.pixelwise = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.soft = np.zeros((3, num_classes), dtype=np.float64)  # sum t*p, sum t, sum p
        self.loss_sum, self.batches = 0.0, 0

    def update(self, onehot: np.ndarray, probs: np.ndarray, loss: float) -> np.ndarray:
        """Add one batch; return its predicted labels (the rule's) for per-image use."""
        truth = onehot.argmax(-1)
        labels = to_labels(probs, single_foreground_class=self.single)
        self.confusion += confusion(truth, labels, self.n)
        if self.single:
            self.pixelwise += confusion(truth, probs.argmax(-1), self.n)
        axes = tuple(range(probs.ndim - 1))
        self.soft += [(onehot * probs).sum(axes), onehot.sum(axes), probs.sum(axes)]
        self.loss_sum, self.batches = self.loss_sum + loss, self.batches + 1
        return labels

    def metrics(self, class_names: list[str]) -> dict[str, float | None]:
        inter, t_sum, p_sum = self.soft
        out: dict[str, float | None] = {
            "loss": self.loss_sum / max(self.batches, 1),
            "dice_coef_multiclass": float(np.mean((2 * inter + SMOOTH) / (t_sum + p_sum + SMOOTH))),
            **overlap_metrics(self.confusion, class_names),
        }
        if self.single:
            out.update(dice_scores(self.pixelwise, class_names, prefix="pixelwise_"))
        return out
