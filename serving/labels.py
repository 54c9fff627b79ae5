"""From softmax probabilities to class ids: the one decision rule every stage shares.

Plain rule: per-pixel argmax (the seed's). With `single_foreground_class` the foreground
classes are properties of the whole image, not of single pixels -- in kidney-t2w the
class is the subject's diagnosis (CKD red, healthy green), so every kidney pixel of a
slice has the same class. Which pixels are foreground stays the per-pixel argmax
decision; which foreground class they get is decided once per image, by the summed
probability of each foreground class over those pixels. Evaluation, the mini_test
panels, export's Dice, tiled evaluation and serving all go through here, so a number in
metrics/ and a mask from `flexunet predict` come from the same rule.
"""

from __future__ import annotations

import numpy as np


def foreground_mass(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Summed probability of each foreground class (ids 1..K-1) over the foreground pixels."""
    fg = labels != 0
    return probs[fg][:, 1:].sum(axis=0, dtype=np.float64) if fg.any() else np.zeros(probs.shape[-1] - 1)


def unify_foreground(labels: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """Give every foreground pixel of `labels` (in place) the class with the largest mass."""
    if mass.size > 1 and mass.any():
        labels[labels != 0] = 1 + int(np.argmax(mass))
    return labels


def to_labels(probs: np.ndarray, *, single_foreground_class: bool = False) -> np.ndarray:
    """uint8 class ids (..., H, W) from probabilities (..., H, W, K); a leading batch axis
    is one image per entry."""
    probs = np.asarray(probs)
    labels = probs.argmax(axis=-1).astype(np.uint8)
    if not single_foreground_class or probs.shape[-1] <= 2:
        return labels
    if probs.ndim == 3:
        return unify_foreground(labels, foreground_mass(probs, labels))
    flat_p = probs.reshape((-1,) + probs.shape[-3:])
    flat_l = labels.reshape((-1,) + labels.shape[-2:])
    for p, lab in zip(flat_p, flat_l):
        unify_foreground(lab, foreground_mass(p, lab))
    return labels
