"""Real glomeruli tiles: pooled glomerulus Dice and object counts on hand-made masks, a
deterministic bootstrap interval that brackets the point, and the sample's own numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config.load import params_from_dict
from pipeline.data.masks import read_mask
from pipeline.scoring.real_sample import resample_draws
from pipeline.scoring.real_tiles import (
    bootstrap_intervals, object_diameters, point_scores, real_tiles_report, sample_diameters, score_tile,
    score_tiles, summary_line,
)
from tests.conftest import tiny_dict

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "real-sample" / "glomeruli-pas"


def _square(ids: np.ndarray, row: int, col: int, side: int) -> None:
    ids[row: row + side, col: col + side] = 1


def _tiles():
    """Tile a: two true 10x10 glomeruli; one found exactly, the other missed; a false 6x6
    object and a 2 px speck predicted (tp 1, fp 1 + the speck, fn 1).
    Tile b: one true 10x10 glomerulus predicted as its top 10x6 (IoU 0.6: matched).
    Tile c: one true 8x8 glomerulus predicted as its left 8x3 (IoU 0.375: not matched).
    Tile d: no glomerulus, none predicted."""
    a_true, a_pred = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    _square(a_true, 0, 0, 10), _square(a_true, 20, 20, 10)
    _square(a_pred, 0, 0, 10), _square(a_pred, 0, 30, 6)
    a_pred[38, 0:2] = 1
    b_true, b_pred = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    _square(b_true, 5, 5, 10)
    b_pred[5:11, 5:15] = 1
    c_true, c_pred = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    _square(c_true, 30, 30, 8)
    c_pred[30:38, 30:33] = 1
    empty = np.zeros((40, 40), np.uint8)
    return [score_tile(s, t, p, min_object_px=4) for s, t, p in
            (("a", a_true, a_pred), ("b", b_true, b_pred), ("c", c_true, c_pred), ("d", empty, empty.copy()))]


def test_tile_counts_are_exact_and_specks_are_dropped():
    a, b, c, d = _tiles()
    # tile a: the 2 px speck is under min_object_px 4 (as serving drops it) but its pixels count
    assert (a.true, a.predicted, a.matched) == (2, 2, 1)
    assert a.confusion.tolist() == [[1600 - 200 - 38, 38], [100, 100]]
    assert (b.true, b.predicted, b.matched) == (1, 1, 1) and b.confusion[1, 1] == 60
    assert (c.true, c.predicted, c.matched) == (1, 1, 0) and c.confusion[1, 1] == 24
    assert (d.true, d.predicted, d.matched) == (0, 0, 0)
    kept = score_tile("a", np.zeros((4, 4), np.uint8), np.pad(np.ones((1, 2), np.uint8), ((0, 3), (0, 2))), 0)
    assert kept.predicted == 1   # min_object_px 0: every component is an object


def test_pooled_scores_are_exact():
    point = point_scores(_tiles())
    # pixels: tp 100 + 60 + 24 = 184; true 200 + 100 + 64 = 364; predicted 138 + 60 + 24 = 222
    assert point["real_glomerulus_dice"] == pytest.approx(2 * 184 / (364 + 222))
    # objects: true 2 + 1 + 1 = 4, predicted 2 + 1 + 1 = 4, matched 1 + 1 + 0 = 2
    assert point["real_object_precision"] == point["real_object_recall"] == point["real_object_f1"] == 0.5
    assert point_scores(_tiles()[3:]) == {"real_glomerulus_dice": None, "real_object_precision": None,
                                          "real_object_recall": None, "real_object_f1": None}


def test_bootstrap_interval_brackets_the_point_and_is_deterministic():
    tiles = _tiles()
    point = point_scores(tiles)
    first = bootstrap_intervals(tiles, resamples=500, seed=3)
    assert first == bootstrap_intervals(tiles, resamples=500, seed=3)
    # the same draws as the kidney slices' intervals: real_sample.resample_draws
    draws = resample_draws(len(tiles), 500, 3)
    matched, predicted = np.array([1, 1, 0, 0])[draws].sum(1), np.array([2, 1, 1, 0])[draws].sum(1)
    precision = matched[predicted > 0] / predicted[predicted > 0]
    assert first["real_object_precision_ci_low"] == np.percentile(precision, 2.5)
    for key, value in point.items():
        low, high = first[f"{key}_ci_low"], first[f"{key}_ci_high"]
        assert 0 <= low <= value <= high <= 1 and low < high, key
    same = bootstrap_intervals([tiles[1]] * 3, resamples=50)
    assert same["real_glomerulus_dice_ci_low"] == same["real_glomerulus_dice_ci_high"] == pytest.approx(120 / 160)
    assert same["real_object_f1_ci_low"] == same["real_object_f1_ci_high"] == 1.0
    assert bootstrap_intervals([tiles[3]] * 2, resamples=20)["real_object_recall_ci_low"] is None


def test_report_rows_and_summary_line():
    report = real_tiles_report(_tiles(), spacing=0.5, min_object_px=4, resamples=200)
    assert (report["available"], report["real_tiles"], report["spacing"], report["min_object_px"]) == (True, 4, 0.5, 4)
    assert (report["real_objects_true"], report["real_objects_predicted"], report["real_objects_matched"]) == (4, 4, 2)
    assert report["per_tile"][1] == {"stem": "b", "glomerulus_dice": pytest.approx(120 / 160), "objects_true": 1,
                                     "objects_predicted": 1, "objects_matched": 1}
    assert report["per_tile"][3]["glomerulus_dice"] is None
    line = summary_line(report)
    dice = report["real_glomerulus_dice"]
    assert line.startswith(f"real glomeruli (4 tiles, 0.5 um/px): glomerulus Dice {dice:.2f} [")
    assert "F1 0.50 [" in line
    with pytest.raises(ValueError, match="no tiles"):
        real_tiles_report([], spacing=None, min_object_px=0)


def test_the_real_samples_glomeruli_put_it_at_half_a_micron_per_pixel():
    """data/real-sample/glomeruli-pas/README.md, "Resolution": 9 glomeruli, 180-382 px."""
    diameters = sample_diameters(SAMPLE)
    assert len(diameters) == 9 and round(diameters[0]) == 180 and round(diameters[-1]) == 382
    assert round(float(np.median(diameters))) == 294
    assert all(100 <= d * 0.5 <= 200 for d in diameters[1:]) and 90 <= diameters[0] * 0.5 < 100
    disc = np.hypot(*np.mgrid[-50:51, -50:51]) <= 40
    assert object_diameters(disc) == [pytest.approx(80, abs=0.1)]   # a disc of radius 40


def test_scoring_the_real_sample_against_itself_and_nothing():
    raw = tiny_dict("glomeruli")
    params = params_from_dict(raw)
    truth_of = {p.stem: p for p in (SAMPLE / "masks").iterdir()}
    perfect, cases = score_tiles(params, REPO, lambda path: read_mask(truth_of[path.stem], params.mask),
                                 min_object_px=50)
    assert perfect["real_tiles"] == len(cases) == 6 and cases[0][0].shape == (1024, 1024, 3)
    assert perfect["real_glomerulus_dice"] == perfect["real_object_f1"] == 1.0
    assert perfect["real_objects_true"] == perfect["real_objects_matched"] == 9
    assert perfect["real_glomerulus_dice_ci_low"] == 1.0 and perfect["spacing"] == 0.5
    nothing, _ = score_tiles(params, REPO, lambda path: np.zeros((1024, 1024), np.uint8), min_object_px=50)
    assert nothing["real_glomerulus_dice"] == 0.0 and nothing["real_object_recall"] == 0.0
    assert nothing["real_object_precision"] is None and nothing["real_object_f1"] == 0.0
