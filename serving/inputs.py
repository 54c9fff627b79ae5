"""An input of `flexunet predict`, opened for streaming: a plain image or a whole-slide level.

Plain PNG/JPEG/strip-TIFF files are decoded whole (common.imageio), as before. Tiled or
pyramidal TIFF / OME-TIFF / SVS files (serving.slide.is_slide) stay on disk: the
predictor reads the chosen level window by window, the background skip decides from a
tissue mask of a low-resolution level (serving.tissue), and the OME-Zarr's preview is
that level's luma. Which level: `--level N`, else the level nearest `--mpp`, else the
level nearest the model card's training resolution when both are known, else level 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from common.imageio import MaxPixels, open_image, read_image
from serving.card import ModelCard
from serving.tissue import MASK_SIDE, TissueSkip, mask_step, tissue_mask

log = logging.getLogger(__name__)

MPP_TOLERANCE = 0.25   # a level this far (relative) from the training resolution is warned about


@dataclass
class InputImage:
    """What the predictor streams, and what the outputs need to place it on the slide."""

    array: Any                       # (H, W, C) uint8: a NumPy array, or a lazy slide level
    level: int = 0
    downsample: float = 1.0          # level-0 pixels per pixel of `array`
    mpp: float | None = None         # level-0 microns per pixel, if the file records it
    is_slide: bool = False
    preview: np.ndarray | None = None     # low-resolution uint8 (h, w, C) picture of the input
    preview_downsample: float = 1.0       # level-0 pixels per preview pixel
    _close: list[Any] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    def tissue(self, threshold: int | None) -> TissueSkip | None:
        """The background skip from the preview's tissue mask (None: no threshold)."""
        if threshold is None:
            return None
        assert self.preview is not None
        return TissueSkip(tissue_mask(self.preview, threshold), self.preview_downsample / self.downsample)

    def close(self) -> None:
        for item in self._close:
            item.close()


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the header, without decoding (slides: level 0)."""
    from serving.slide import is_slide, open_slide

    if is_slide(path):
        with open_slide(path) as slide:
            return slide.levels[0].height, slide.levels[0].width
    with open_image(path, max_pixels=None) as img:
        return img.height, img.width


def open_input(path: Path, card: ModelCard, *, level: int | None = None, mpp: float | None = None,
               max_pixels: MaxPixels = "pillow") -> InputImage:
    """Open `path` for prediction with `card`'s model (see the module docstring)."""
    from serving.slide import is_slide, open_slide

    if not is_slide(path):
        if level not in (None, 0):
            raise UserError(f"{path}: --level / --mpp choose a level of a pyramidal TIFF, OME-TIFF or SVS; "
                            f"this file has one level")
        if mpp is not None:
            raise UserError(f"{path}: --mpp chooses a level of a pyramidal TIFF, OME-TIFF or SVS, and this file "
                            f"has one; a PNG or JPEG records no resolution, so give the image's pixel size with "
                            f"--spacing UM instead (e.g. --spacing 0.5)")
        image = read_image(path, card.channels, max_pixels)
        step = mask_step(*image.shape[:2])
        return InputImage(image, preview=image[::step, ::step], preview_downsample=float(step))
    slide = open_slide(path)
    try:
        if level is None and mpp is None and slide.mpp:
            mpp = card.mpp        # the training resolution, when both sides record theirs
        chosen = slide.level_for(level=level, mpp=mpp)
        _check_resolution(path, slide, chosen, card)
        array = slide.array(chosen)
        if array.shape[2] != card.channels:
            raise UserError(f"{path}: the slide has {array.shape[2]} channel(s) but the model expects "
                            f"{card.channels}; convert the slide or use a {array.shape[2]}-channel model")
        thumb = slide.thumbnail_level(MASK_SIDE)
        preview = slide.read(thumb)
        if max(preview.shape[:2]) > 2 * MASK_SIDE:   # no coarse level: subsample the finest one
            preview = _subsample(slide.array(thumb), mask_step(*preview.shape[:2]))
        preview_downsample = slide.levels[0].width / preview.shape[1]
        return InputImage(array, level=chosen, downsample=slide.levels[chosen].downsample, mpp=slide.mpp,
                          is_slide=True, preview=preview, preview_downsample=preview_downsample, _close=[slide])
    except BaseException:
        slide.close()
        raise


def _subsample(array: Any, step: int) -> np.ndarray:
    """Every step-th pixel of a lazy level, read a band of rows at a time."""
    rows = int(getattr(array, "chunks", (512,))[0])
    rows = max(step, rows // step * step)
    return np.concatenate([np.asarray(array[y: y + rows, 0: array.shape[1]])[::step, ::step]
                           for y in range(0, array.shape[0], rows)], axis=0)


def _check_resolution(path: Path, slide: Any, level: int, card: ModelCard) -> None:
    """Warn when the chosen level's resolution is far from the model's training resolution."""
    if not (slide.mpp and card.mpp):
        return
    level_mpp = slide.mpp * slide.levels[level].downsample
    if abs(math.log(level_mpp / card.mpp)) > math.log1p(MPP_TOLERANCE):
        log.warning("%s: level %d is %.3g um/px but the model was trained at %.3g um/px; "
                    "choose a level with --level or --mpp %.3g", path, level, level_mpp, card.mpp, card.mpp)
