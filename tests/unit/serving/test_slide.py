"""serving.slide: levels, pixel size, exact region reads that decode only the tiles touched."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from PIL import Image

from serving import slide as slide_mod
from serving.slide import Level, is_slide, open_slide
from tests.unit.serving.conftest import raises_one_line

RNG = np.random.default_rng(7)
BASE = RNG.integers(0, 256, (300, 500, 3), dtype=np.uint8)
PYRAMID = [BASE, BASE[::2, ::2].copy(), BASE[::4, ::4].copy()]   # any content: reads must return it exactly


def write_ome_subifds(path: Path, levels: list[np.ndarray], mpp: float | None = 0.5, unit: str = "µm",
                      tile: int = 64, **options) -> Path:
    meta: dict = {"axes": "YXS" if levels[0].ndim == 3 else "YX"}
    if mpp is not None:
        meta |= {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
    photometric = "rgb" if levels[0].ndim == 3 and levels[0].shape[2] >= 3 else "minisblack"
    opts = dict(photometric=photometric, tile=(tile, tile), compression="zlib") | options
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=meta, **opts)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, metadata=None, **opts)
    return path


def write_tiled(path: Path, data: np.ndarray, **options) -> Path:
    opts = dict(tile=(64, 64), metadata=None, photometric="rgb" if data.ndim == 3 else "minisblack") | options
    tifffile.imwrite(path, data, **opts)
    return path


# ---------------------------------------------------------------- levels and reads

def test_ome_subifds_levels_mpp_and_exact_reads(tmp_path: Path) -> None:
    path = write_ome_subifds(tmp_path / "s.ome.tif", PYRAMID)
    with open_slide(path) as s:
        assert s.levels == [Level(0, 300, 500, 1.0), Level(1, 150, 250, 2.0), Level(2, 75, 125, 4.0)]
        assert s.channels == 3 and s.mpp == pytest.approx(0.5)
        a0, a1 = s.array(0), s.array(1)
        assert a0.shape == (300, 500, 3) and a1.shape == (150, 250, 3)
        region = a0[37:201, 60:333]   # crosses tile borders on both axes
        assert region.dtype == np.uint8 and region.flags.c_contiguous
        np.testing.assert_array_equal(region, BASE[37:201, 60:333])
        np.testing.assert_array_equal(a1[10:149, 70:250], PYRAMID[1][10:149, 70:250])
        np.testing.assert_array_equal(s.read(2), PYRAMID[2])
        np.testing.assert_array_equal(a0[290:400, 490:900], BASE[290:, 490:])   # clipped as numpy does


def test_generic_reduced_page_pyramid(tmp_path: Path) -> None:
    """A plain (non-OME) TIFF whose reduced-resolution pages follow level 0."""
    path = tmp_path / "generic.tif"
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(PYRAMID):
            tw.write(level, tile=(64, 64), photometric="rgb", metadata=None, subfiletype=int(i > 0),
                     resolution=(20000 / 2 ** i, 20000 / 2 ** i), resolutionunit="CENTIMETER")
    assert is_slide(path)
    with open_slide(path) as s:
        assert [lv.downsample for lv in s.levels] == [1.0, 2.0, 4.0]
        assert s.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(s.array(2)[5:70, 3:120], PYRAMID[2][5:70, 3:120])


def test_grey_and_rgba_channels(tmp_path: Path) -> None:
    grey = BASE[..., 0].copy()
    with open_slide(write_ome_subifds(tmp_path / "g.ome.tif", [grey, grey[::2, ::2].copy()])) as s:
        assert s.channels == 1 and s.array(0).shape == (300, 500, 1)
        np.testing.assert_array_equal(s.array(1)[3:40, 7:99], grey[::2, ::2][3:40, 7:99, None])
    rgba = np.concatenate([BASE, np.full((300, 500, 1), 200, np.uint8)], axis=-1)
    with open_slide(write_tiled(tmp_path / "rgba.tif", rgba, extrasamples=["unassalpha"])) as s:
        assert s.channels == 3
        np.testing.assert_array_equal(s.read(0), BASE)


# ---------------------------------------------------------------- pixel size

@pytest.mark.parametrize(("unit", "size", "mpp"), [("µm", 0.25, 0.25), ("nm", 500, 0.5), ("mm", 0.001, 1.0)])
def test_mpp_from_ome_units(tmp_path: Path, unit: str, size: float, mpp: float) -> None:
    with open_slide(write_ome_subifds(tmp_path / "u.ome.tif", PYRAMID[:2], mpp=size, unit=unit)) as s:
        assert s.mpp == pytest.approx(mpp)


@pytest.mark.parametrize(("resolution", "unit", "mpp"), [
    ((20000, 20000), "CENTIMETER", 0.5),
    ((50800, 50800), "INCH", 0.5),
    ((20000, 20000), "NONE", None),        # no unit: the numbers mean nothing
    ((72, 72), "INCH", None),              # a screen-dpi default, not a microscope
])
def test_mpp_from_resolution_tags(tmp_path: Path, resolution, unit: str, mpp: float | None) -> None:
    path = write_tiled(tmp_path / "r.tif", BASE, resolution=resolution, resolutionunit=unit)
    with open_slide(path) as s:
        assert s.mpp == (pytest.approx(mpp) if mpp else None)


def test_mpp_from_svs_description(tmp_path: Path) -> None:
    path = write_tiled(tmp_path / "fake.svs", BASE,
                       description="Aperio Image Library v12.0\n500x300 -> 500x300|AppMag = 20|MPP = 0.2520")
    assert is_slide(path)
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.252)


# ---------------------------------------------------------------- choosing a level

def test_level_for_by_level_and_by_mpp(tmp_path: Path) -> None:
    with open_slide(write_ome_subifds(tmp_path / "s.ome.tif", PYRAMID)) as s:   # 0.5, 1.0, 2.0 µm/px
        assert s.level_for() == 0
        assert s.level_for(level=2) == 2
        assert [s.level_for(mpp=m) for m in (0.1, 0.5, 0.8, 1.0, 1.5, 2.0, 9.0)] == [0, 0, 1, 1, 2, 2, 2]
        assert s.level_for(mpp=0.7071) == 0   # a log-scale tie goes to the finer level
        message = raises_one_line("no level 3", s.level_for, level=3)
        assert "0 (500x300, /1)" in message and "2 (125x75, /4)" in message and "s.ome.tif" in message
        raises_one_line("not both", s.level_for, level=1, mpp=1.0)
        raises_one_line("must be > 0", s.level_for, mpp=0)
        raises_one_line("no level -1", s.array, -1)
        assert s.thumbnail_level(300) == 1 and s.thumbnail_level(10_000) == 0 and s.thumbnail_level(10) == 2


def test_level_for_mpp_without_pixel_size_says_use_level(tmp_path: Path) -> None:
    with open_slide(write_ome_subifds(tmp_path / "nompp.ome.tif", PYRAMID, mpp=None)) as s:
        assert s.mpp is None
        message = raises_one_line("records no pixel size", s.level_for, mpp=0.5)
        assert "--level" in message and "nompp.ome.tif" in message


# ---------------------------------------------------------------- is_slide

def test_is_slide_true_and_false_cases(tmp_path: Path) -> None:
    assert is_slide(write_ome_subifds(tmp_path / "p.ome.tif", PYRAMID))
    assert is_slide(write_tiled(tmp_path / "tiled.tiff", BASE))
    Image.fromarray(BASE).save(tmp_path / "a.png")
    Image.fromarray(BASE).save(tmp_path / "strip.tif")
    tifffile.imwrite(tmp_path / "strip2.tif", BASE, photometric="rgb")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    write_tiled(tmp_path / "tiled.png", BASE)   # TIFF content, but not a slide suffix
    for name in ("a.png", "strip.tif", "strip2.tif", "junk.tif", "tiled.png", "missing.tif"):
        assert not is_slide(tmp_path / name), name


# ---------------------------------------------------------------- errors

def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    assert "junk.tif" in raises_one_line("not a readable TIFF slide", open_slide, tmp_path / "junk.tif")
    raises_one_line("file not found", open_slide, tmp_path / "missing.tif")


def test_non_uint8_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = write_tiled(tmp_path / "deep.tif", BASE.astype(np.uint16) * 257)
    assert "deep.tif" in raises_one_line("convert the slide to 8-bit", open_slide, path)


def test_unsupported_colour_layouts(tmp_path: Path) -> None:
    palette = write_tiled(tmp_path / "pal.tif", BASE[..., 0].copy(), photometric="palette",
                          colormap=np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1)))
    raises_one_line("PALETTE is not supported", open_slide, palette)
    cmyk = write_tiled(tmp_path / "cmyk.tif", np.concatenate([BASE, BASE[..., :1]], -1), photometric="separated")
    raises_one_line("SEPARATED is not supported", open_slide, cmyk)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack([BASE[..., 0]] * 5), tile=(64, 64), photometric="minisblack")
    raises_one_line("unsupported layout", open_slide, stack)


def test_missing_codec_says_pip_install_imagecodecs(tmp_path: Path, monkeypatch) -> None:
    path = write_tiled(tmp_path / "j.tif", BASE, compression="jpeg")
    with open_slide(path) as s:   # imagecodecs is installed here: it reads
        assert s.read(0).shape == (300, 500, 3)
    monkeypatch.setattr(slide_mod, "TIFF", SimpleNamespace(DECOMPRESSORS={}))   # as without imagecodecs
    assert "j.tif" in raises_one_line("JPEG.*pip install imagecodecs", open_slide, path)


# ---------------------------------------------------------------- laziness

def test_region_read_decodes_only_the_tiles_it_touches(tmp_path: Path) -> None:
    """8192 x 8192 RGB is 201 MB decoded; a 300 px region must cost a few tiles' worth."""
    side, tile = 8192, 512
    n = side // tile

    def tiles():
        for ty in range(n):
            for tx in range(n):
                yield np.full((tile, tile, 3), (ty * n + tx) % 251, np.uint8)

    path = tmp_path / "big.tif"
    tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression="zlib", metadata=None)
    assert path.stat().st_size < 5_000_000   # constant tiles compress to almost nothing
    with open_slide(path) as s:
        tracemalloc.start()
        try:
            region = s.array(0)[4000:4300, 5000:5300]   # 4 tiles: (7, 9), (7, 10), (8, 9), (8, 10)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    full = side * side * 3
    assert peak < full / 20, f"peak {peak / 1e6:.1f} MB: the read decoded far more than the 4 tiles it touches"
    assert region[0, 0, 0] == (7 * n + 9) % 251 and region[-1, -1, 0] == (8 * n + 10) % 251
