"""FlexUNet follows the seed's rules (pipeline/model/flexunet.py); a tiny model learns a
trivial task."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.model.losses import ClassOverlap
from pipeline.model.flexunet import as_float32, build_flexunet
from pipeline.config.schema import ModelParams


def _convs(model, prefix):
    return [l for l in model.layers if l.name.startswith(prefix) and isinstance(l, keras.layers.Conv2D)
            and not isinstance(l, keras.layers.Conv2DTranspose)]


def test_architecture_matches_seed_rules():
    cfg = ModelParams(image_width=64, image_height=64, num_classes=3, base_filters=4, base_kernels=(9, 9),
                      num_layers=4, dropout_rate=0.05, dilation=(2, 2), normalization=True)
    model = build_flexunet(cfg)
    assert model.output_shape == (None, 64, 64, 3)
    for level, (k, d) in enumerate(zip([9, 7, 5, 3], [2, 1, 1, 1])):
        convs = _convs(model, f"enc{level}_")
        assert [c.filters for c in convs] == [4 * 2**level] * 2
        assert {c.kernel_size for c in convs} == {(k, k)} and {c.dilation_rate for c in convs} == {(d, d)}
        if level:
            assert model.get_layer(f"enc{level}_drop").rate == pytest.approx(0.05 * level)
    for level in range(3):  # decoder mirrors the encoder without the bottom level
        convs = _convs(model, f"dec{level}_")
        assert [c.filters for c in convs] == [4 * 2**level] * 2
        assert {c.kernel_size for c in convs} == {(9 - 2 * level,) * 2}
        assert model.get_layer(f"dec{level}_up").strides == (2, 2)
    assert sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers) == 2 * (4 + 3)
    assert not any(isinstance(l, keras.layers.Lambda) for l in model.layers)
    assert model.get_layer("input_normalize").scale == pytest.approx(1 / 255)
    assert model.get_layer("probabilities").activation.__name__ == "softmax"


def test_dynamic_size_model_accepts_any_multiple():
    cfg = ModelParams(image_width=32, image_height=32, base_filters=2, base_kernels=(5, 5), num_layers=3)
    model = build_flexunet(cfg, dynamic_size=True)
    probs = model.predict(np.zeros((1, 48, 24, 3), np.float32), verbose=0)
    assert probs.shape == (1, 48, 24, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_mixed_precision_model_keeps_a_float32_head_and_copies_to_float32():
    cfg = ModelParams(image_width=32, image_height=32, base_filters=2, base_kernels=(5, 5), num_layers=3)
    mixed = build_flexunet(cfg, dtype="mixed_bfloat16")
    assert mixed.get_layer("enc1_conv0").compute_dtype == "bfloat16"
    assert mixed.get_layer("dec1_conv1").compute_dtype == "bfloat16"
    # the full-resolution level and the head stay float32
    for name in ("input_normalize", "enc0_conv0", "dec0_conv1", "probabilities"):
        assert mixed.get_layer(name).compute_dtype == "float32", name
    assert all(w.dtype == "float32" for w in mixed.weights)
    plain = as_float32(mixed, cfg)
    assert {layer.compute_dtype for layer in plain.layers if layer.weights} == {"float32"}
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(plain.predict(x, verbose=0), mixed.predict(x, verbose=0), atol=0.02)


def test_tiny_flexunet_learns_a_trivial_task():
    """Class 1 wherever the red channel is bright: a working model/loss/optimiser learns it."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    ids = np.zeros((48, 32, 32), np.int64)
    for i in range(48):
        y, x = rng.integers(2, 18, 2)
        ids[i, y:y + 12, x:x + 12] = 1
    images = np.stack([ids * 200 + 20] * 3, axis=-1).astype(np.float32) + rng.normal(0, 10, (48, 32, 32, 3))
    cfg = ModelParams(image_width=32, image_height=32, num_classes=2, base_filters=4, base_kernels=(5, 5),
                      num_layers=3, dropout_rate=0.0, normalization=False)
    model = build_flexunet(cfg)
    model.compile(keras.optimizers.Adam(1e-2), "categorical_crossentropy", metrics=[ClassOverlap(1, "dice")])
    onehot = np.eye(2, dtype=np.float32)[ids]
    model.fit(images[:40], onehot[:40], batch_size=8, epochs=15, verbose=0)
    result = model.evaluate(images[40:], onehot[40:], verbose=0, return_dict=True)
    assert result["dice_1"] > 0.9
