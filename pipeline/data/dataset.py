"""Folder of image/mask pairs -> validated pair list -> streaming tf.data pipeline.

Images are decoded file by file inside tf.data (never the whole split in RAM) with the
same Pillow readers serving uses, so the conversion rules cannot drift apart.
Augmentation draws its randomness from stateless ops fed by a seeded
`Dataset.random`, so a given seed gives the same augmented stream on every run.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from pipeline.data.masks import read_mask
from pipeline.data.pairs import Pair, find_pairs, load_split, validate_pairs
from pipeline.params import AugmentParams, MaskParams
from serving.imageio import read_image

__all__ = ["Pair", "find_pairs", "load_split", "validate_pairs", "make_dataset"]


def _read_pair_np(image_path: bytes, mask_path: bytes, mask: MaskParams, channels: int):
    image = read_image(image_path.decode(), channels).astype(np.float32)
    ids = read_mask(mask_path.decode(), mask)
    return image, ids


def make_dataset(pairs: list[Pair], mask: MaskParams, *, channels: int, batch_size: int,
                 augment: AugmentParams | None = None, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Batches of (float32 image 0..255, one-hot float32 mask). augment=None: no augmentation."""
    num_classes = len(mask.rgb_map)
    ds = tf.data.Dataset.from_tensor_slices(
        ([str(p.image) for p in pairs], [str(p.mask) for p in pairs])
    )
    if shuffle_seed is not None:
        ds = ds.shuffle(len(pairs), seed=shuffle_seed, reshuffle_each_iteration=True)

    def load(image_path, mask_path):
        image, ids = tf.numpy_function(
            lambda a, b: _read_pair_np(a, b, mask, channels),
            [image_path, mask_path], [tf.float32, tf.uint8], stateful=False,
        )
        image.set_shape([None, None, channels])
        ids.set_shape([None, None])
        return image, ids

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if augment is not None:
        seeds = tf.data.Dataset.random(seed=shuffle_seed or 0, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, seeds.batch(2))
        ds = ds.map(lambda pair, seed: augment_pair(pair[0], pair[1], seed, augment),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(lambda image, ids: (image, tf.one_hot(tf.cast(ids, tf.int32), num_classes)),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _affine_matrix(seed, height, width, cfg: AugmentParams) -> tf.Tensor:
    """Output->input projective transform: rotation + zoom + shift about the centre."""
    u = tf.random.stateless_uniform([4], seed=seed, minval=-1.0, maxval=1.0)
    angle = u[0] * cfg.max_rotation_deg * math.pi / 180.0
    scale = 1.0 + u[1] * cfg.max_zoom
    tx, ty = u[2] * cfg.max_shift * width, u[3] * cfg.max_shift * height
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = cx - a0 * cx - a1 * cy - tx
    b2 = cy - b0 * cx - b1 * cy - ty
    return tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None, :]


def _warp(x, matrix, interpolation: str):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=matrix, output_shape=tf.shape(x)[:2],
        interpolation=interpolation, fill_mode="REFLECT", fill_value=0.0,
    )[0]


def augment_pair(image, ids, seed, cfg: AugmentParams):
    """The same geometric transform for image and mask; intensity changes to the image only."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    mask = tf.cast(ids, tf.float32)[..., None]
    if cfg.flip:
        flip_lr = tf.random.stateless_uniform([], seed=seeds[0]) < 0.5
        image = tf.cond(flip_lr, lambda: tf.reverse(image, [1]), lambda: image)
        mask = tf.cond(flip_lr, lambda: tf.reverse(mask, [1]), lambda: mask)
    if cfg.rot90:
        k = tf.random.stateless_uniform([], seed=seeds[1], minval=0, maxval=4, dtype=tf.int32)
        image, mask = tf.image.rot90(image, k), tf.image.rot90(mask, k)
    if cfg.max_rotation_deg or cfg.max_zoom or cfg.max_shift:
        shape = tf.cast(tf.shape(image), tf.float32)
        matrix = _affine_matrix(seeds[2], shape[0], shape[1], cfg)
        image = _warp(image, matrix, "BILINEAR")
        mask = _warp(mask, matrix, "NEAREST")
    if cfg.brightness:
        delta = tf.random.stateless_uniform([], seed=seeds[3], minval=-cfg.brightness, maxval=cfg.brightness)
        image = image + delta * 255.0
    if cfg.contrast:
        factor = tf.random.stateless_uniform([], seed=seeds[4], minval=1 - cfg.contrast, maxval=1 + cfg.contrast)
        mean = tf.reduce_mean(image, axis=[0, 1], keepdims=True)
        image = (image - mean) * factor + mean
    return tf.clip_by_value(image, 0.0, 255.0), tf.cast(tf.round(mask[..., 0]), tf.uint8)

