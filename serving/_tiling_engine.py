"""Internals of serving.tiling: batch assembly, flip TTA, band accumulation.

Kept apart so tiling.py reads as the documented public API; nothing here is public.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

Window = tuple[int, int]
# Test-time flips of an NHWC batch: each is its own inverse.
FLIPS: dict[str, tuple[slice, ...]] = {
    "lr": (slice(None), slice(None), slice(None, None, -1)),
    "ud": (slice(None), slice(None, None, -1)),
    "lrud": (slice(None), slice(None, None, -1), slice(None, None, -1)),
}


@dataclass
class TileBatch:
    """One predict_fn call: windows in raster order, and which input slot each one uses."""

    windows: list[Window]
    slots: list[int]               # index into the batch's real outputs; -1 = skipped window
    inputs: np.ndarray | None      # (batch_size * n_aug, th, tw, C) float32; None if all skipped
    num_real: int                  # windows actually run (the rest of the batch is zero padding)
    batch_size: int


def make_batches(
    padded: Any, ys: list[int], xs: list[int], tile_hw: tuple[int, int],
    batch_size: int, flips: tuple[str, ...], skip_fn: Callable[[int, int, int, int], bool] | None,
) -> Iterator[TileBatch]:
    """Cut windows in raster order into fixed-shape float32 batches (zero-padded at the end).

    Skipped windows ride along with the next batch of real ones, so the consumer still
    sees every window in raster order. skip_fn decides from the window's coordinates,
    before it is read: a slide's empty glass is never decoded.
    """
    th, tw = tile_hw
    read = window_reader(padded)
    windows: list[Window] = []
    slots: list[int] = []
    tiles: list[np.ndarray] = []
    for y in ys:
        for x in xs:
            skipped = skip_fn is not None and bool(skip_fn(y, x, th, tw))
            windows.append((y, x))
            slots.append(-1 if skipped else len(tiles))
            if not skipped:
                tiles.append(read(y, x, th, tw))
            if len(tiles) == batch_size:
                yield _assemble(windows, slots, tiles, batch_size, flips)
                windows, slots, tiles = [], [], []
    if windows:
        yield _assemble(windows, slots, tiles, batch_size, flips)


def _assemble(windows: list[Window], slots: list[int], tiles: list[np.ndarray],
              batch_size: int, flips: tuple[str, ...]) -> TileBatch:
    if not tiles:
        return TileBatch(windows, slots, None, 0, batch_size)
    th, tw, c = tiles[0].shape
    inputs = np.zeros((batch_size * (1 + len(flips)), th, tw, c), dtype=np.float32)
    for i, tile in enumerate(tiles):
        inputs[i] = tile  # casts to float32 tile by tile: the image is never copied whole
    b = batch_size
    for k, name in enumerate(flips, start=1):
        inputs[k * b: (k + 1) * b] = inputs[:b][FLIPS[name]]
    return TileBatch(windows, slots, inputs, len(tiles), batch_size)


def undo_tta(out: np.ndarray, n: int, b: int, flips: tuple[str, ...], variance: bool = False) -> np.ndarray:
    """Flip the augmented predictions back and average them (same order every time).

    variance: append one channel, the variance of the flipped predictions around their
    mean (averaged over classes), so it is blended across windows like the probabilities.
    """
    p = out[:n].copy()
    for k, name in enumerate(flips, start=1):
        p += out[k * b: k * b + n][FLIPS[name]]
    p *= np.float32(1.0 / (1 + len(flips)))
    if not variance:
        return p
    var = np.square(out[:n] - p).mean(axis=-1)
    for k, name in enumerate(flips, start=1):
        var += np.square(out[k * b: k * b + n][FLIPS[name]] - p).mean(axis=-1)
    var *= np.float32(1.0 / (1 + len(flips)))
    return np.concatenate([p, var[..., None]], axis=-1)


def window_reader(image: Any) -> Callable[[int, int, int, int], np.ndarray]:
    """read(y, x, h, w) -> the window as a NumPy array: a view of an in-memory image, or
    cut from a lazy array (a slide level) through ChunkCache."""
    if isinstance(image, np.ndarray):
        return lambda y, x, h, w: image[y: y + h, x: x + w]
    return ChunkCache(image)


class ChunkCache:
    """Windows of a lazy (H, W, C) array read through its storage chunks, each decoded once.

    Overlapping windows share stored tiles; reading each window from the store would
    decode a 512 px tile up to ~16 times for 128 px windows. Windows arrive in raster
    order, so chunks above the current window row are dropped: at most two rows of
    chunks across the width are held (for a 50 000 px wide slide with 512 px tiles,
    ~150 MB), and only chunks some window needs are ever read.
    """

    def __init__(self, array: Any, chunks: tuple[int, int] | None = None):
        self.array = array
        shape = getattr(array, "chunks", None) or (512, 512)
        self.rows, self.cols = chunks or (int(shape[0]), int(shape[1]))
        self.height, self.width = int(array.shape[0]), int(array.shape[1])
        self.blocks: dict[tuple[int, int], np.ndarray] = {}

    def _block(self, ky: int, kx: int) -> np.ndarray:
        block = self.blocks.get((ky, kx))
        if block is None:
            y0, x0 = ky * self.rows, kx * self.cols
            block = np.asarray(self.array[y0: min(y0 + self.rows, self.height), x0: min(x0 + self.cols, self.width)])
            self.blocks[(ky, kx)] = block
        return block

    def __call__(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        top = y // self.rows
        for key in [k for k in self.blocks if k[0] < top]:
            del self.blocks[key]
        out: np.ndarray | None = None
        for ky in range(top, (y + h - 1) // self.rows + 1):
            for kx in range(x // self.cols, (x + w - 1) // self.cols + 1):
                block = self._block(ky, kx)
                by, bx = ky * self.rows, kx * self.cols
                ys = slice(max(y, by), min(y + h, by + block.shape[0]))
                xs = slice(max(x, bx), min(x + w, bx + block.shape[1]))
                if out is None:
                    out = np.empty((h, w) + block.shape[2:], dtype=block.dtype)
                out[ys.start - y: ys.stop - y, xs.start - x: xs.stop - x] = block[ys.start - by: ys.stop - by,
                                                                                   xs.start - bx: xs.stop - bx]
        assert out is not None
        return out


def check_probs(out: np.ndarray, batch: TileBatch, tile_hw: tuple[int, int]) -> None:
    """predict_fn must return (N, th, tw, K) finite values for every real window."""
    assert batch.inputs is not None
    expected = batch.inputs.shape[:3]
    if out.ndim != 4 or out.shape[:3] != expected or out.shape[3] < 1:
        raise ValueError(
            f"predict_fn returned shape {out.shape} for input {batch.inputs.shape}; "
            f"expected {expected + ('K',)} (one probability map per input tile)"
        )
    n_aug = expected[0] // batch.batch_size
    real = [a * batch.batch_size + i for a in range(n_aug) for i in range(batch.num_real)]
    if np.isfinite(out).all():
        return
    for idx in real:
        if not np.isfinite(out[idx]).all():
            y, x = batch.windows[batch.slots.index(idx % batch.batch_size)]
            raise ValueError(
                f"predict_fn returned non-finite values (NaN/inf) for the {tile_hw[0]}x{tile_hw[1]} "
                f"window at row {y}, column {x}; check the model and its input"
            )


class BandAccumulator:
    """Weighted probability sums for the current band of window rows (tile height x width).

    Windows of one window row all start at the band's first row, so the buffer never needs
    more than tile-height rows; pop() returns the finished rows and shifts the rest up.
    """

    def __init__(self, weights: np.ndarray, padded_width: int, width: int):
        self.weights = weights
        self.weights3 = weights[..., None]
        th = weights.shape[0]
        self.width = width
        self.row0 = 0
        self.wsum = np.zeros((th, padded_width), dtype=np.float32)
        self.bg = np.zeros((th, padded_width), dtype=np.float32)  # class-0 weight of skipped windows
        self.probs: np.ndarray | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.probs is None else self.probs.shape[2]

    def set_classes(self, k: int) -> None:
        self.probs = np.zeros(self.wsum.shape + (k,), dtype=np.float32)

    def add(self, y: int, x: int, p: np.ndarray | None) -> None:
        th, tw = self.weights.shape
        assert y == self.row0, "windows must arrive in raster order"
        if p is None:
            self.bg[:, x: x + tw] += self.weights
        else:
            if self.probs is None:
                self.set_classes(p.shape[2])
            assert self.probs is not None
            self.probs[:, x: x + tw] += p * self.weights3
        self.wsum[:, x: x + tw] += self.weights

    def pop(self, upto: int) -> tuple[int, np.ndarray]:
        """Finished rows [row0, upto) as probabilities (rows, width, K); shift the buffer."""
        assert self.probs is not None, "set_classes() first"
        n, w = upto - self.row0, self.width
        num = self.probs[:n, :w].copy()
        num[..., 0] += self.bg[:n, :w]
        band = num / self.wsum[:n, :w, None]
        for buf in (self.probs, self.wsum, self.bg):
            buf[: buf.shape[0] - n] = buf[n:]   # numpy buffers overlapping copies
            buf[buf.shape[0] - n:] = 0
        row0, self.row0 = self.row0, upto
        return row0, band
