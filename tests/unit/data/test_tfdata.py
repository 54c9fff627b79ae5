"""The tf.data pipeline (one-hot, augmentation, determinism)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.data.tfdata import epoch_order, find_pairs, load_arrays, make_dataset, training_stream
from pipeline.config.schema import AugmentParams
from tests.unit.data.conftest import MASK, write_split

GEOMETRY_ONLY = AugmentParams(flip=True, rot90=True, max_rotation_deg=0, max_zoom=0, max_shift=0,
                              brightness=0, contrast=0)


def test_dataset_yields_one_hot_batches(tmp_path):
    pairs = find_pairs(write_split(tmp_path / "train", n=5))
    batches = list(make_dataset(pairs, MASK, channels=3, batch_size=2))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    image, onehot = batches[0]
    assert image.dtype.name == "float32" and onehot.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(onehot.numpy().sum(-1), 1.0)
    # Without augmentation the decoded classes are exactly the file's.
    np.testing.assert_array_equal(onehot.numpy().argmax(-1), (image.numpy()[..., 0] - 20) / 100)


def _split(pairs, cache="memory"):
    return load_arrays(pairs, MASK, channels=3, size=(16, 16), cache=cache)


def _stream(split, augment, seed, epochs=3, start=0, batch_size=3):
    ds = training_stream(split, batch_size=batch_size, epochs=epochs, start_epoch=start, seed=seed,
                         augment=augment, num_classes=3)
    return [(i.numpy(), m.numpy()) for i, m in ds]


def test_stream_epochs_are_permutations_batched_per_epoch(tmp_path):
    pairs = find_pairs(write_split(tmp_path / "train", n=7))
    batches = _stream(_split(pairs), None, seed=1, epochs=2, batch_size=3)
    assert [len(b[0]) for b in batches] == [3, 3, 1, 3, 3, 1]   # no batch straddles two epochs
    plain = np.stack([np.asarray(Image.open(p.image)) for p in pairs]).astype(np.float32)

    def order(epoch_batches):
        images = np.concatenate([b[0] for b in epoch_batches])
        return [int(np.flatnonzero([np.array_equal(img, ref) for ref in plain])[0]) for img in images]

    first, second = order(batches[:3]), order(batches[3:])
    assert sorted(first) == sorted(second) == list(range(7))
    assert first == list(epoch_order(7, 1, 0)) and second == list(epoch_order(7, 1, 1)) and first != second


def test_a_stream_started_at_epoch_k_is_the_tail_of_the_whole_stream(tmp_path):
    """What resuming relies on: epoch k's batches (order and augmentation) do not depend
    on the epochs before it, and memory and file sources give identical batches."""
    pairs = find_pairs(write_split(tmp_path / "train", n=8))
    full = AugmentParams(max_rotation_deg=15, max_zoom=0.1, max_shift=0.1, brightness=0.1, contrast=0.1)
    whole = _stream(_split(pairs), full, seed=5)
    tail = _stream(_split(pairs, cache="files"), full, seed=5, start=2)
    assert len(whole) == 9 and len(tail) == 3
    for (a_img, a_mask), (b_img, b_mask) in zip(whole[6:], tail):
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_mask, b_mask)
    other = _stream(_split(pairs), full, seed=6)
    assert not np.array_equal(whole[0][0], other[0][0])


def test_geometric_augmentation_moves_image_and_mask_together(tmp_path):
    pairs = find_pairs(write_split(tmp_path / "train", n=8))
    images, onehot = _stream(_split(pairs), GEOMETRY_ONLY, seed=3, epochs=1, batch_size=8)[0]
    np.testing.assert_array_equal(onehot.argmax(-1), (images[..., 0] - 20) / 100)
    plain = np.stack([np.asarray(Image.open(p.image))[..., 0] for p in pairs]).astype(np.float32)
    matched = sum(any(np.array_equal(img[..., 0], ref) for ref in plain) for img in images)
    assert matched < len(images), "flips/rotations never changed an image"
    turned = sum(any(np.array_equal(img[..., 0], np.rot90(ref, k)) for ref in plain for k in (1, 3))
                 for img in images)
    assert turned > 0, "no image was turned by 90 degrees"


def test_affine_and_intensity_augmentation_is_seeded_and_keeps_geometry(tmp_path):
    pairs = find_pairs(write_split(tmp_path / "train", n=8))
    full = AugmentParams(max_rotation_deg=15, max_zoom=0.1, max_shift=0.1, brightness=0.1, contrast=0.1)
    a_img, a_mask = _stream(_split(pairs), full, seed=5, epochs=1, batch_size=8)[0]
    b_img, b_mask = _stream(_split(pairs), full, seed=5, epochs=1, batch_size=8)[0]
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert a_img.min() >= 0 and a_img.max() <= 255
    # Geometry is shared: the mask's class-1/2 region and the bright image region agree.
    agree = ((a_img[..., 0] > 70) == (a_mask.argmax(-1) > 0)).mean()
    assert agree > 0.93


def test_files_cache_is_chosen_for_splits_over_the_memory_limit(tmp_path, monkeypatch):
    import pipeline.data.tfdata as dataset

    pairs = find_pairs(write_split(tmp_path / "train", n=4))
    assert _split(pairs, cache="auto").in_memory
    monkeypatch.setattr(dataset, "MEMORY_CACHE_BYTES", 4 * 16 * 16 * 4 - 1)
    assert not _split(pairs, cache="auto").in_memory and _split(pairs, cache="memory").in_memory
