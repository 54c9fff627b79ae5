"""Real-sample scores on hand-made masks: exact pooled Dice, class accuracy, and a
deterministic bootstrap interval that brackets the point estimate."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.scoring.real_sample import (
    bootstrap_intervals, point_scores, real_sample_report, score_slice, slice_class, summary_line, whole_slice_labels,
)

NAMES = ["background", "CKD", "healthy"]


def _mask(cls: int, rows: slice, cols: slice, size: int = 10) -> np.ndarray:
    ids = np.zeros((size, size), np.uint8)
    ids[rows, cols] = cls
    return ids


def _slices():
    """Slice a: CKD, predicted CKD with 4 of 8 true px found and 2 false px (tp 4, fp 2, fn 4).
    Slice b: healthy, predicted CKD over exactly the true pixels (a wrong diagnosis).
    Slice c: healthy, nothing predicted. Slice d: healthy, predicted exactly."""
    a_true, a_pred = _mask(1, slice(0, 2), slice(0, 4)), _mask(1, slice(0, 1), slice(0, 4))
    a_pred[5, 5:7] = 1
    b_true = _mask(2, slice(3, 5), slice(3, 5))
    b_pred = np.where(b_true > 0, 1, 0).astype(np.uint8)
    c_true, c_pred = _mask(2, slice(0, 3), slice(0, 3)), np.zeros((10, 10), np.uint8)
    d_true = _mask(2, slice(6, 8), slice(6, 9))
    return [score_slice(s, t, p, 3) for s, t, p in
            (("a", a_true, a_pred), ("b", b_true, b_pred), ("c", c_true, c_pred), ("d", d_true, d_true.copy()))]


def test_pooled_dice_and_class_accuracy_are_exact():
    scores = _slices()
    point = point_scores(scores, NAMES)
    # kidney: tp 4 + 4 + 0 + 6 = 14; true 8 + 4 + 9 + 6 = 27; predicted 6 + 4 + 0 + 6 = 16
    assert point["real_kidney_dice"] == pytest.approx(2 * 14 / (27 + 16))
    # CKD: tp 4, true 8, predicted 6 + 4 (slice b's pixels)
    assert point["real_dice_CKD"] == pytest.approx(2 * 4 / (8 + 10))
    # healthy: tp 6 (slice d), true 4 + 9 + 6, predicted 6
    assert point["real_dice_healthy"] == pytest.approx(2 * 6 / (19 + 6))
    assert point["real_class_accuracy"] == pytest.approx(2 / 4)   # a and d right; b wrong class; c no kidney
    assert [s.class_correct for s in scores] == [True, False, False, True]


def test_slice_class_is_the_majority_foreground_class_or_none():
    ids = np.array([[0, 1, 2, 2]], np.uint8)
    assert slice_class(ids, 3) == 2
    assert slice_class(np.zeros((2, 2), np.uint8), 3) is None


def test_bootstrap_interval_brackets_the_point_and_is_deterministic():
    scores = _slices()
    point = point_scores(scores, NAMES)
    first = bootstrap_intervals(scores, NAMES, resamples=500, seed=3)
    assert first == bootstrap_intervals(scores, NAMES, resamples=500, seed=3)
    assert first != bootstrap_intervals(scores, NAMES, resamples=500, seed=4)
    for key, value in point.items():
        low, high = first[f"{key}_ci_low"], first[f"{key}_ci_high"]
        assert 0 <= low <= value <= high <= 1, key
    assert first["real_class_accuracy_ci_low"] < first["real_class_accuracy_ci_high"]


def test_bootstrap_of_identical_slices_has_no_width():
    truth, pred = _mask(1, slice(0, 2), slice(0, 4)), _mask(1, slice(0, 1), slice(0, 4))
    scores = [score_slice(f"s{i}", truth, pred, 3) for i in range(5)]
    ci = bootstrap_intervals(scores, NAMES, resamples=100)
    assert ci["real_kidney_dice_ci_low"] == ci["real_kidney_dice_ci_high"] == pytest.approx(2 * 4 / 12)
    assert ci["real_dice_healthy_ci_low"] is None   # healthy absent from every resample: no score


def test_report_rows_and_summary_line():
    report = real_sample_report(_slices(), NAMES, snapped_pixels=7, mask_pixels=400, resamples=200)
    assert report["real_slices"] == 4 and report["real_snapped_pixels"] == 7 and report["real_mask_pixels"] == 400
    row = {r["stem"]: r for r in report["per_slice"]}
    assert row["b"] == {"stem": "b", "true_class": "healthy", "predicted_class": "CKD", "kidney_dice": 1.0,
                        "true_kidney_px": 4, "predicted_kidney_px": 4}
    assert row["c"]["predicted_class"] is None and row["c"]["kidney_dice"] == 0.0
    line = summary_line(report, NAMES)
    assert line.startswith(f"real sample (4 slices): kidney Dice {report['real_kidney_dice']:.2f} [")
    assert "CKD Dice" in line and "healthy Dice" in line and "class accuracy 0.50 [" in line


def test_whole_slice_labels_predicts_once_at_the_model_size_and_returns_the_slice_size():
    seen = []

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.shape)
        probs = np.zeros(batch.shape[:3] + (3,), np.float32)
        probs[..., 0] = 1
        probs[0, :4, :4] = [0.1, 0.5, 0.4]   # top-left: kidney, CKD
        return probs

    image = np.full((40, 24, 1), 100, np.uint8)
    ids = whole_slice_labels(predict, image, 8, single_foreground_class=True)
    assert seen == [(1, 8, 8, 1)] and ids.shape == (40, 24)
    # padded to 40 x 40 (8 columns each side), so the model's top-left quarter (20 x 20 px of
    # the square) is the slice's first 12 columns of its first 20 rows
    assert set(np.unique(ids)) == {0, 1} and ids[0, 0] == 1 and ids[-1, -1] == 0
    assert ids[:16, :9].all() and not ids[:, 16:].any() and not ids[24:].any()


def test_flexunet_predict_on_the_real_sample_gives_evaluates_labels(tmp_path):
    """evaluate's real-sample scoring and `flexunet predict` share one preparation
    (serving.preparation): with the same (tiny, whole-slice) model, the same labels."""
    from pathlib import Path

    from PIL import Image

    from pipeline.config.schema import Params
    from pipeline.scoring.real_sample import score_sample
    from serving.batch import predict_folder
    from serving.predictor import TiledPredictor
    from tests.onnx_models import make_tiny_onnx

    repo = Path(__file__).resolve().parents[3]
    model = make_tiny_onnx(tmp_path / "m.onnx", tile_size=128, size_multiple=4, scale="whole",
                           class_names=NAMES, single_foreground_class=True)
    predictor = TiledPredictor.from_onnx(model)
    params = Params()
    images = sorted((repo / params.evaluate.real_sample / "images").glob("*.png"))
    assert predict_folder(predictor, images, tmp_path / "out").ok == len(images) == 8
    report, cases = score_sample(params, repo, lambda _, image: whole_slice_labels(predictor.predict_fn, image, 128,
                                                                                   True))
    for path, (_, _, labels) in zip(images, cases):
        predicted = np.asarray(Image.open(tmp_path / "out" / path.name))
        assert predicted.shape == (512, 512) and np.array_equal(predicted, labels), path.name
    assert report["real_slices"] == 8 and 0 < report["real_kidney_dice"] < 1
