"""A few mini_test pairs as arrays: the images the panels and epoch-change inference show."""

from __future__ import annotations

import numpy as np
from PIL import Image

from common.imageio import read_image
from pipeline.data.masks import ids_to_rgb, read_mask
from pipeline.data.pairs import find_pairs
from pipeline.layout import Layout


def load_infer_samples(layout: Layout, count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """First `count` mini_test pairs at model size (large images resized, as the seed's
    plain inference did; tiled inference keeps them whole)."""
    p = layout.params
    size = (p.model.image_width, p.model.image_height)
    pairs = find_pairs(layout.data_dir / "mini_test")[:count]
    images, truths = [], []
    for pair in pairs:
        image = read_image(pair.image, p.model.image_channels)
        ids = read_mask(pair.mask, p.mask)
        if image.shape[:2] != (size[1], size[0]):
            image = np.asarray(Image.fromarray(image.squeeze()).resize(size, Image.BILINEAR))
            image = image.reshape(size[1], size[0], -1)
            ids = np.asarray(Image.fromarray(ids).resize(size, Image.NEAREST))
        images.append(image)
        truths.append(ids_to_rgb(ids, p.mask.colours))
    return np.stack(images), truths


def load_large_samples(layout: Layout, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """First `count` mini_test pairs at their own size, for tiled inference."""
    p = layout.params
    pairs = find_pairs(layout.data_dir / "mini_test")[:count]
    images = [read_image(pair.image, p.model.image_channels) for pair in pairs]
    truths = [ids_to_rgb(read_mask(pair.mask, p.mask), p.mask.colours) for pair in pairs]
    return images, truths
