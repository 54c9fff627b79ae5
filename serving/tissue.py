"""Background (glass) detection for histology: the one rule, and the window skip built on it.

A pixel is background when it is nearly grey (brightest - darkest channel <= GREY_SPREAD)
and at least `threshold` bright: bare glass, not stained tissue. The threshold is
TilingSettings.tissue_threshold (220 suits PAS histology; the glomeruli model's card
carries it, so slides skip glass by default; 0: nothing is skipped).

The mask is computed once, on a low-resolution copy of the image (a whole-slide image's
pyramid level with side <= MASK_SIDE, or an in-memory image subsampled to that side),
and a window holding less than MIN_TISSUE_FRACTION tissue in that mask is not run
through the model: it counts as class 0 (serving.tiling's skip_fn). Deciding from the
mask, before a window is read, means empty glass is never decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GREY_SPREAD = 25
MIN_TISSUE_FRACTION = 0.01
MASK_SIDE = 4096   # a 50 000 px slide's mask: one pixel per 13 level-0 px, 16 MB


def tissue_mask(image: np.ndarray, threshold: int) -> np.ndarray:
    """bool (H, W): True where an (H, W, C) uint8 image shows tissue, False on glass."""
    hi = image.max(axis=-1)
    lo = image.min(axis=-1)
    return (hi < threshold) | (hi.astype(np.int16) - lo > GREY_SPREAD)


def mask_step(height: int, width: int) -> int:
    """Subsampling step that brings an in-memory image's mask to <= MASK_SIDE px a side."""
    return max(1, math.ceil(max(height, width) / MASK_SIDE))


@dataclass
class TileCount:
    """Windows of one prediction: how many the image needed, how many were skipped as glass."""

    tiles: int = 0
    skipped: int = 0

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.tiles if self.tiles else 0.0


class TissueSkip:
    """skip_fn for serving.tiling: True for a window with < 1 % tissue in `mask` (never,
    when mask is None); counts every window it sees into `count`.

    mask: bool tissue mask of the image at `step` image pixels per mask pixel (a float:
    a pyramid level's downsample relative to the predicted level).
    """

    def __init__(self, mask: np.ndarray | None, step: float = 1.0, count: TileCount | None = None):
        self.mask, self.step = mask, float(step)
        self.count = count if count is not None else TileCount()

    @classmethod
    def from_image(cls, image: np.ndarray, threshold: int | None, count: TileCount | None = None) -> TissueSkip:
        """The mask of an in-memory (H, W, C) image (subsampled to MASK_SIDE); threshold None: no skip."""
        if threshold is None:
            return cls(None, 1.0, count)
        step = mask_step(*image.shape[:2])
        return cls(tissue_mask(np.asarray(image[::step, ::step]), threshold), step, count)

    def tissue_fraction(self, y: int, x: int, h: int, w: int) -> float:
        """Share of tissue in the window [y, y+h) x [x, x+w) (image pixels); 1.0 without a mask."""
        if self.mask is None:
            return 1.0
        s = self.step
        region = self.mask[int(y / s): max(int(y / s) + 1, math.ceil((y + h) / s)),
                           int(x / s): max(int(x / s) + 1, math.ceil((x + w) / s))]
        return float(region.mean()) if region.size else 0.0   # beyond the image (padding): no tissue

    def __call__(self, y: int, x: int, h: int, w: int) -> bool:
        skip = self.tissue_fraction(y, x, h, w) < MIN_TISSUE_FRACTION
        self.count.tiles += 1
        self.count.skipped += int(skip)
        return bool(skip)
