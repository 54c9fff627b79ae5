"""common.imageio: image conversion rules, palette PNGs, and unreadable or empty files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.errors import ImageError
from common.imageio import read_image, save_palette_png
from pipeline.config.schema import MaskParams
from pipeline.data.masks import read_mask

MASK = MaskParams(rgb_map={(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2}, class_names=["bg", "CKD", "healthy"])


def _ids(shape=(6, 5), seed=0):
    return np.random.default_rng(seed).integers(0, 3, shape).astype(np.uint8)


def test_palette_png_has_seed_colours_and_reads_back(tmp_path):
    ids = _ids()
    path = tmp_path / "pred.png"
    save_palette_png(path, ids, MASK.colours)
    with Image.open(path) as img:
        assert img.mode == "P"
        assert img.getpalette()[:9] == [0, 0, 0, 255, 0, 0, 0, 255, 0]
        np.testing.assert_array_equal(np.asarray(img.convert("RGB"))[ids == 2][0], [0, 255, 0])
    np.testing.assert_array_equal(read_mask(path, MASK), ids)
    assert not list(tmp_path.glob(".*")), "atomic write left a temp file"


def test_image_conversion_rules(tmp_path):
    grey = np.arange(30, dtype=np.uint8).reshape(6, 5)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (6, 5, 3) and (out[..., 0] == grey).all() and (out[..., 2] == grey).all()

    deep = (np.arange(30, dtype=np.uint16).reshape(6, 5) * 100 + 1000)
    Image.fromarray(deep).save(tmp_path / "d.png")
    out = read_image(tmp_path / "d.png")
    assert out.min() == 0 and out.max() == 255 and out[0, 1, 0] == round(100 * 255 / 2900)

    rgba = np.dstack([np.full((6, 5), v, np.uint8) for v in (10, 20, 30, 0)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert tuple(read_image(tmp_path / "a.png")[0, 0]) == (10, 20, 30)

    pal = Image.fromarray(np.ones((6, 5), np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert tuple(read_image(tmp_path / "p.png")[2, 2]) == (9, 8, 7)

    rgb = np.dstack([np.full((6, 5), v, np.uint8) for v in (200, 100, 50)])
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert read_image(tmp_path / "c.png", channels=1).shape == (6, 5, 1)
    assert read_image(tmp_path / "c.png", channels=1)[0, 0, 0] == round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)


def test_unreadable_and_empty_images(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"zero.png: file is empty \(0 bytes\)"):
        read_image(tmp_path / "zero.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageError, match="junk.png: not a readable image"):
        read_image(tmp_path / "junk.png")
    good = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(good)
    good.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError, match="cut.png: not a readable image"):
        read_image(good)
