"""Mask colours <-> class ids, colour modes, and bad-mask errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from pipeline.config.load import params_from_dict
from pipeline.data.masks import SnapCount, UnknownColours, blend_tolerant, ids_to_rgb, read_mask, rgb_to_ids
from common.errors import DataError, ParamsError
from pipeline.config.schema import MaskParams
from tests.conftest import tiny_dict

MASK = MaskParams(rgb_map={(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2}, class_names=["bg", "CKD", "healthy"])


def _ids(shape=(6, 5), seed=0):
    return np.random.default_rng(seed).integers(0, 3, shape).astype(np.uint8)


def test_colours_and_ids_round_trip():
    ids = _ids()
    rgb = ids_to_rgb(ids, MASK.colours)
    assert rgb.shape == (6, 5, 3) and tuple(rgb[ids == 1][0]) == (255, 0, 0)
    np.testing.assert_array_equal(rgb_to_ids(rgb, MASK), ids)


def test_unknown_colour_names_file_colour_and_count(tmp_path):
    rgb = ids_to_rgb(_ids(), MASK.colours)
    rgb[0, :3] = (250, 5, 3)  # a JPEG-ish red
    path = tmp_path / "m.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(DataError) as err:
        read_mask(path, MASK)
    assert str(path) in str(err.value) and "(250, 5, 3) x 3 px" in str(err.value)
    assert "none is a blend of map colours (up to 3.0 RGB from one, e.g. (250, 5, 3))" in str(err.value)
    assert "color_mode: tolerance with color_tolerance: 3 maps every pixel" in str(err.value)
    assert "color_mode: nearest" in str(err.value) and "\n" not in str(err.value)
    tolerant = MaskParams(rgb_map=MASK.rgb_map, class_names=MASK.class_names, color_mode="tolerance",
                          color_tolerance=3)
    assert (read_mask(path, tolerant)[0, :3] == 1).all()
    too_tight = MaskParams(rgb_map=MASK.rgb_map, class_names=MASK.class_names, color_mode="tolerance",
                           color_tolerance=2)
    with pytest.raises(DataError, match=r"color_tolerance: 3 maps every pixel .*\(now color_mode: tolerance, "
                                        r"color_tolerance: 2\)"):
        read_mask(path, too_tight)


def _resized_mask(size=(61, 47)):
    """A palette mask (black background, red and green regions that touch) resized the way
    the seed's generator did: to RGB, then bilinear, so every class border is a blend."""
    ids = np.zeros((24, 20), np.uint8)
    ids[3:12, 2:10], ids[12:20, 6:16], ids[8:14, 9:14] = 1, 2, 1
    img = Image.fromarray(ids, mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    big = np.asarray(img.convert("RGB").resize(size, Image.BILINEAR))
    return ids, big


def _mask(**kw):
    return MaskParams(rgb_map=MASK.rgb_map, class_names=MASK.class_names, **kw)


def test_resized_mask_blends_are_named_and_snapped_in_tolerance_mode(tmp_path):
    ids, big = _resized_mask()
    colours = {tuple(c) for c in big.reshape(-1, 3).tolist()} - set(MASK.rgb_map)
    assert len(colours) > 20   # the blends
    path = tmp_path / "resized.png"
    Image.fromarray(big).save(path)
    with pytest.raises(UnknownColours) as err:
        read_mask(path, MASK)
    msg = str(err.value)
    assert msg.startswith(f"{path}: colour(s) not in mask.rgb_map: ") and "\n" not in msg
    assert "all are blends of two or three map colours" in msg
    assert "color_mode: tolerance with color_tolerance: 1 maps every pixel" in msg and "color_mode: nearest" in msg

    count = SnapCount()
    got = read_mask(path, _mask(color_mode="tolerance", color_tolerance=1), count)
    exact = {tuple(c) for c in MASK.rgb_map}
    on_map = np.array([tuple(c) in exact for c in big.reshape(-1, 3).tolist()]).reshape(big.shape[:2])
    assert count.pixels == big.shape[0] * big.shape[1] and count.snapped == int((~on_map).sum()) > 0
    np.testing.assert_array_equal(got[on_map], rgb_to_ids(big[on_map][None], MASK)[0])
    # A blend goes to the class it is mostly made of (the interpolation weights), bar near-ties.
    weights = np.stack([np.asarray(Image.fromarray((ids == k).astype(np.float32)).resize(big.shape[1::-1],
                                                                                        Image.BILINEAR))
                        for k in range(3)], -1)
    top2 = np.sort(weights, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 0.1
    assert (got[clear] == weights.argmax(-1)[clear]).mean() > 0.99
    np.testing.assert_array_equal(read_mask(path, _mask(color_mode="nearest")), got)


def test_a_foreign_colour_stays_an_error_in_tolerance_mode(tmp_path):
    _, big = _resized_mask()
    big = big.copy()
    big[0, :4] = (0, 0, 255)   # blue: no blend of black, red and green
    path = tmp_path / "blue.png"
    Image.fromarray(big).save(path)
    with pytest.raises(UnknownColours) as err:
        read_mask(path, _mask(color_mode="tolerance", color_tolerance=1))
    msg = str(err.value)
    assert "(0, 0, 255) x 4 px; none is a blend of map colours (up to 255.0 RGB from one, e.g. (0, 0, 255))" in msg
    assert "color_tolerance: 255 maps every pixel" in msg and "(now color_mode: tolerance, color_tolerance: 1)" in msg
    with pytest.raises(UnknownColours) as err:   # in exact mode: both kinds, counted apart
        read_mask(path, MASK)
    assert "are blends of two or three map colours, 1 are not (up to 255.0 RGB" in str(err.value)
    count = SnapCount()
    got = read_mask(path, _mask(color_mode="nearest"), count)
    assert (got[0, :4] == 0).all() and count.snapped > 4   # blue is nearest to black


def test_blend_tolerant_reads_resized_masks_and_keeps_a_looser_rule(tmp_path):
    _, big = _resized_mask()
    path = tmp_path / "resized.png"
    Image.fromarray(big).save(path)
    rules = blend_tolerant(MASK)
    assert (rules.color_mode, rules.color_tolerance, rules.rgb_map) == ("tolerance", 1.0, MASK.rgb_map)
    count = SnapCount()
    read_mask(path, rules, count)
    assert count.snapped > 0
    for kept in (_mask(color_mode="nearest"), _mask(color_mode="tolerance", color_tolerance=30)):
        assert blend_tolerant(kept) is kept


def test_exact_mode_counts_nothing_snapped(tmp_path):
    ids = _ids()
    count = SnapCount()
    np.testing.assert_array_equal(rgb_to_ids(ids_to_rgb(ids, MASK.colours), MASK, count=count), ids)
    assert count == SnapCount(pixels=ids.size, snapped=0)


@pytest.mark.parametrize(("mask", "expected"), [
    ({"color_mode": "tolerance"}, "color_mode: tolerance needs color_tolerance > 0"),
    ({"color_tolerance": 40}, "color_tolerance 40 is used only by color_mode: tolerance (now exact)"),
    ({"color_mode": "nearest", "color_tolerance": 3}, "(now nearest)"),
    ({"color_mode": "fuzzy"}, "mask.color_mode"),
])
def test_colour_mode_params_are_validated_in_one_line(mask, expected):
    raw = tiny_dict()
    raw["mask"].update(mask)
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw, source="params.yaml")
    assert expected in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValidationError):
        _mask(**mask)


def test_single_channel_masks(tmp_path):
    ids = _ids()
    Image.fromarray(ids, mode="L").save(tmp_path / "index.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "index.png", MASK), ids)
    Image.fromarray(ids.astype(np.uint16) * 1000).save(tmp_path / "deep.png")
    with pytest.raises(DataError, match="16-bit mask values up to 2000"):
        read_mask(tmp_path / "deep.png", MASK)
    grey = MaskParams(rgb_map={(0, 0, 0): 0, (255, 255, 255): 1}, class_names=["bg", "fg"])
    Image.fromarray((ids.clip(0, 1) * 255).astype(np.uint8), mode="L").save(tmp_path / "binary.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "binary.png", grey), ids.clip(0, 1))


def test_rgba_mask_drops_alpha(tmp_path):
    ids = _ids()
    rgba = np.concatenate([ids_to_rgb(ids, MASK.colours), np.full((6, 5, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "a.png", MASK), ids)
