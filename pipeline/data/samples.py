"""A few mini_test pairs as arrays: the images the panels and epoch-change inference show
(the first test pairs when the dataset has no mini_test images: pairs.mini_test_pairs)."""

from __future__ import annotations

import numpy as np

from common.imageio import read_image, resize_image, resize_labels
from pipeline.data.masks import ids_to_rgb, read_mask
from pipeline.data.pairs import Pair, mini_test_pairs
from pipeline.layout import Layout


def load_infer_samples(layout: Layout, count: int, pairs: list[Pair] | None = None
                       ) -> tuple[np.ndarray, list[np.ndarray]]:
    """First `count` mini_test pairs (or the given `pairs`) at model size (large images
    resized, as the seed's plain inference did; tiled inference keeps them whole)."""
    p = layout.params
    size = (p.model.image_width, p.model.image_height)
    pairs = mini_test_pairs(layout.data_dir, count) if pairs is None else pairs
    images, truths = [], []
    for pair in pairs:
        image = read_image(pair.image, p.model.image_channels)
        ids = read_mask(pair.mask, p.mask)
        if image.shape[:2] != (size[1], size[0]):
            image, ids = resize_image(image, *size), resize_labels(ids, *size)
        images.append(image)
        truths.append(ids_to_rgb(ids, p.mask.colours))
    return np.stack(images), truths


def load_large_samples(layout: Layout, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """First `count` mini_test pairs at their own size, for tiled inference."""
    p = layout.params
    pairs = mini_test_pairs(layout.data_dir, count)
    images = [read_image(pair.image, p.model.image_channels) for pair in pairs]
    truths = [ids_to_rgb(read_mask(pair.mask, p.mask), p.mask.colours) for pair in pairs]
    return images, truths
