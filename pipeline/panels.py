"""Side-by-side input | truth | prediction panels, as the seed's README tables showed them."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

GAP = 4
HEADER = 14


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_panel(images: list[np.ndarray], truths: list[np.ndarray], preds: list[np.ndarray],
               titles: tuple[str, str, str] = ("input", "truth", "prediction")) -> np.ndarray:
    """One row per image: input | truth | prediction (all H x W x 3 uint8), white gaps."""
    if not (len(images) == len(truths) == len(preds)) or not images:
        raise ValueError("make_panel needs the same, non-zero number of images, truths and predictions")
    rows = []
    for columns in zip(images, truths, preds):
        cols = [_rgb(c) for c in columns]
        height = max(c.shape[0] for c in cols)
        padded = [np.pad(c, ((0, height - c.shape[0]), (0, GAP), (0, 0)), constant_values=255) for c in cols]
        rows.append(np.concatenate(padded, axis=1)[:, :-GAP])
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, GAP), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    body = np.concatenate(rows, axis=0)[:-GAP]
    header = np.full((HEADER, width, 3), 255, dtype=np.uint8)
    panel = Image.fromarray(np.concatenate([header, body], axis=0))
    draw = ImageDraw.Draw(panel)
    col_width = images[0].shape[1] + GAP
    for i, title in enumerate(titles):
        draw.text((i * col_width + 2, 1), title, fill=(0, 0, 0))
    return np.asarray(panel)


def notice_panel(text: str, width: int = 480) -> np.ndarray:
    """A one-line picture saying why there is no panel: DVC expects every declared plot file."""
    canvas = Image.new("RGB", (width, 40), (255, 255, 255))
    ImageDraw.Draw(canvas).text((6, 14), text, fill=(0, 0, 0))
    return np.asarray(canvas)
