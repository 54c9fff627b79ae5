"""Pair validation over many masks, degenerate images, and the mini_test fallback of the
samples the panels and epoch-change inference show."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from common.errors import DataError
from pipeline.data.masks import UnknownColours
from pipeline.data.pairs import MIN_SIDE, find_pairs, mini_test_pairs, validate_pairs
from pipeline.data.samples import load_infer_samples, load_large_samples
from pipeline.layout import Layout
from tests.unit.data.test_tfdata import MASK, write_split


def test_unknown_colours_of_all_masks_make_one_error(tmp_path):
    split = write_split(tmp_path / "train", n=4)
    for i, colour in ((1, (128, 0, 0)), (3, (0, 0, 255))):
        mask = np.asarray(Image.open(split / "masks" / f"{i}.png").convert("RGB")).copy()
        mask[0, :2] = colour
        Image.fromarray(mask).save(split / "masks" / f"{i}.png")
    with pytest.raises(UnknownColours) as err:
        validate_pairs(find_pairs(split), MASK)
    msg = str(err.value)
    assert msg.startswith(f"{split / 'masks' / '1.png'} (and 1 more masks): colour(s) not in mask.rgb_map: ")
    assert "(0, 0, 255) x 2 px, (128, 0, 0) x 2 px" in msg
    assert "1 are blends of two or three map colours, 1 are not" in msg and "color_tolerance: 255" in msg


def test_degenerate_images_are_refused_in_one_line(tmp_path):
    split = write_split(tmp_path / "train", n=2)
    Image.fromarray(np.zeros((1, 40), np.uint8)).save(split / "images" / "1.png")
    Image.fromarray(np.zeros((1, 40, 3), np.uint8)).save(split / "masks" / "1.png")
    validate_pairs(find_pairs(split), MASK)   # no minimum asked for
    with pytest.raises(DataError, match=rf"images/1.png: 40x1 px is too small to import; every side must be at "
                                        rf"least {MIN_SIDE} px$"):
        validate_pairs(find_pairs(split), MASK, min_side=MIN_SIDE)


def _data(root, mini: bool):
    data = root / "data" / "kidney-t2w"
    write_split(data / "test", n=5, size=32)
    if mini:
        write_split(data / "mini_test", n=3, size=48, seed=1)
    else:   # what prepare leaves when the import has no mini_test: empty folders
        (data / "mini_test" / "images").mkdir(parents=True)
        (data / "mini_test" / "masks").mkdir()
    return data


def test_mini_test_pairs_fall_back_to_the_first_test_images(tmp_path, caplog):
    with_mini = _data(tmp_path / "a", mini=True)
    assert [p.image.parent.parent.name for p in mini_test_pairs(with_mini)] == ["mini_test"] * 3
    assert len(mini_test_pairs(with_mini, 2)) == 2
    without = _data(tmp_path / "b", mini=False)
    with caplog.at_level(logging.INFO, logger="pipeline.data.pairs"):
        pairs = mini_test_pairs(without, 2)
    assert [p.image for p in pairs] == [p.image for p in find_pairs(without / "test")][:2]
    assert f"{without} has no mini_test images: using the first 2 test images instead" in caplog.text
    assert len(mini_test_pairs(without, fallback=4)) == 4 and len(mini_test_pairs(without)) == 5   # 5 < 6
    shutil.rmtree(without / "mini_test")   # no folder at all: the same
    assert len(mini_test_pairs(without, 3)) == 3


def test_samples_without_mini_test_are_test_images(tmp_path, tiny_params):
    _data(tmp_path, mini=False)
    layout = Layout(tmp_path, tiny_params)
    images, truths = load_infer_samples(layout, 2)
    assert images.shape == (2, 32, 32, 3) and len(truths) == 2 and truths[0].shape == (32, 32, 3)
    large, large_truths = load_large_samples(layout, 3)
    assert len(large) == len(large_truths) == 3
    _data(tmp_path / "m", mini=True)
    images, _ = load_infer_samples(Layout(tmp_path / "m", tiny_params), 2)   # 48 px mini_test resized
    assert images.shape == (2, 32, 32, 3)
