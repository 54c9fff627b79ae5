"""Folder validation errors, pair validation over many masks, degenerate images, and the
mini_test fallback."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from common.errors import DataError, ImageError
from pipeline.data.masks import UnknownColours
from pipeline.data.pairs import MIN_SIDE, find_pairs, load_split, mini_test_pairs, validate_pairs
from tests.unit.data.conftest import MASK, write_data, write_split


def test_pairs_and_pair_errors(tmp_path):
    split = write_split(tmp_path / "train")
    assert [p.image.name for p in find_pairs(split)] == ["0.png", "1.png", "2.png", "3.png"]
    (split / "masks" / "2.png").unlink()
    with pytest.raises(DataError, match=r"images/2.png: mask missing \(expected .*masks/2.png\)"):
        find_pairs(split)
    (split / "images" / "2.png").unlink()
    (split / "images" / "1.png").unlink()
    with pytest.raises(DataError, match=r"masks/1.png: image missing"):
        find_pairs(split)
    empty = tmp_path / "valid"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(DataError, match="valid: split is empty"):
        find_pairs(empty)
    with pytest.raises(DataError, match="test/images: folder missing"):
        find_pairs(tmp_path / "test")


def test_size_mismatch_and_bad_files(tmp_path):
    split = write_split(tmp_path / "train")
    Image.fromarray(np.zeros((16, 12, 3), np.uint8)).save(split / "masks" / "0.png")
    with pytest.raises(DataError, match=r"0.png: image is 16x16 but its mask 0.png is 12x16"):
        validate_pairs(find_pairs(split), MASK)
    split = write_split(tmp_path / "valid")
    with pytest.raises(DataError, match="differs from the model size 32x32"):
        load_split(tmp_path, "valid", MASK, (32, 32))
    (split / "images" / "3.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"3.png: file is empty"):
        validate_pairs(find_pairs(split), MASK)


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


def test_mini_test_pairs_fall_back_to_the_first_test_images(tmp_path, caplog):
    with_mini = write_data(tmp_path / "a", mini=True)
    assert [p.image.parent.parent.name for p in mini_test_pairs(with_mini)] == ["mini_test"] * 3
    assert len(mini_test_pairs(with_mini, 2)) == 2
    without = write_data(tmp_path / "b", mini=False)
    with caplog.at_level(logging.INFO, logger="pipeline.data.pairs"):
        pairs = mini_test_pairs(without, 2)
    assert [p.image for p in pairs] == [p.image for p in find_pairs(without / "test")][:2]
    assert f"{without} has no mini_test images: using the first 2 test images instead" in caplog.text
    assert len(mini_test_pairs(without, fallback=4)) == 4 and len(mini_test_pairs(without)) == 5   # 5 < 6
    shutil.rmtree(without / "mini_test")   # no folder at all: the same
    assert len(mini_test_pairs(without, 3)) == 3
