"""serving.labels: the shared probabilities -> class ids rule, and the places that use it
(evaluation's Accumulator, the tiled predictor's banded predict)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.labels import to_labels
from serving.predictor import TiledPredictor
from tests.conftest import class_probs
from tests.onnx_models import make_tiny_onnx


def test_plain_rule_is_the_argmax():
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(2, 9, 7)).astype(np.float32)
    np.testing.assert_array_equal(to_labels(probs), probs.argmax(-1))
    assert to_labels(probs).dtype == np.uint8


def test_one_class_per_image_keeps_the_foreground_and_takes_the_larger_mass():
    classes = np.zeros((6, 6), np.uint8)
    classes[1:4, 1:4] = 2        # 9 pixels of class 2 at 0.6
    classes[4:6, 4:6] = 1        # 4 pixels of class 1 at 0.9: less summed mass than class 2
    conf = np.where(classes == 1, 0.9, 0.6)
    labels = to_labels(class_probs(classes, conf), single_foreground_class=True)
    np.testing.assert_array_equal(labels != 0, classes != 0)
    assert set(np.unique(labels[classes != 0])) == {2}
    # mass, not pixel count: the same 4 pixels at 0.9 vs 9 at 0.3 -> class 1 wins
    conf = np.where(classes == 1, 0.9, 0.34)
    assert set(np.unique(to_labels(class_probs(classes, conf), single_foreground_class=True)[classes != 0])) == {1}


def test_one_class_per_image_decides_each_image_of_a_batch_alone():
    classes = np.zeros((2, 4, 4), np.uint8)
    classes[0, :2] = 1
    classes[0, 3, 0] = 2
    classes[1, 2:] = 2
    classes[1, 0, 0] = 1
    labels = to_labels(class_probs(classes), single_foreground_class=True)
    assert set(np.unique(labels[0][classes[0] != 0])) == {1}
    assert set(np.unique(labels[1][classes[1] != 0])) == {2}


@pytest.mark.parametrize("k", [2, 3])
def test_background_only_and_two_class_images_are_unchanged(k):
    empty = class_probs(np.zeros((5, 5), np.uint8), k=k)
    np.testing.assert_array_equal(to_labels(empty, single_foreground_class=True), 0)
    if k == 2:
        classes = (np.arange(25).reshape(5, 5) % 2).astype(np.uint8)
        np.testing.assert_array_equal(to_labels(class_probs(classes, k=2), single_foreground_class=True), classes)


def test_banded_predict_applies_the_card_rule_over_the_whole_image(tmp_path):
    path = make_tiny_onnx(tmp_path / "single.onnx", tile_size=16, single_foreground_class=True)
    ramp = np.linspace(0, 255, 96)[None, :, None]
    image = np.broadcast_to(ramp, (80, 96, 3)).astype(np.uint8)   # 80 rows: several bands
    predictor = TiledPredictor.from_onnx(path, overlap=0.25, batch_size=3)
    probs = predictor.predict_proba(image)
    assert set(np.unique(probs.argmax(-1))) == {0, 1, 2}           # the plain rule would mix classes
    labels = predictor.predict(image)
    np.testing.assert_array_equal(labels, to_labels(probs, single_foreground_class=True))
    assert len(np.unique(labels)) == 2
