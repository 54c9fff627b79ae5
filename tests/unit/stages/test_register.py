"""The champion rule of the register stage on glomeruli: the real tiles' glomerulus Dice
decides, with a pixel floor and an object-F1 floor, each named in one line."""

from __future__ import annotations

import json

from pipeline.config.load import params_from_dict
from pipeline.config.schema import EvaluateParams
from pipeline.layout import Layout
from pipeline.stages.register import (
    GLOMERULUS_TAG, REAL_TAG, RealScore, _read_real, _version_tags, champion_decision, model_card,
)
from pipeline.tracking import VersionInfo
from serving.card import ModelCard
from tests.conftest import tiny_dict

FLOORS = EvaluateParams(min_dice=0.75, min_real_dice=0.5, min_real_object_f1=0.5)
CARD = ModelCard(channels=3, num_classes=2, size_multiple=4, tile_size=128, class_names=["background", "glomerulus"],
                 colours=[(0, 0, 0), (255, 0, 0)], num_layers=3, dataset="glomeruli")


def _glomeruli(dice: float, f1: float | None) -> RealScore:
    return RealScore(GLOMERULUS_TAG, "real-sample glomerulus Dice", dice, f1)


def _champion(version: str, **tags: str) -> VersionInfo:
    return VersionInfo("flexunet-glomeruli", version, {"test_mean_foreground_dice": "0.9", **tags}, ["champion"])


def test_each_glomeruli_floor_keeps_a_version_challenger_with_one_line():
    promote, why = champion_decision(0.95, "1", None, FLOORS, _glomeruli(0.41, 0.6))
    assert not promote
    assert why == "real-sample glomerulus Dice 0.4100 < evaluate.min_real_dice 0.5: registered as challenger only"
    promote, why = champion_decision(0.95, "1", None, FLOORS, _glomeruli(0.7, 0.3))
    assert not promote
    assert why == "real-sample object F1 0.3000 < evaluate.min_real_object_f1 0.5: registered as challenger only"
    promote, why = champion_decision(0.95, "1", None, FLOORS, _glomeruli(0.41, 0.3))
    assert not promote and "\n" not in why
    assert why == ("real-sample glomerulus Dice 0.4100 < evaluate.min_real_dice 0.5, real-sample object F1 "
                   "0.3000 < evaluate.min_real_object_f1 0.5: registered as challenger only")
    # a low test Dice does not bar it: the real sample, not min_dice, decides
    assert champion_decision(0.2, "1", None, FLOORS, _glomeruli(0.5, 0.5)) == (True, "first version: no champion yet")


def test_no_object_floor_when_null_and_a_missing_f1_does_not_pass_one():
    no_f1_floor = EvaluateParams(min_real_dice=0.5, min_real_object_f1=None)
    assert champion_decision(0.9, "1", None, no_f1_floor, _glomeruli(0.6, 0.0))[0]
    promote, why = champion_decision(0.9, "1", None, FLOORS, _glomeruli(0.6, None))
    assert not promote and why.startswith("real-sample object F1 n/a < evaluate.min_real_object_f1 0.5")
    # the object floor is glomeruli's: a kidney score is judged on its Dice alone
    assert champion_decision(0.9, "1", None, FLOORS, RealScore(REAL_TAG, "real-sample kidney Dice", 0.6))[0]


def test_the_glomerulus_dice_decides_against_the_champions_tag():
    champion = _champion("1", real_glomerulus_dice="0.62")
    better = champion_decision(0.5, "2", champion, FLOORS, _glomeruli(0.7, 0.55))
    assert better == (True, "real-sample glomerulus Dice 0.7000 >= champion v1's 0.6200 (test mean foreground "
                            "Dice 0.5000)")
    worse = champion_decision(0.99, "2", champion, FLOORS, _glomeruli(0.6, 0.9))
    assert worse[0] is False and worse[1].startswith("real-sample glomerulus Dice 0.6000 < champion v1's 0.6200")
    # a champion scored on the kidney tag only (another registry's rule) falls back to the test Dice
    assert champion_decision(0.95, "2", _champion("1", real_kidney_dice="0.9"), FLOORS, _glomeruli(0.6, 0.6)) == (
        True, "test mean foreground Dice 0.9500 >= champion v1's 0.9000")


def test_register_reads_glomeruli_scores_from_the_predict_file(tmp_path):
    layout = Layout(tmp_path, params_from_dict(tiny_dict("glomeruli")))
    assert _read_real(layout) is None
    layout.metrics.mkdir()
    layout.real_sample_file.write_text(json.dumps({"available": False, "reason": "scored by evaluate_tiled"}))
    layout.real_sample_predict_file.write_text(json.dumps({"available": True, "real_glomerulus_dice": 0.61,
                                                           "real_object_f1": 0.52}))
    real = _read_real(layout)
    assert real == _glomeruli(0.61, 0.52)
    assert real.tags() == {"real_glomerulus_dice": "0.61", "real_object_f1": "0.52"}
    text = model_card(CARD, {"mean_foreground_dice": 0.9}, [], {}, name="g", floors=FLOORS, real=real, run_id="r")
    assert ("The champion is judged on the real-sample glomerulus Dice (0.6100): a model under 0.5 "
            "(`evaluate.min_real_dice`) or a real-sample object F1 (0.5200) under 0.5 (`evaluate.min_real_object_f1`) "
            "never becomes champion.") in text


def test_version_tags_carry_the_real_scores(tmp_path, monkeypatch):
    import pipeline.stages.register as register

    monkeypatch.setattr(register, "run_tags", lambda uri, run_id: {"mlflow.source.git.commit": "abc"})
    layout = Layout(tmp_path, params_from_dict(tiny_dict("glomeruli")))
    tags = _version_tags(layout, "r", "sqlite://", CARD, "sha", {"mean_foreground_dice": 0.9}, _glomeruli(0.61, 0.52))
    assert (tags["real_glomerulus_dice"], tags["real_object_f1"], tags["git_commit"]) == ("0.61", "0.52", "abc")
    assert "real_kidney_dice" not in tags
