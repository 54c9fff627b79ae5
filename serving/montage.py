"""The QC montage of a predicted scan: every slice, the kidney outlined in its class colour,
so a reader checks a whole scan in one glance (a missed pole, a blob in the back muscles,
the wrong side).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

TILE = 192          # px: the longer side of one slice in the montage
TITLE_HEIGHT = 18


def outline(ids: np.ndarray) -> np.ndarray:
    """bool (h, w): foreground pixels with a 4-neighbour of another class (or the border)."""
    padded = np.pad(ids, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(ids.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[dy: dy + ids.shape[0], dx: dx + ids.shape[1]] != centre
    return edge & (ids != 0)


def _fit(image: np.ndarray, ids: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = ids.shape
    scale = tile / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    grey = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    return grey, np.asarray(Image.fromarray(ids).resize(size, Image.NEAREST))


def qc_montage(images: list[np.ndarray], labels: list[np.ndarray], colours: list[tuple[int, int, int]],
               title: str, tile: int = TILE) -> np.ndarray:
    """RGB uint8 montage: display slices (uint8 grey (h, w)) with their labels' outlines,
    numbered, in rows; `title` on top."""
    cols = max(1, math.ceil(math.sqrt(len(images))))
    rows = max(1, math.ceil(len(images) / cols))
    canvas = Image.new("RGB", (cols * tile, rows * tile + TITLE_HEIGHT), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill=(255, 255, 255))
    palette = np.asarray(colours, np.uint8)
    for k, (image, ids) in enumerate(zip(images, labels)):
        grey, small = _fit(image, ids, tile)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        edge = outline(small)
        rgb[edge] = palette[small[edge]]
        y, x = TITLE_HEIGHT + (k // cols) * tile, (k % cols) * tile
        canvas.paste(Image.fromarray(rgb), (x + (tile - rgb.shape[1]) // 2, y + (tile - rgb.shape[0]) // 2))
        draw.text((x + 3, y + 2), str(k), fill=(255, 255, 0))
    return np.asarray(canvas)
