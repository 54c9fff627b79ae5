"""Whole-slide images read region by region: tiled, pyramidal TIFF / OME-TIFF / SVS.

A 50000 px slide is 7.5 GB of RGB; decoding it whole (common.imageio.read_image, Pillow) is
not an option. tifffile exposes each pyramid level as a zarr store whose chunks are the
TIFF's own tiles, so slicing a level decodes only the tiles the slice touches. This module
turns that into a small, typed view: the levels and their downsamples, the pixel size (mpp)
from whichever metadata the file carries, and uint8 (h, w, C) regions with C = 3 (RGB,
alpha dropped) or 1 (grey), the layout the predictor takes. Plain strip TIFFs, PNGs and
JPEGs are not slides (is_slide) and keep going through common.imageio.read_image.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import tifffile
import zarr
from tifffile import PHOTOMETRIC, RESUNIT, TIFF

from common.errors import UserError

SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8")   # ".ome.tif" has suffix .tif
# Microns per unit of OME's PhysicalSizeXUnit (the OME default is µm; both micro signs occur).
_OME_UNIT_UM = {"µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3, "Å": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6}
# Above this a "pixel size" is a screen-dpi default (72 dpi = 353 µm), not a microscope's.
_MAX_PLAUSIBLE_MPP = 100.0
_OK_PHOTOMETRIC = (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR)


@dataclass(frozen=True)
class Level:
    """One pyramid level; downsample = level-0 pixels per pixel of this level."""

    index: int
    height: int
    width: int
    downsample: float


@dataclass(frozen=True)
class _Layout:
    """How the series' axes map to (H, W, C): leading singleton axes, where the samples are."""

    lead: int               # leading size-1 axes (T, Z, ...) indexed at 0
    samples: str            # "none" (Y, X), "last" (Y, X, S) or "first" (S, Y, X: planar)
    keep: int               # samples kept: 1 (grey) or 3 (RGB; alpha dropped)


class LevelArray:
    """One level, lazily: `a[y0:y1, x0:x1]` decodes only the TIFF tiles it touches and
    returns uint8 (h, w, C)."""

    def __init__(self, path: Path, level: int, array: Any, layout: _Layout, shape: tuple[int, int, int]):
        self._path, self._level, self._array, self._layout = path, level, array, layout
        self.shape = shape
        self.dtype = np.dtype(np.uint8)
        # The stored tile (row, column) size: readers fetch whole tiles (serving.tiling's chunk cache).
        yx = layout.lead + (1 if layout.samples == "first" else 0)
        self.chunks: tuple[int, int] = (int(array.chunks[yx]), int(array.chunks[yx + 1]))

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
            raise TypeError("index a slide level with two slices: a[y0:y1, x0:x1]")
        ys, xs = key
        lay = self._layout
        lead = (0,) * lay.lead
        if lay.samples == "first":
            index = (*lead, slice(0, lay.keep), ys, xs)
        elif lay.samples == "last":
            index = (*lead, ys, xs, slice(0, lay.keep))
        else:
            index = (*lead, ys, xs)
        try:
            region = np.asarray(self._array[index])
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise UserError(f"{self._path}: level {self._level} cannot be decoded ({exc}); "
                            "re-export the slide or pip install imagecodecs") from None
        if lay.samples == "first":
            region = np.moveaxis(region, 0, -1)
        elif lay.samples == "none":
            region = region[..., None]
        return np.ascontiguousarray(region, dtype=np.uint8)


class Slide:
    """An open slide (a context manager): its levels, channels, level-0 microns per pixel."""

    def __init__(self, path: Path, tif: tifffile.TiffFile, series: tifffile.TiffPageSeries,
                 levels: list[Level], layout: _Layout, mpp: float | None):
        self.path, self.levels, self.mpp = path, levels, mpp
        self.channels = layout.keep
        self._tif, self._series, self._layout = tif, series, layout
        self._arrays: dict[int, LevelArray] = {}
        self._stores: list[Any] = []

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for store in self._stores:
            store.close()
        self._stores.clear()
        self._arrays.clear()
        self._tif.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, levels={self._level_list()}, channels={self.channels}, mpp={self.mpp})"

    def _level_list(self) -> str:
        return ", ".join(f"{lv.index} ({lv.width}x{lv.height}, /{lv.downsample:g})" for lv in self.levels)

    def _check_level(self, level: int) -> Level:
        if not isinstance(level, int) or not 0 <= level < len(self.levels):
            raise UserError(f"{self.path}: no level {level}; the levels are {self._level_list()}")
        return self.levels[level]

    def array(self, level: int) -> LevelArray:
        """Level `level` as a lazy (H, W, C) uint8 array."""
        lv = self._check_level(level)
        if level not in self._arrays:
            store = self._series.aszarr(level=level)
            self._stores.append(store)
            self._arrays[level] = LevelArray(self.path, level, zarr.open(store, mode="r"), self._layout,
                                             (lv.height, lv.width, self.channels))
        return self._arrays[level]

    def read(self, level: int) -> np.ndarray:
        """A whole level as uint8 (H, W, C): for small levels (thumbnails, tissue masks)."""
        return self.array(level)[:, :]

    def level_for(self, *, level: int | None = None, mpp: float | None = None) -> int:
        """The level asked for (--level N) or the one whose mpp is nearest `mpp` (on a log
        scale, so 1.0 is as near 0.5 as 2.0; a tie goes to the finer level); neither: 0."""
        if level is not None and mpp is not None:
            raise UserError(f"{self.path}: give a level or a pixel size (mpp), not both")
        if level is not None:
            return self._check_level(level).index
        if mpp is None:
            return 0
        if not mpp > 0:
            raise UserError(f"{self.path}: the pixel size asked for must be > 0 µm, got {mpp}")
        if self.mpp is None:
            raise UserError(f"{self.path}: the slide records no pixel size (mpp); choose a level with --level N "
                            f"(levels: {self._level_list()})")
        base = self.mpp
        return min(self.levels, key=lambda lv: (round(abs(math.log(base * lv.downsample / mpp)), 9), lv.index)).index

    def thumbnail_level(self, max_side: int = 4096) -> int:
        """The finest level whose larger side is <= max_side (the coarsest if none is)."""
        for lv in self.levels:
            if max(lv.height, lv.width) <= max_side:
                return lv.index
        return self.levels[-1].index


# ---------------------------------------------------------------- opening

def _open_tiff(path: Path) -> tifffile.TiffFile:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"{path}: not a readable TIFF slide ({exc}); re-export it as a tiled (pyramidal) TIFF") from None


def is_slide(path: Path) -> bool:
    """True for a TIFF-family file that is tiled or has more than one level (a pyramid as
    series levels, SubIFDs, or SVS); plain strip TIFFs and every other format: False."""
    path = Path(path)
    if path.suffix.lower() not in SLIDE_SUFFIXES or not path.is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return bool(tif.is_svs or page.is_tiled or page.subifds or len(tif.series[0].levels) > 1)
    except Exception:  # noqa: BLE001 - anything tifffile cannot parse is not a slide; read_image reports it
        return False


def _layout(path: Path, series: tifffile.TiffPageSeries) -> _Layout:
    axes, shape = series.axes, series.shape
    lead = 0
    while len(axes) - lead > 2 and shape[lead] == 1 and axes[lead] not in "YX":
        lead += 1
    rest, sizes = axes[lead:], shape[lead:]
    bad = UserError(f"{path}: unsupported layout (axes {axes}, shape {shape}); convert the slide to 8-bit "
                    "RGB or greyscale")
    if rest == "YX":
        return _Layout(lead, "none", 1)
    if len(rest) != 3 or sizes[-1 if rest.endswith("S") else 0] not in (1, 2, 3, 4):
        raise bad
    if rest == "YXS":
        n, samples = sizes[2], "last"
    elif rest in ("SYX", "CYX"):
        n, samples = sizes[0], "first"
    else:
        raise bad
    return _Layout(lead, samples, 1 if n <= 2 else 3)   # grey+alpha -> grey, RGBA -> RGB


def _codec_check(path: Path, page: tifffile.TiffPage) -> None:
    try:
        TIFF.DECOMPRESSORS[page.compression]
    except KeyError:
        name = getattr(page.compression, "name", str(page.compression))
        raise UserError(f"{path}: tiles compressed as {name}, which needs the imagecodecs package: "
                        "pip install imagecodecs") from None


def _ome_mpp(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    scale = _OME_UNIT_UM.get(pixels.attrib.get("PhysicalSizeXUnit", "µm"))
    try:
        return float(pixels.attrib["PhysicalSizeX"]) * scale if scale else None
    except ValueError:
        return None


def _svs_mpp(description: str) -> float | None:
    """Aperio writes `...|MPP = 0.2520|...` into the first ImageDescription."""
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    try:
        return float(match.group(1)) if match else None
    except ValueError:
        return None


def _tag_mpp(page: tifffile.TiffPage) -> float | None:
    """Level-0 microns per pixel from XResolution/ResolutionUnit; unit NONE means unknown."""
    res, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if res is None or unit is None:
        return None
    um = {RESUNIT.CENTIMETER: 1e4, RESUNIT.INCH: 25400.0}.get(unit.value)
    num, den = res.value
    if um is None or num <= 0 or den <= 0:
        return None
    return um * den / num


def _mpp(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> float | None:
    """Level-0 µm per pixel: OME-XML first, then the Aperio description, then the tags."""
    mpp = None
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata)
    if mpp is None and tif.is_svs:
        mpp = _svs_mpp(page.description)
    if mpp is None:
        mpp = _tag_mpp(page)
    return mpp if mpp is not None and 0 < mpp <= _MAX_PLAUSIBLE_MPP else None


def open_slide(path: Path) -> Slide:
    """Open a slide for region reads; every problem is a one-line UserError naming the fix."""
    path = Path(path)
    tif = _open_tiff(path)
    try:
        if not tif.series:
            raise UserError(f"{path}: the TIFF holds no image; re-export the slide")
        series = tif.series[0]
        page = series.levels[0].keyframe
        if series.dtype != np.uint8:
            raise UserError(f"{path}: {series.dtype} samples; convert the slide to 8-bit (uint8) RGB or greyscale")
        if page.photometric not in _OK_PHOTOMETRIC:
            raise UserError(f"{path}: colour layout {page.photometric.name} is not supported; convert the slide "
                            "to 8-bit RGB or greyscale")
        layout = _layout(path, series)
        _codec_check(path, page)
        y, x = series.axes.index("Y"), series.axes.index("X")
        width0 = series.levels[0].shape[x]
        levels = [Level(i, lv.shape[y], lv.shape[x], width0 / lv.shape[x]) for i, lv in enumerate(series.levels)]
        return Slide(path, tif, series, levels, layout, _mpp(tif, page))
    except BaseException:
        tif.close()
        raise
