"""serving.settings.TilingSettings: a settings object and keyword changes agree, and every bad
setting is refused in one line."""

from __future__ import annotations

import numpy as np

from serving.load import load_predictor
from serving.predictor import TiledPredictor
from serving.settings import MAX_TILE_SIZE, TilingSettings
from tests.unit.serving.conftest import raises_one_line, ramp_image


def test_settings_object_and_keyword_changes_are_the_same(models):
    settings = TilingSettings(overlap=0.5, blend="constant", batch_size=3)
    a = TiledPredictor.from_onnx(models["rgb"], settings)
    b = TiledPredictor.from_onnx(models["rgb"], overlap=0.5, blend="constant", batch_size=3)
    assert a.settings == b.settings == settings.replace(tile_size=32)   # unset tile: the card's size
    image = ramp_image(50, 70)
    assert np.array_equal(a.predict_proba(image), b.predict_proba(image))
    raises_one_line("unknown setting.*overlapp", TiledPredictor.from_onnx, models["rgb"], overlapp=0.5)


def test_bad_settings(models):
    path = models["rgb"]
    msg = raises_one_line(f"tile_size 8192: exceeds the cap of {MAX_TILE_SIZE}", load_predictor, path, tile_size=8192)
    assert "use e.g." in msg
    raises_one_line("tile_size 30 is not a multiple of 4.*use 28 or 32", load_predictor, path, tile_size=30)
    raises_one_line("tile_size 0: must be a positive integer", load_predictor, path, tile_size=0)
    for overlap in (-0.1, 1.0, 1.5, True, "0.5"):
        raises_one_line(r"overlap .*must be in \[0, 1\)", load_predictor, path, overlap=overlap)
    raises_one_line("blend 'linear': must be one of gaussian, constant", load_predictor, path, blend="linear")
    raises_one_line("batch_size 0", load_predictor, path, batch_size=0)
    raises_one_line("threads 0", load_predictor, path, threads=0)
    raises_one_line("tta 'yes': must be true or false", load_predictor, path, tta="yes")
    raises_one_line("tissue_threshold 256", load_predictor, path, tissue_threshold=256)
    assert TilingSettings(tissue_threshold=0).tissue_threshold == 0        # 0 = off; unset = the card's
    assert load_predictor(path, tissue_threshold=0).tissue_threshold is None
    assert load_predictor(path, tile_size=64, threads=1).tile_size == 64
