"""Background (glass) detection for histology: the one rule, and the window skip built on it.

A pixel is background when it is nearly grey (brightest - darkest channel <= GREY_SPREAD)
and at least `threshold` bright: bare glass, not stained tissue. The threshold is
TilingSettings.tissue_threshold (220 suits PAS histology; unset: nothing is skipped). A
window holding less than MIN_TISSUE_FRACTION tissue is not run through the model and
counts as class 0 (serving.tiling's skip_fn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GREY_SPREAD = 25
MIN_TISSUE_FRACTION = 0.01


def tissue_mask(image: np.ndarray, threshold: int) -> np.ndarray:
    """bool (H, W): True where an (H, W, C) uint8 image shows tissue, False on glass."""
    hi = image.max(axis=-1)
    lo = image.min(axis=-1)
    return (hi < threshold) | (hi.astype(np.int16) - lo > GREY_SPREAD)


@dataclass
class TileCount:
    """Windows of one prediction: how many the image needed, how many were skipped as glass."""

    tiles: int = 0
    skipped: int = 0


class TissueSkip:
    """skip_fn for serving.tiling: True for a window with < 1 % tissue (never, when threshold
    is None); counts every window it sees into `count`."""

    def __init__(self, threshold: int | None, count: TileCount | None = None):
        self.threshold, self.count = threshold, count if count is not None else TileCount()

    def __call__(self, tile: np.ndarray) -> bool:
        skip = self.threshold is not None and tissue_mask(tile, self.threshold).mean() < MIN_TISSUE_FRACTION
        self.count.tiles += 1
        self.count.skipped += int(skip)
        return bool(skip)
