"""Sliding-window (tiled) inference for images of any size: geometry, blending, streaming.

Pure NumPy: the model is a callable `predict_fn(batch) -> probs`, as in MONAI's
`sliding_window_inference`, so tests pass `lambda x: x + 1` and check exact stitching.

How an image is predicted
1. Images smaller than a tile along an axis are reflect-padded at the bottom/right to the
   tile, and the result cropped back (the model sees mirrored context, not zeros).
2. Windows of `tile_size` cover each axis exactly, steps spread evenly as nnU-Net does
   (`window_starts`): the first window starts at 0, the last ends at the border, and no
   near-duplicate window hugs the border (MONAI's last step can be a few pixels).
3. Windows go to `predict_fn` in raster order, in batches of a FIXED shape (the last batch
   is padded with zeros and the padding discarded): onnxruntime keeps memory per input
   shape, so varying batch shapes make it grow. The next batch is cut out of the image
   in a worker thread while the current one is predicted (onnxruntime releases the GIL).
4. Each window's probabilities are weighted by an importance map (`importance_map`:
   centred Gaussian, sigma = tile/8, or constant), accumulated in float32 and divided by
   the accumulated weights: windows' borders, where context is missing, count least.
5. Memory is bounded: one band of window rows is held at a time and rows no later window
   touches are emitted (`iter_bands`), so peak memory grows with width x tile, not area.
   The image may be lazy (a whole-slide level, serving.slide): anything with `.shape`
   (H, W, C) and NumPy slicing; windows are then read through its storage chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from serving._tiling_engine import FLIPS, BandAccumulator, TileBatch, check_probs, make_batches, undo_tta
from serving.settings import BLENDS, TilingSettings, check_setting

PredictFn = Callable[[np.ndarray], np.ndarray]
SkipFn = Callable[[int, int, int, int], bool]   # (y, x, h, w) -> skip this window

__all__ = ["BLENDS", "importance_map", "iter_bands", "sliding_window_inference", "tta_flips", "window_starts"]


def window_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of windows of size `tile` covering [0, length) exactly (nnU-Net's rule).

    n = ceil((length - tile) / (tile * (1 - overlap))) + 1 windows, starts
    round(i * (length - tile) / (n - 1)): first 0, last length - tile, neighbours' overlap
    at least `overlap * tile` and spread evenly (never more than one window per pixel
    step). length <= tile gives [0] (the caller pads the image to the tile).
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    overlap = check_setting("overlap", overlap)
    if length <= tile:
        return [0]
    span = length - tile
    # The epsilon keeps e.g. 96/24 from becoming 4.0000001 -> 5 windows through float error.
    n = math.ceil(span / (tile * (1.0 - overlap)) - 1e-9) + 1
    n = min(n, span + 1)  # a step under 1 px (tiny tile, overlap near 1) would repeat windows
    # round-half-up in integers: exact, and mirrored starts are symmetric.
    return [(2 * i * span + (n - 1)) // (2 * (n - 1)) for i in range(n)]


def importance_map(tile_hw: tuple[int, int], blend: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Weight of each pixel of a window when overlapping windows are blended, float32 (h, w).

    blend="gaussian": exp(-d^2 / (2 sigma^2)) with sigma = sigma_scale * side per axis,
    d measured from the exact centre ((side - 1) / 2, so the map equals its flips),
    normalised to max 1 and floored at its smallest positive float32 value (never below
    the smallest normal float32), so no pixel's weight underflows to zero.
    blend="constant": all ones (plain averaging).
    """
    h, w = (int(v) for v in tile_hw)
    if h < 1 or w < 1:
        raise ValueError(f"tile_hw must be positive, got {tile_hw}")
    if check_setting("blend", blend) == "constant":
        return np.ones((h, w), dtype=np.float32)
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")

    def axis(n: int) -> np.ndarray:
        d = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        return np.exp(-(d**2) / (2.0 * (sigma_scale * n) ** 2))

    m = np.outer(axis(h), axis(w))
    m = (m / m.max()).astype(np.float32)
    positive = m[m > 0]
    floor = max(float(positive.min()) if positive.size else 1.0, float(np.finfo(np.float32).tiny))
    return np.maximum(m, np.float32(floor))


def _tile_hw(tile_size: int | tuple[int, int], multiple: int) -> tuple[int, int]:
    th, tw = (tile_size, tile_size) if isinstance(tile_size, (int, np.integer)) else tile_size
    th, tw = int(th), int(tw)
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if th < 1 or tw < 1 or th % multiple or tw % multiple:
        raise ValueError(f"tile_size {tile_size} must be positive multiples of {multiple}")
    return th, tw


def _as_hwc(image: Any) -> Any:
    if not isinstance(image, np.ndarray) and len(getattr(image, "shape", ())) == 3:
        if min(image.shape) == 0:
            raise ValueError(f"image must be non-empty, got shape {image.shape}")
        return image   # lazy (H, W, C): read window by window
    image = np.asarray(image)
    if image.ndim == 2:
        return image[..., None]
    if image.ndim != 3 or min(image.shape) == 0:
        raise ValueError(f"image must be (H, W) or (H, W, C) and non-empty, got shape {image.shape}")
    return image


def _pad_to_tile(image: Any, th: int, tw: int) -> Any:
    """Reflect-pad bottom/right to at least one tile; a copy only when padding is needed
    (a lazy image is then read whole: it is under a tile high or wide)."""
    ph, pw = max(0, th - image.shape[0]), max(0, tw - image.shape[1])
    if ph == 0 and pw == 0:
        return image
    return np.pad(np.asarray(image[:, :]), ((0, ph), (0, pw), (0, 0)), mode="reflect")


def iter_bands(
    image: np.ndarray,
    predict_fn: PredictFn,
    *,
    tile_size: int | tuple[int, int],
    overlap: float = TilingSettings.overlap,
    blend: str = TilingSettings.blend,
    batch_size: int = TilingSettings.batch_size,
    multiple: int = 1,
    tta: bool | Sequence[str] = False,
    skip_fn: SkipFn | None = None,
    tta_variance: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Predict `image` window by window; yield `(row0, probs)` for each finished band of rows.

    Bands are float32 (rows, W, K) for rows [row0, row0 + rows), top to bottom, covering
    H exactly once; a band is yielded as soon as no later window touches its rows, so at
    most one tile-high band of sums (plus one batch read ahead) is held: peak memory
    ~ W x tile x K floats. The knobs' rules are serving.settings's (bad values raise a
    SettingsError, a ValueError).

    image: (H, W) or (H, W, C), any dtype; tiles are cast to float32 one at a time, so a
        uint8 gigapixel image is never copied as float.
    predict_fn: batch float32 (B, th, tw, C) -> probabilities (B, th, tw, K) float32.
    tile_size: window side (int) or (th, tw); must be a multiple of `multiple`.
    overlap (0.25): minimum fraction of a window shared with its neighbour, in [0, 1);
        0.5 doubles the compute per axis, 0 still overlaps when the size is not a multiple.
    blend ("gaussian"): "gaussian" down-weights window borders (see importance_map);
        "constant" averages overlapping windows equally.
    batch_size (4): windows per predict_fn call. Every call has the same shape
        (batch_size, or 4 x batch_size with TTA); the last batch is zero-padded.
    multiple (1): the model's size multiple (2**(levels-1)); only validates tile_size.
    tta (False): flip test-time augmentation: each window also goes through the model
        flipped, the predictions flipped back and averaged. True: left-right, up-down and
        both (4x compute); or a subset such as ("lr",) for anatomy with an up and a down.
    skip_fn (None): skip_fn(y, x, h, w) -> True skips the model for that window (e.g. no
        tissue: serving.tissue.TissueSkip), decided before the window is read; a skipped
        window counts as class 0 with probability 1, blended like any other. It is called
        once per window, in raster order, with padded-image coordinates.
    tta_variance (False): with flips, each band gets one more trailing channel (K + 1):
        the variance of the flipped predictions, blended like the probabilities.
    """
    image = _as_hwc(image)
    th, tw = _tile_hw(tile_size, multiple)
    batch_size = check_setting("batch_size", batch_size)
    height, width = image.shape[:2]
    padded = _pad_to_tile(image, th, tw)
    ys = window_starts(padded.shape[0], th, overlap)
    xs = window_starts(padded.shape[1], tw, overlap)
    acc = BandAccumulator(importance_map((th, tw), blend), padded.shape[1], width)
    flips = tta_flips(tta)
    variance = bool(tta_variance and flips)
    batches = make_batches(padded, ys, xs, (th, tw), batch_size, flips, skip_fn)
    next_row = dict(zip(ys, ys[1:] + [height]))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader") as reader:
        pending = reader.submit(next, batches, None)
        while (batch := pending.result()) is not None:
            pending = reader.submit(next, batches, None)  # cut the next batch during compute
            probs = _predict(batch, predict_fn, (th, tw), flips, variance)
            for (y, x), slot in zip(batch.windows, batch.slots):
                acc.add(y, x, None if slot < 0 else probs[slot])
                if x == xs[-1]:  # window row done: rows above the next row's start are final
                    if acc.num_classes is None:  # every window so far was skipped
                        n = batch_size * (1 + len(flips))
                        acc.set_classes(_probe_classes(predict_fn, padded, (th, tw), n) + variance)
                    yield acc.pop(min(next_row[y], height))


def _probe_classes(predict_fn: PredictFn, padded: Any, tile_hw: tuple[int, int], n: int) -> int:
    """Number of classes, learned from one (usual-shape) call when skip_fn skipped every window so far."""
    out = np.asarray(predict_fn(np.zeros((n,) + tile_hw + padded.shape[2:], dtype=np.float32)))
    if out.ndim != 4:
        raise ValueError(f"predict_fn returned shape {out.shape}; expected (N, th, tw, K)")
    return int(out.shape[3])


def tta_flips(tta: bool | Sequence[str]) -> tuple[str, ...]:
    """The flips run besides the identity: True -> all three ("lr", "ud", "lrud"), False
    -> none, or an explicit subset (a kidney MRI model trained with left-right flips only
    must not be asked about upside-down kidneys)."""
    if tta is True:
        return tuple(FLIPS)
    if tta is False or tta is None:
        return ()
    flips = tuple(tta)
    unknown = [f for f in flips if f not in FLIPS]
    if unknown:
        raise ValueError(f"tta flips {unknown}: use any of {', '.join(FLIPS)}")
    return flips


def _predict(batch: TileBatch, predict_fn: PredictFn, tile_hw: tuple[int, int], flips: tuple[str, ...],
             variance: bool = False) -> np.ndarray:
    """Run one fixed-shape batch; return the real windows' probabilities (n, th, tw, K)."""
    if batch.inputs is None:  # every window of this batch was skipped
        return np.empty((0,) + tile_hw + (0,), dtype=np.float32)
    out = np.asarray(predict_fn(batch.inputs), dtype=np.float32)
    check_probs(out, batch, tile_hw)
    return undo_tta(out, batch.num_real, batch.batch_size, flips, variance) if flips else out[: batch.num_real]


def sliding_window_inference(image: np.ndarray, predict_fn: PredictFn, **tiling: Any) -> np.ndarray:
    """Class probabilities (H, W, K) float32 of `image`, predicted window by window.

    MONAI's contract, array in, array out; the keywords (tile_size, overlap, blend,
    batch_size, multiple, tta, skip_fn) and their defaults are `iter_bands`'s, whose bands
    are written into one array. That holds H x W x K floats: for gigapixel images use
    `iter_bands` (or TiledPredictor.predict, which keeps labels only).
    """
    out: np.ndarray | None = None
    height = _as_hwc(image).shape[0]
    for row0, band in iter_bands(image, predict_fn, **tiling):
        if out is None:
            out = np.empty((height,) + band.shape[1:], dtype=np.float32)
        out[row0: row0 + band.shape[0]] = band
    assert out is not None  # iter_bands always covers every row
    return out
