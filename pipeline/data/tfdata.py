"""Image/mask pairs -> tf.data pipelines: the training stream and plain ordered batches.

Training (`training_stream`): the split is decoded once, with the same Pillow readers
serving uses, and kept as uint8 arrays (`load_arrays`; `train.cache: files` re-reads the
files for every batch instead, for splits too large for memory). Which images an epoch
sees, in which order, and how each batch is augmented are functions of (seed, epoch,
step) only: a permutation drawn by NumPy per epoch, and stateless TensorFlow random ops
per batch. So the stream does not depend on how many epochs ran before in this process,
and a training resumed at epoch k sees exactly the batches an uninterrupted one would.
Augmentation is applied to whole batches in the graph (one projective-transform call per
batch, not per image).

Evaluation and export (`make_dataset`): ordered, unaugmented batches streamed from the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from pipeline.data.masks import read_mask
from pipeline.data.pairs import Pair, check_pair, find_pairs, load_split, validate_pairs
from pipeline.config.schema import AugmentParams, MaskParams
from common.imageio import read_image

__all__ = ["Pair", "find_pairs", "load_split", "validate_pairs", "make_dataset", "SplitArrays",
           "load_arrays", "training_stream", "plain_batches", "augment_batch", "epoch_order"]

# Splits whose decoded arrays are at most this size are kept in memory by `train.cache: auto`.
MEMORY_CACHE_BYTES = 2 * 1024**3


def _read_pair_np(image_path: bytes | str, mask_path: bytes | str, mask: MaskParams, channels: int):
    image = read_image(_text(image_path), channels)
    ids = read_mask(_text(mask_path), mask)
    return image, ids


def _text(path: bytes | str) -> str:
    return path.decode() if isinstance(path, bytes) else str(path)


def make_dataset(pairs: list[Pair], mask: MaskParams, *, channels: int, batch_size: int) -> tf.data.Dataset:
    """Ordered batches of (float32 image 0..255, one-hot float32 mask), decoded file by file."""
    num_classes = len(mask.rgb_map)
    ds = tf.data.Dataset.from_tensor_slices(([str(p.image) for p in pairs], [str(p.mask) for p in pairs]))

    def load(image_path, mask_path):
        image, ids = tf.numpy_function(lambda a, b: _read_pair_np(a, b, mask, channels),
                                       [image_path, mask_path], [tf.uint8, tf.uint8], stateful=False)
        image.set_shape([None, None, channels])
        ids.set_shape([None, None])
        return tf.cast(image, tf.float32), tf.one_hot(tf.cast(ids, tf.int32), num_classes)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class SplitArrays:
    """A split for training: decoded arrays (in memory), or only the file pairs (`files`)."""

    pairs: list[Pair]
    channels: int
    mask: MaskParams
    images: np.ndarray | None = None   # (N, H, W, C) uint8
    ids: np.ndarray | None = None      # (N, H, W) uint8 class ids

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def in_memory(self) -> bool:
        return self.images is not None


def decoded_bytes(pairs: list[Pair], size: tuple[int, int], channels: int) -> int:
    return len(pairs) * size[0] * size[1] * (channels + 1)


def load_arrays(pairs: list[Pair], mask: MaskParams, *, channels: int, size: tuple[int, int],
                cache: str = "auto", desc: str = "decoding") -> SplitArrays:
    """Decode and check a split once (`cache` memory, or auto within MEMORY_CACHE_BYTES);
    `files` checks every pair, then keeps only the pairs and reads them per batch. Both
    give identical batches."""
    if cache == "files" or (cache == "auto" and decoded_bytes(pairs, size, channels) > MEMORY_CACHE_BYTES):
        validate_pairs(pairs, mask, size, desc=desc)
        return SplitArrays(pairs, channels, mask)
    images = np.empty((len(pairs), size[1], size[0], channels), np.uint8)
    ids = np.empty((len(pairs), size[1], size[0]), np.uint8)
    for i, pair in enumerate(tqdm(pairs, desc=desc, unit="image", leave=False, disable=len(pairs) < 200)):
        image, labels = _read_pair_np(pair.image, pair.mask, mask, channels)
        check_pair(pair, image, labels, size)
        images[i], ids[i] = image, labels
    return SplitArrays(pairs, channels, mask, images, ids)


def _fetch(split: SplitArrays):
    """indices -> (uint8 images, uint8 ids) of those pairs, from memory or from the files."""
    if split.in_memory:
        images, ids = tf.constant(split.images), tf.constant(split.ids)
        return lambda idx: (tf.gather(images, idx), tf.gather(ids, idx))
    paths = [(str(p.image), str(p.mask)) for p in split.pairs]

    def read(idx: np.ndarray):
        decoded = [_read_pair_np(*paths[i], split.mask, split.channels) for i in idx]
        return np.stack([d[0] for d in decoded]), np.stack([d[1] for d in decoded])

    def fetch(idx):
        images, ids = tf.numpy_function(read, [idx], [tf.uint8, tf.uint8], stateful=False)
        images.set_shape([None, None, None, split.channels])
        ids.set_shape([None, None, None])
        return images, ids
    return fetch


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n training images in `epoch`: NumPy's PCG64 stream for (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def training_stream(split: SplitArrays, *, batch_size: int, epochs: int, start_epoch: int = 0, seed: int,
                    augment: AugmentParams | None, num_classes: int) -> tf.data.Dataset:
    """Batches of epochs start_epoch .. epochs-1 (steps_per_epoch = ceil(N / batch_size);
    the last batch of an epoch may be smaller), as (float32 image 0..255, one-hot mask)."""
    n = len(split)
    orders = tf.constant(np.stack([epoch_order(n, seed, e) for e in range(epochs)]).astype(np.int32))
    fetch = _fetch(split)

    def one_epoch(epoch):
        batches = tf.data.Dataset.from_tensor_slices(orders[epoch]).batch(batch_size)
        return batches.enumerate().map(lambda step, idx: (epoch, step, idx))

    def make_batch(epoch, step, idx):
        images, ids = fetch(idx)
        images = tf.cast(images, tf.float32)
        if augment is not None:
            seed_pair = tf.stack([tf.constant(seed, tf.int64), epoch * 1_000_003 + step])
            images, ids = augment_batch(images, ids, seed_pair, augment)
        return images, tf.one_hot(tf.cast(ids, tf.int32), num_classes)

    ds = tf.data.Dataset.range(start_epoch, epochs).flat_map(one_epoch)
    return ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)


def plain_batches(split: SplitArrays, *, batch_size: int, num_classes: int) -> tf.data.Dataset:
    """The split in file order, unaugmented (validation during training)."""
    fetch = _fetch(split)
    ds = tf.data.Dataset.range(len(split)).batch(batch_size)
    ds = ds.map(lambda idx: fetch(tf.cast(idx, tf.int32)))
    ds = ds.map(lambda images, ids: (tf.cast(images, tf.float32), tf.one_hot(tf.cast(ids, tf.int32), num_classes)))
    return ds.prefetch(2)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


# --------------------------------------------------------------------------- augmentation
def _affine_matrices(u: tf.Tensor, height: tf.Tensor, width: tf.Tensor, cfg: AugmentParams) -> tf.Tensor:
    """(B, 4) uniforms in [-1, 1) -> (B, 8) output->input projective transforms:
    rotation + zoom + shift about the image centre."""
    angle = u[:, 0] * cfg.max_rotation_deg * math.pi / 180.0
    scale = 1.0 + u[:, 1] * cfg.max_zoom
    tx, ty = u[:, 2] * cfg.max_shift * width, u[:, 3] * cfg.max_shift * height
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = cx - a0 * cx - a1 * cy - tx
    b2 = cy - b0 * cx - b1 * cy - ty
    zeros = tf.zeros_like(a0)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def _warp(x: tf.Tensor, matrices: tf.Tensor, interpolation: str) -> tf.Tensor:
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=matrices, output_shape=tf.shape(x)[1:3],
        interpolation=interpolation, fill_mode="REFLECT", fill_value=0.0)


def _per_image(flags: tf.Tensor, if_true: tf.Tensor, if_false: tf.Tensor) -> tf.Tensor:
    return tf.where(tf.reshape(flags, [-1, 1, 1, 1]), if_true, if_false)


def augment_batch(images: tf.Tensor, ids: tf.Tensor, seed: tf.Tensor, cfg: AugmentParams):
    """One batch (float32 images 0..255 (B, H, W, C), uint8 ids (B, H, W)): the same
    geometric transform for each image and its mask, intensity changes to the image only.
    Every draw is stateless, from `seed` (two int64s)."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    batch = tf.shape(images)[0]
    mask = tf.cast(ids, tf.float32)[..., None]
    if cfg.flip:
        flip = tf.random.stateless_uniform([batch], seed=seeds[0]) < 0.5
        images = _per_image(flip, tf.reverse(images, [2]), images)
        mask = _per_image(flip, tf.reverse(mask, [2]), mask)
    if cfg.rot90:   # square images only (checked when params load)
        k = tf.random.stateless_uniform([batch], seed=seeds[1], minval=0, maxval=4, dtype=tf.int32)
        for turns in (1, 2, 3):
            images = _per_image(tf.equal(k, turns), tf.image.rot90(images, turns), images)
            mask = _per_image(tf.equal(k, turns), tf.image.rot90(mask, turns), mask)
    if cfg.max_rotation_deg or cfg.max_zoom or cfg.max_shift:
        shape = tf.cast(tf.shape(images), tf.float32)
        u = tf.random.stateless_uniform([batch, 4], seed=seeds[2], minval=-1.0, maxval=1.0)
        matrices = _affine_matrices(u, shape[1], shape[2], cfg)
        images = _warp(images, matrices, "BILINEAR")
        mask = _warp(mask, matrices, "NEAREST")
    if cfg.brightness:
        delta = tf.random.stateless_uniform([batch, 1, 1, 1], seed=seeds[3], minval=-cfg.brightness,
                                            maxval=cfg.brightness)
        images = images + delta * 255.0
    if cfg.contrast:
        factor = tf.random.stateless_uniform([batch, 1, 1, 1], seed=seeds[4], minval=1 - cfg.contrast,
                                             maxval=1 + cfg.contrast)
        mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
        images = (images - mean) * factor + mean
    return tf.clip_by_value(images, 0.0, 255.0), tf.cast(tf.round(mask[..., 0]), tf.uint8)
