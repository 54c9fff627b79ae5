"""Shared by the data tests: a three-class mask map and image/mask folders written to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config.schema import MaskParams
from pipeline.data.masks import ids_to_rgb

MASK = MaskParams(rgb_map={(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2}, class_names=["bg", "CKD", "healthy"])


def write_split(root: Path, n: int = 4, size: int = 16, seed: int = 0) -> Path:
    """Images whose grey level encodes the class (class * 100 + 20), so image and mask
    can be checked against each other after augmentation."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        ids = np.zeros((size, size), np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        ids[y:y + size // 3, x:x + size // 4] = 1 + i % 2
        Image.fromarray(np.stack([ids * 100 + 20] * 3, -1).astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(ids_to_rgb(ids, MASK.colours)).save(root / "masks" / f"{i}.png")
    return root


def write_data(root, mini: bool):
    data = root / "data" / "kidney-t2w"
    write_split(data / "test", n=5, size=32)
    if mini:
        write_split(data / "mini_test", n=3, size=48, seed=1)
    else:   # what prepare leaves when the import has no mini_test: empty folders
        (data / "mini_test" / "images").mkdir(parents=True)
        (data / "mini_test" / "masks").mkdir()
    return data
