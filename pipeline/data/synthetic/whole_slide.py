"""A synthetic PAS whole slide: tissue islands on glass, as a pyramidal tiled OME-TIFF.

What it is for: the whole-slide path (serving/slide.py, tiled prediction of a slide) needs
a slide whose truth is known and whose tissue looks like the glomeruli training tiles, of
any size, on a machine without the real data. So level 0 is the training resolution: each
island is one 256 px render_glomeruli tile (the training images are 256 px renders) cut by
a smooth blob outline that fades into glass, and glomeruli keep their training size.

Why it looks the way it does:
- Islands sit one per cell of a grid, in a seed-chosen subset of the cells, jittered inside
  their cell; islands never overlap. The tissue fraction is not left to luck: each island's
  outline is chosen so it holds a target number of tissue pixels (by serving.tissue's rule),
  and any shortfall or excess is carried to the next island (error diffusion), so the
  whole slide lands on tissue_fraction to within a fraction of one island.
- Glass is (242, 242, 242) plus noise from a fixed 997 px periodic texture: the value at
  (y, x) is known anywhere without state, so an island blends into exactly the glass that
  surrounds it, and the texture costs nothing per tile.
- The recorded pixel size is the synthetic glomeruli dataset's, TRAINING_MPP (the 256 px
  training images draw what a 1024 px tile at 0.5 um/px shows, so 2 um/px; the glomeruli
  preset's dataset.mpp), so `flexunet predict` picks level 0 for the model trained on them.
- Memory is bounded by one row of 512 px tiles: level 0 is produced band by band and handed
  to tifffile as a generator of tiles; each band, halved by 2x2 box averaging, is spooled
  zlib-compressed to a temporary file and becomes the next level's bands (and so on down to
  <= 1024 px). The truth mask is spooled the same way and written after the pyramid.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import tifffile
from tqdm import tqdm

from common.atomic import atomic_path
from common.errors import UserError
from pipeline.data.synthetic.glomeruli import render_glomeruli
from serving.tissue import tissue_mask

TILE = 512                # TIFF tile side and the height of a band of level 0
ISLAND = 256              # the training tiles' size: one render per island
TRAINING_MPP = 2.0        # microns per pixel of the synthetic glomeruli training images (the preset's dataset.mpp)
TISSUE_THRESHOLD = 220    # serving.tissue's threshold for PAS histology (TilingSettings.tissue_threshold)
MAX_SIDE_LOWEST = 1024    # the pyramid goes down until both sides are <= this
MAX_TISSUE_FRACTION = 0.3
GLASS = 242
_GLASS_SIGMA = 1.5
_TEXTURE = 997            # glass noise period: prime, so it never lines up with tiles
_ISLAND_TISSUE = 24_000   # mean tissue pixels per island; a 256 px render reliably holds more
_RADIUS = 100.0           # island outline radius, pixels, before its wobble
_FADE = 0.12              # fade from tissue to glass, in blob units (about 12 px)
_SALT = 0x51DE            # keeps the slide's random streams apart from the dataset's


@dataclass(frozen=True)
class _Island:
    y: int
    x: int
    number: int   # raster order: the order islands are rendered and their targets assigned


@dataclass
class _Stats:
    tissue: int = 0            # the islands' own counts, which steer the next island's target
    tissue_measured: int = 0   # counted again on the level-0 bands as written
    glomerulus: int = 0


# ---------------------------------------------------------------- layout

def _sizes(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if not (isinstance(h, int) and isinstance(w, int)) or min(h, w) < ISLAND:
        raise UserError(f"whole-slide size {size}: both sides must be integers >= {ISLAND} px")
    return h, w


def _levels(height: int, width: int) -> list[tuple[int, int]]:
    levels = [(height, width)]
    while max(levels[-1]) > MAX_SIDE_LOWEST:
        h, w = levels[-1]
        levels.append((-(-h // 2), -(-w // 2)))
    return levels


def _plan(height: int, width: int, count: int, seed: int) -> list[_Island]:
    """`count` islands, one per cell of the coarsest grid that has enough cells of >= 256 px."""
    if count == 0:
        return []
    cell = math.sqrt(height * width / count)
    while True:
        ny, nx = max(1, int(height // cell)), max(1, int(width // cell))
        if ny * nx >= count:
            break
        cell *= 0.98
    ch, cw = height / ny, width / nx
    if min(ch, cw) < ISLAND:
        raise UserError(f"{count} islands of {ISLAND} px do not fit a {width}x{height} slide; "
                        "lower --tissue-fraction or enlarge --size")
    rng = np.random.default_rng([seed, _SALT, 1])
    cells = np.sort(rng.permutation(ny * nx)[:count])
    jitter = rng.uniform(0, 1, (count, 2))
    islands = [(int(r * ch + jy * (ch - ISLAND)), int(c * cw + jx * (cw - ISLAND)))
               for (r, c), (jy, jx) in zip((divmod(int(k), nx) for k in cells), jitter)]
    return [_Island(y, x, n) for n, (y, x) in enumerate(sorted(islands))]


# ---------------------------------------------------------------- glass and islands

def _glass_texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _SALT, 2])
    texture = np.empty((_TEXTURE, _TEXTURE, 3), np.uint8)
    for y0 in range(0, _TEXTURE, 64):   # in row blocks: the whole texture as floats would be 12 MB
        noise = rng.standard_normal((min(64, _TEXTURE - y0), _TEXTURE, 3), dtype=np.float32) * _GLASS_SIGMA
        texture[y0:y0 + 64] = np.clip(np.rint(noise), -5, 5) + GLASS
    return texture


def _glass(texture: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    rows = texture[np.arange(y0, y1) % _TEXTURE]
    return np.take(rows, np.arange(x0, x1) % _TEXTURE, axis=1)


def _blob(rng: np.random.Generator) -> np.ndarray:
    """(256, 256) float32: 1 at the island's centre, 0 on its wobbly outline, negative outside."""
    cy, cx = ISLAND / 2 + rng.uniform(-8, 8, 2)
    yy, xx = np.mgrid[0:ISLAND, 0:ISLAND].astype(np.float32) + 0.5
    r, phi = np.hypot(yy - cy, xx - cx), np.arctan2(yy - cy, xx - cx)
    edge = np.ones_like(r)
    for k in range(2, 6):
        edge += rng.uniform(0, 0.1) / (k - 1) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return (1 - r / (_RADIUS * edge)).astype(np.float32)


def _render_island(island: _Island, target: float, seed: int, texture: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """The island's 256 px patch (glass outside its outline), truth and tissue pixel count.

    The outline level is picked so the render's own tissue inside the half-faded outline
    is `target` pixels; the exact count after blending is measured and returned, and the
    caller carries the difference to the next island."""
    rng = np.random.default_rng([seed, _SALT, 3, island.number])
    image, truth = render_glomeruli(ISLAND, island.number, int(rng.integers(2**63)), edges=False)
    blob = _blob(rng)
    border = max(blob[0].max(), blob[-1].max(), blob[:, 0].max(), blob[:, -1].max())
    candidates = np.sort(blob[tissue_mask(image, TISSUE_THRESHOLD)])[::-1]
    k = int(np.clip(round(target), 0, candidates.size))
    level = candidates[k - 1] - _FADE / 2 if k else np.inf
    level = max(level, border)   # alpha is 0 on the square's edge: no straight cut
    alpha = np.clip((blob - level) / _FADE, 0, 1)[..., None]
    glass = _glass(texture, island.y, island.y + ISLAND, island.x, island.x + ISLAND).astype(np.float32)
    patch = np.clip(np.rint(glass + alpha * (image - glass)), 0, 255).astype(np.uint8)
    return patch, truth & (alpha[..., 0] >= 0.5), int(tissue_mask(patch, TISSUE_THRESHOLD).sum())


def _level0_bands(height: int, width: int, islands: list[_Island], per_island: float, seed: int,
                  stats: _Stats) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Level 0 as (image, truth) bands of TILE rows, top to bottom; islands rendered once,
    in raster order, kept only while a band still needs them."""
    texture = _glass_texture(seed)
    rendered: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    made = 0   # islands rendered so far
    for y0 in range(0, height, TILE):
        y1 = min(y0 + TILE, height)
        band, truth = _glass(texture, y0, y1, 0, width), np.zeros((y1 - y0, width), np.uint8)
        while made < len(islands) and islands[made].y < y1:
            target = (made + 1) * per_island - stats.tissue
            patch, mask, count = _render_island(islands[made], target, seed, texture)
            rendered[made] = patch, mask
            stats.tissue += count
            made += 1
        for n in list(rendered):
            island, (patch, mask) = islands[n], rendered[n]
            top, bottom = max(island.y, y0), min(island.y + ISLAND, y1)
            if top < bottom:
                band[top - y0:bottom - y0, island.x:island.x + ISLAND] = patch[top - island.y:bottom - island.y]
                truth[top - y0:bottom - y0, island.x:island.x + ISLAND] = mask[top - island.y:bottom - island.y]
            if island.y + ISLAND <= y1:
                del rendered[n]
        stats.glomerulus += int(truth.sum())
        yield band, truth


# ---------------------------------------------------------------- pyramid plumbing

class _Spool:
    """Bands written once and read back once, zlib-compressed in an anonymous temp file."""

    def __init__(self, file: IO[bytes]):
        self._file, self._items = file, []

    def append(self, band: np.ndarray) -> None:
        data = zlib.compress(memoryview(np.ascontiguousarray(band)), 1)
        self._file.write(data)
        self._items.append((len(data), band.shape, band.dtype))

    def __iter__(self) -> Iterator[np.ndarray]:
        self._file.seek(0)
        for length, shape, dtype in self._items:
            yield np.frombuffer(zlib.decompress(self._file.read(length)), dtype).reshape(shape)


def _halve(band: np.ndarray) -> np.ndarray:
    """2x2 box average (rounded), the odd last row / column repeated. Column chunk by chunk:
    the uint16 sums of a whole 50000 px band would be several times the band itself."""
    h, w, c = band.shape
    out = np.empty((-(-h // 2), -(-w // 2), c), np.uint8)
    step = 2 * TILE
    for x0 in range(0, w, step):
        chunk = band[:, x0:x0 + step]
        chunk = np.pad(chunk, ((0, h % 2), (0, chunk.shape[1] % 2), (0, 0)), mode="edge").astype(np.uint16)
        total = chunk[0::2, 0::2] + chunk[1::2, 0::2] + chunk[0::2, 1::2] + chunk[1::2, 1::2]
        out[:, x0 // 2:x0 // 2 + total.shape[1]] = (total + 2) // 4
    return out


def _tissue_pixels(band: np.ndarray) -> int:
    """serving.tissue's count, tile-wide column chunks at a time (bounded temporaries)."""
    return sum(int(tissue_mask(band[:, x0:x0 + TILE], TISSUE_THRESHOLD).sum()) for x0 in range(0, band.shape[1], TILE))


class _NextLevel:
    """Collects the halves of one level's bands into the next level's TILE-row bands."""

    def __init__(self, spool: _Spool | None):
        self.spool, self._half = spool, None

    def add(self, band: np.ndarray) -> None:
        if self.spool is None:
            return
        half = _halve(band)
        if self._half is None:
            self._half = half
        else:
            self.spool.append(np.concatenate([self._half, half]))
            self._half = None

    def close(self) -> None:
        if self.spool is not None and self._half is not None:
            self.spool.append(self._half)
        self._half = None


def _tiles(bands: Iterable[np.ndarray], width: int, each: Callable[[np.ndarray], None]) -> Iterator[np.ndarray]:
    """Row-major TILE x TILE tiles of the bands (tifffile pads the partial ones). Copies:
    tifffile would copy the strided views anyway, and a view held in its encode buffer
    would keep its whole band alive."""
    for band in bands:
        each(band)
        for x0 in range(0, width, TILE):
            yield np.ascontiguousarray(band[:, x0:x0 + TILE])


# ---------------------------------------------------------------- the slide

def write_whole_slide(path: Path, size: int | tuple[int, int], *, seed: int = 0, tissue_fraction: float = 0.10,
                      mpp: float = TRAINING_MPP, mask_path: Path | None = None, progress: bool = True) -> dict:
    """Write a synthetic PAS slide of `size` px (side, or (height, width)) to `path` as a
    pyramidal OME-TIFF; optionally its truth (uint8, 1 = glomerulus) as a tiled TIFF at
    `mask_path`. Deterministic for (size, seed, tissue_fraction); returns a summary."""
    start = time.perf_counter()
    path = Path(path)
    height, width = _sizes(size)
    if not 0 <= tissue_fraction <= MAX_TISSUE_FRACTION:
        raise UserError(f"tissue fraction {tissue_fraction}: must be between 0 and {MAX_TISSUE_FRACTION}")
    if not mpp > 0:
        raise UserError(f"pixel size {mpp} µm: must be > 0")
    levels = _levels(height, width)
    wanted = tissue_fraction * height * width
    count = round(wanted / _ISLAND_TISSUE)
    islands = _plan(height, width, count, seed)
    stats = _Stats()
    bands = [-(-h // TILE) for h, _ in levels]
    options = dict(photometric="rgb", tile=(TILE, TILE), compression="zlib", compressionargs={"level": 1},
                   resolutionunit="CENTIMETER", maxworkers=min(4, os.cpu_count() or 1), buffersize=8 << 20)
    metadata = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(path))
        tmp_mask = stack.enter_context(atomic_path(mask_path)) if mask_path is not None else None
        bar = stack.enter_context(tqdm(total=sum(bands) + (bands[0] if mask_path else 0), unit="tile row",
                                       desc=f"whole slide {width}x{height}", disable=not progress))

        def spool() -> _Spool:   # beside the output: /tmp may be a small RAM disk
            return _Spool(stack.enter_context(tempfile.TemporaryFile(dir=path.parent)))

        mask_spool = spool() if mask_path is not None else None
        writer = stack.enter_context(tifffile.TiffWriter(tmp, bigtiff=True, ome=True))
        source: Iterable[np.ndarray] = ()
        for k, (h, w) in enumerate(levels):
            following = _NextLevel(spool() if k + 1 < len(levels) else None)

            def each(band: np.ndarray, following: _NextLevel = following) -> None:
                following.add(band)
                bar.update()

            if k == 0:
                source = _level0_image(_level0_bands(height, width, islands, wanted / max(count, 1), seed, stats),
                                       mask_spool, stats)
            ds = 2 ** k
            writer.write(_tiles(source, w, each), shape=(h, w, 3), dtype=np.uint8,
                         resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                         **({"subifds": len(levels) - 1, "metadata": metadata} if k == 0
                            else {"subfiletype": 1, "metadata": None}), **options)
            following.close()
            source = following.spool or ()
        writer.close()
        if tmp_mask is not None and mask_spool is not None:
            def each_mask(_: np.ndarray) -> None:
                bar.update()

            tifffile.imwrite(tmp_mask, _tiles(mask_spool, width, each_mask), shape=(height, width), dtype=np.uint8,
                             photometric="minisblack", resolution=(1e4 / mpp, 1e4 / mpp), metadata=None,
                             **{k: v for k, v in options.items() if k != "photometric"})
    return {"path": str(path), "mask": str(mask_path) if mask_path else None, "size": [height, width],
            "levels": [list(lv) for lv in levels], "islands": len(islands), "seed": seed, "mpp": mpp,
            "tissue_fraction": stats.tissue_measured / (height * width), "glomerulus_pixels": stats.glomerulus,
            "seconds": round(time.perf_counter() - start, 2)}


def _level0_image(bands: Iterator[tuple[np.ndarray, np.ndarray]], mask_spool: _Spool | None,
                  stats: _Stats) -> Iterator[np.ndarray]:
    """The image bands; the truth goes to its spool, and the tissue fraction is measured on
    the very pixels written (the island counts predict it; this checks it)."""
    for band, truth in bands:
        if mask_spool is not None:
            mask_spool.append(truth)
        stats.tissue_measured += _tissue_pixels(band)
        yield band
