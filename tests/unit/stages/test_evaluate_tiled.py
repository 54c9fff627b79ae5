"""evaluate_tiled's real-sample path: the real glomeruli tiles through `flexunet predict`'s
code at evaluate.real_sample_spacing, scored by pipeline/scoring/real_tiles.py (a tiny ONNX
model trained "at 2 um/px"; the full stage runs in tests/integration/stages)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.errors import DataError
from common.imageio import read_image
from pipeline.config.load import params_from_dict
from pipeline.data.masks import read_mask
from pipeline.data.pairs import find_pairs
from pipeline.layout import Layout
from pipeline.panels import GAP, HEADER
from pipeline.scoring.real_tiles import real_tiles_report, score_tile
from pipeline.stages.evaluate_tiled import REAL_PANEL_SIDE, real_sample_by_predict
from serving.predictor import TiledPredictor
from tests.conftest import tiny_dict
from tests.onnx_models import make_tiny_onnx

REPO = Path(__file__).resolve().parents[3]


def _layout(tmp_path: Path, name: str, **evaluate) -> Layout:
    raw = tiny_dict(name)
    raw["evaluate"].update(evaluate)
    return Layout(tmp_path, params_from_dict(raw))


def test_the_real_glomeruli_tiles_are_scored_as_flexunet_predict_gets_them(tmp_path):
    layout = _layout(tmp_path, "glomeruli")
    p = layout.params
    assert (p.evaluate.real_sample_spacing, p.dataset.name) == (0.5, "glomeruli")
    model = make_tiny_onnx(layout.onnx_file, num_classes=2, tile_size=32, class_names=p.mask.class_names,
                           colours=p.mask.colours, spacing=2.0, min_object_px=50)
    predictor = TiledPredictor.from_onnx(model, p.predict.tiling())   # as the stage builds it: no spacing
    report, panel = real_sample_by_predict(layout, predictor)
    # the same tiles by hand: the predictor at --spacing 0.5 (1024 px shrunk to 256 for a 2 um/px model)
    at_half = TiledPredictor.from_onnx(model, p.predict.tiling(), spacing=0.5)
    tiles = []
    for pair in find_pairs(Path(p.evaluate.real_sample)):
        image = read_image(pair.image, 3)
        assert image.shape == (1024, 1024, 3)
        # the card's 50 px specks are training-resolution pixels: 800 on the 0.5 um/px tile
        tiles.append(score_tile(pair.image.stem, read_mask(pair.mask, p.mask), at_half.predict(image), 800))
    assert report == {**real_tiles_report(tiles, spacing=0.5, min_object_px=800), "folder": p.evaluate.real_sample}
    assert report["real_tiles"] == 6 and report["real_objects_true"] == 9 and report["spacing"] == 0.5
    for key in ("real_glomerulus_dice", "real_object_precision", "real_object_recall", "real_object_f1"):
        value, low, high = report[key], report[f"{key}_ci_low"], report[f"{key}_ci_high"]
        assert value is None or 0 <= low <= value <= high <= 1, key
    assert 0 < report["real_glomerulus_dice"] < 1
    assert [row["stem"] for row in report["per_tile"]] == ["10177", "10183", "10191", "10210", "10220", "10224"]
    side = REAL_PANEL_SIDE
    assert panel.shape == (HEADER + 6 * side + 5 * GAP, 3 * side + 2 * GAP, 3)
    # real_sample_spacing null: one tile (a copy of the first) tiled as it is, at 1024 px
    one = tmp_path / "one"
    for sub in ("images", "masks"):
        (one / sub).mkdir(parents=True)
        shutil.copyfile(Path(p.evaluate.real_sample) / sub / "10177.png", one / sub / "10177.png")
    as_stored, _ = real_sample_by_predict(_layout(tmp_path, "glomeruli", real_sample=str(one),
                                                  real_sample_spacing=None), predictor)
    image, truth = read_image(one / "images" / "10177.png", 3), read_mask(one / "masks" / "10177.png", p.mask)
    expected = real_tiles_report([score_tile("10177", truth, predictor.predict(image), 50)], spacing=None,
                                 min_object_px=50)
    assert as_stored == {**expected, "folder": str(one)} and as_stored["per_tile"][0] != report["per_tile"][0]


def test_kidney_keeps_the_predict_keys_and_a_null_sample_says_why(tmp_path):
    layout = _layout(tmp_path, "kidney-t2w")
    model = make_tiny_onnx(layout.onnx_file, tile_size=128, scale="whole", class_names=layout.params.mask.class_names,
                           single_foreground_class=True)
    report, panel = real_sample_by_predict(layout, TiledPredictor.from_onnx(model))
    assert set(report) == {"available", "real_slices", "spacing", "predict_real_kidney_dice",
                           "predict_real_kidney_dice_ci_low", "predict_real_kidney_dice_ci_high", "folder"}
    assert report["real_slices"] == 8 and 0 <= report["predict_real_kidney_dice_ci_low"] <= \
        report["predict_real_kidney_dice"] <= report["predict_real_kidney_dice_ci_high"] <= 1
    assert panel.shape[0] == HEADER + 8 * REAL_PANEL_SIDE + 7 * GAP
    null = _layout(tmp_path, "glomeruli", real_sample=None)
    skipped, notice = real_sample_by_predict(null, TiledPredictor.from_onnx(model))
    assert skipped == {"available": False, "reason": "evaluate.real_sample is null"} and notice.ndim == 3


def test_a_missing_sample_is_a_one_line_error_with_the_fix(tmp_path):
    layout = _layout(tmp_path, "glomeruli", real_sample="data/real-sample/nowhere")
    model = make_tiny_onnx(layout.onnx_file, num_classes=2, tile_size=32, spacing=2.0)
    with pytest.raises(DataError, match=r"nowhere: real sample missing \(evaluate.real_sample\); restore it"):
        real_sample_by_predict(layout, TiledPredictor.from_onnx(model))
