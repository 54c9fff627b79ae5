"""Per-pixel uncertainty of a softmax prediction: the one rule for maps, CSV means and AUROC.

Entropy of the class probabilities divided by log(K), so 0 is certain (one class has
probability 1) and 1 is a uniform guess, whatever the number of classes. With flip TTA
the predictor also reports the variance of the flipped predictions (serving.tiling).
Maps are stored as 8-bit (value x 255, rounded) beside the labels.
"""

from __future__ import annotations

import numpy as np

EPS = np.float32(1e-7)


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """float32 (...,) in [0, 1] from probabilities (..., K), K >= 2."""
    p = np.asarray(probs, dtype=np.float32)
    k = p.shape[-1]
    if k < 2:
        raise ValueError(f"entropy needs at least 2 classes, got probabilities of shape {p.shape}")
    h = -(p * np.log(np.maximum(p, EPS))).sum(axis=-1)
    return np.clip(h / np.float32(np.log(k)), 0.0, 1.0).astype(np.float32)


def to_uint8(u: np.ndarray) -> np.ndarray:
    """An uncertainty map in [0, 1] as uint8 0..255 (how maps are stored)."""
    return np.round(np.clip(u, 0.0, 1.0) * 255.0).astype(np.uint8)
