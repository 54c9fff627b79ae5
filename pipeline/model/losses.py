"""Losses and metrics for one-hot masks and softmax outputs.

`dice_coef_multiclass` is the seed's headline number (soft Dice averaged over all
classes, background included) and is kept for comparability with the seed's reports.
Per-class Dice/IoU exclude background and use hard (argmax) predictions accumulated
over the whole epoch, which is what a reader of "Dice of the CKD class" expects.
"""

from __future__ import annotations

import keras
from keras import ops

from pipeline.scoring.confusion import SMOOTH


@keras.saving.register_keras_serializable(package="flexunet")
def dice_coef_multiclass(y_true, y_pred):
    axes = tuple(range(len(y_pred.shape) - 1))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return ops.mean((2.0 * intersection + SMOOTH) / (total + SMOOTH))


@keras.saving.register_keras_serializable(package="flexunet")
def dice_loss(y_true, y_pred):
    return 1.0 - dice_coef_multiclass(y_true, y_pred)


@keras.saving.register_keras_serializable(package="flexunet")
def ce_dice_loss(y_true, y_pred):
    ce = ops.mean(keras.losses.categorical_crossentropy(y_true, y_pred))
    return ce + dice_loss(y_true, y_pred)


def get_loss(name: str):
    return {
        "categorical_crossentropy": keras.losses.CategoricalCrossentropy(),
        "dice": dice_loss,
        "ce_dice": ce_dice_loss,
    }[name]


@keras.saving.register_keras_serializable(package="flexunet")
class ClassOverlap(keras.metrics.Metric):
    """Dice or IoU of one class from argmax predictions, accumulated over an epoch."""

    def __init__(self, class_id: int, kind: str = "dice", name: str | None = None, **kwargs):
        super().__init__(name=name or f"{kind}_{class_id}", **kwargs)
        self.class_id, self.kind = class_id, kind
        self.tp = self.add_variable(shape=(), initializer="zeros", name="tp")
        self.fp = self.add_variable(shape=(), initializer="zeros", name="fp")
        self.fn = self.add_variable(shape=(), initializer="zeros", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.cast(ops.equal(ops.argmax(y_true, axis=-1), self.class_id), "float32")
        pred = ops.cast(ops.equal(ops.argmax(y_pred, axis=-1), self.class_id), "float32")
        self.tp.assign_add(ops.sum(truth * pred))
        self.fp.assign_add(ops.sum((1.0 - truth) * pred))
        self.fn.assign_add(ops.sum(truth * (1.0 - pred)))

    def result(self):
        if self.kind == "dice":
            return (2.0 * self.tp + SMOOTH) / (2.0 * self.tp + self.fp + self.fn + SMOOTH)
        return (self.tp + SMOOTH) / (self.tp + self.fp + self.fn + SMOOTH)

    def reset_state(self):
        for v in (self.tp, self.fp, self.fn):
            v.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "class_id": self.class_id, "kind": self.kind}


@keras.saving.register_keras_serializable(package="flexunet")
class DiceCoefMulticlass(keras.metrics.Metric):
    """The seed's `dice_coef_multiclass` with its sums accumulated over the epoch.

    Keras averages a metric function per batch; on unshuffled validation batches that
    lack a class, that class's soft Dice is ~0 and drags the mean down (the seed's
    validation curve sat far below training for this reason). Summing intersections and
    totals first gives the same number as one batch holding the whole split.
    """

    def __init__(self, num_classes: int, name: str = "dice_coef_multiclass", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.sums = self.add_variable(shape=(3, num_classes), initializer="zeros", name="sums")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(y_true, y_pred.dtype)
        axes = tuple(range(len(y_pred.shape) - 1))
        batch = ops.stack([ops.sum(y_true * y_pred, axis=axes), ops.sum(y_true, axis=axes),
                           ops.sum(y_pred, axis=axes)])
        self.sums.assign_add(ops.cast(batch, self.sums.dtype))

    def result(self):
        inter, t_sum, p_sum = self.sums[0], self.sums[1], self.sums[2]
        return ops.mean((2.0 * inter + SMOOTH) / (t_sum + p_sum + SMOOTH))

    def reset_state(self):
        self.sums.assign(ops.zeros_like(self.sums))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def training_metrics(class_names: list[str], dice_only: bool = False) -> list:
    """The seed metric plus per-class Dice and IoU for every non-background class
    (dice_only: the per-class Dice alone)."""
    metrics: list = [] if dice_only else [DiceCoefMulticlass(len(class_names))]
    for class_id, name in enumerate(class_names[1:], start=1):
        metrics.append(ClassOverlap(class_id, "dice", name=f"dice_{name}"))
        if not dice_only:
            metrics.append(ClassOverlap(class_id, "iou", name=f"iou_{name}"))
    return metrics
