"""Folder validation errors and the tf.data pipeline (one-hot, augmentation, determinism)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.dataset import find_pairs, load_split, make_dataset, validate_pairs
from pipeline.data.masks import ids_to_rgb
from pipeline.errors import DataError
from pipeline.params import AugmentParams, MaskParams

MASK = MaskParams(rgb_map={(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2}, class_names=["bg", "CKD", "healthy"])
GEOMETRY_ONLY = AugmentParams(flip=True, rot90=True, max_rotation_deg=0, max_zoom=0, max_shift=0,
                              brightness=0, contrast=0)


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


def test_pairs_and_pair_errors(tmp_path):
    split = write_split(tmp_path / "train")
    assert [p.image.name for p in find_pairs(split)] == ["0.png", "1.png", "2.png", "3.png"]
    (split / "masks" / "2.png").unlink()
    with pytest.raises(DataError, match=r"images/2.png: mask missing \(expected .*masks/2.png\)"):
        find_pairs(split)
    (split / "images" / "2.png").unlink()
    (split / "images" / "1.png").unlink()
    with pytest.raises(DataError, match=r"masks/1.png: image missing"):
        find_pairs(split)
    empty = tmp_path / "valid"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(DataError, match="valid: split is empty"):
        find_pairs(empty)
    with pytest.raises(DataError, match="test/images: folder missing"):
        find_pairs(tmp_path / "test")


def test_size_mismatch_and_bad_files(tmp_path):
    split = write_split(tmp_path / "train")
    Image.fromarray(np.zeros((16, 12, 3), np.uint8)).save(split / "masks" / "0.png")
    with pytest.raises(DataError, match=r"0.png: image is 16x16 but its mask 0.png is 12x16"):
        validate_pairs(find_pairs(split), MASK)
    split = write_split(tmp_path / "valid")
    with pytest.raises(DataError, match="differs from the model size 32x32"):
        load_split(tmp_path, "valid", MASK, (32, 32))
    (split / "images" / "3.png").write_bytes(b"")
    with pytest.raises(Exception, match=r"3.png: file is empty"):
        validate_pairs(find_pairs(split), MASK)


def test_dataset_yields_one_hot_batches(tmp_path):
    pairs = find_pairs(write_split(tmp_path / "train", n=5))
    batches = list(make_dataset(pairs, MASK, channels=3, batch_size=2))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    image, onehot = batches[0]
    assert image.dtype.name == "float32" and onehot.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(onehot.numpy().sum(-1), 1.0)
    # Without augmentation the decoded classes are exactly the file's.
    np.testing.assert_array_equal(onehot.numpy().argmax(-1), (image.numpy()[..., 0] - 20) / 100)


def _first_epoch(pairs, augment, seed):
    return [(i.numpy(), m.numpy()) for i, m in make_dataset(pairs, MASK, channels=3, batch_size=8,
                                                               augment=augment, shuffle_seed=seed)][0]


def test_geometric_augmentation_moves_image_and_mask_together(tmp_path):
    pairs = find_pairs(write_split(tmp_path / "train", n=8))
    images, onehot = _first_epoch(pairs, GEOMETRY_ONLY, seed=3)
    np.testing.assert_array_equal(onehot.argmax(-1), (images[..., 0] - 20) / 100)
    plain = np.stack([np.asarray(Image.open(p.image))[..., 0] for p in pairs]).astype(np.float32)
    matched = sum(any(np.array_equal(img[..., 0], ref) for ref in plain) for img in images)
    assert matched < len(images), "flips/rotations never changed an image"


def test_affine_and_intensity_augmentation_is_seeded(tmp_path):
    pairs = find_pairs(write_split(tmp_path / "train", n=8))
    full = AugmentParams(max_rotation_deg=15, max_zoom=0.1, max_shift=0.1, brightness=0.1, contrast=0.1)
    a_img, a_mask = _first_epoch(pairs, full, seed=5)
    b_img, b_mask = _first_epoch(pairs, full, seed=5)
    c_img, _ = _first_epoch(pairs, full, seed=6)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)
    assert a_img.min() >= 0 and a_img.max() <= 255
    # Geometry is shared: the mask's class-1/2 region and the bright image region agree.
    agree = ((a_img[..., 0] > 70) == (a_mask.argmax(-1) > 0)).mean()
    assert agree > 0.93
