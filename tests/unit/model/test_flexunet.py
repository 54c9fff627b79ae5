"""FlexUNet architecture follows the seed's rules; metrics compute what they claim; a tiny
model learns a trivial task."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.model.losses import ClassOverlap, DiceCoefMulticlass, dice_coef_multiclass, training_metrics
from pipeline.model.architecture import dilation_schedule, kernel_schedule
from pipeline.model.flexunet import as_float32, build_flexunet
from pipeline.config.schema import ModelParams, TrainParams
from pipeline.model.fit import learning_rate, resolve_precision


def test_kernel_and_dilation_schedules():
    assert kernel_schedule((11, 11), 8) == [(11, 11), (9, 9), (7, 7), (5, 5), (3, 3), (3, 3), (3, 3), (3, 3)]
    assert kernel_schedule((7, 5), 3) == [(7, 5), (5, 3), (3, 3)]
    assert dilation_schedule((3, 3), 5) == [(3, 3), (2, 2), (1, 1), (1, 1), (1, 1)]


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


def test_dice_coef_multiclass_by_hand():
    y_true = np.zeros((1, 2, 2, 2), np.float32)
    y_true[0, 0, :, 1] = 1
    y_true[0, 1, :, 0] = 1
    y_pred = np.full((1, 2, 2, 2), 0.5, np.float32)
    # per class: 2*1 / (2 + 2) = 0.5
    assert float(dice_coef_multiclass(y_true, y_pred)) == pytest.approx(0.5, abs=1e-5)
    assert float(dice_coef_multiclass(y_true, y_true)) == pytest.approx(1.0, abs=1e-5)


def test_seed_metric_accumulates_over_the_epoch():
    """Batches lacking a class must not drag the epoch value down: the stateful metric equals
    the function on the whole set at once, unlike the per-batch mean Keras would take."""
    rng = np.random.default_rng(1)
    truth = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (4, 8, 8))]
    truth[:2, ..., 2] = 0  # class 2 absent from the first two samples
    truth[:2, ..., 0] = 1 - truth[:2, ..., 1]
    pred = (0.9 * truth + 0.1 * rng.dirichlet([1, 1, 1], (4, 8, 8))).astype(np.float32)  # a good model
    metric = DiceCoefMulticlass(3)
    for i in range(4):
        metric.update_state(truth[i:i + 1], pred[i:i + 1])
    whole = float(dice_coef_multiclass(truth, pred))
    per_batch = np.mean([float(dice_coef_multiclass(truth[i:i + 1], pred[i:i + 1])) for i in range(4)])
    assert float(metric.result()) == pytest.approx(whole, abs=1e-5)
    assert whole - per_batch > 0.1  # what the seed's per-batch validation curve showed
    metric.reset_state()
    metric.update_state(truth, truth)
    assert float(metric.result()) == pytest.approx(1.0, abs=1e-5)


def test_cosine_schedule_decays_to_the_floor():
    t = TrainParams(lr_schedule="cosine", learning_rate_reducer=False, learning_rate=1e-3, epochs=10,
                    min_lr_fraction=0.02, warmup_epochs=0)
    schedule = learning_rate(t, steps_per_epoch=5)
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(25)) == pytest.approx(0.5 * (1e-3 + 2e-5), rel=1e-4)
    assert float(schedule(50)) == pytest.approx(2e-5, rel=1e-4)
    assert learning_rate(TrainParams(learning_rate=3e-4, lr_schedule="constant"), 5) == pytest.approx(3e-4)


def test_precision_auto_follows_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: fpu avx2 avx512f avx512_bf16\n")
    assert resolve_precision("auto", cpuinfo) == "mixed_bfloat16"
    cpuinfo.write_text("flags\t: fpu avx2 avx512f\n")
    assert resolve_precision("auto", cpuinfo) == "float32"
    assert resolve_precision("auto", tmp_path / "missing") == "float32"
    assert resolve_precision("mixed_bfloat16", cpuinfo) == "mixed_bfloat16"


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


def test_class_overlap_accumulates_over_batches():
    rng = np.random.default_rng(0)
    truth = np.eye(3)[rng.integers(0, 3, (4, 8, 8))].astype(np.float32)
    pred = np.eye(3)[rng.integers(0, 3, (4, 8, 8))].astype(np.float32)
    dice, iou = ClassOverlap(1, "dice"), ClassOverlap(1, "iou")
    for i in range(4):
        dice.update_state(truth[i:i + 1], pred[i:i + 1])
        iou.update_state(truth[i:i + 1], pred[i:i + 1])
    t, p = truth.argmax(-1) == 1, pred.argmax(-1) == 1
    tp, fp, fn = (t & p).sum(), (~t & p).sum(), (t & ~p).sum()
    assert float(dice.result()) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-5)
    assert float(iou.result()) == pytest.approx(tp / (tp + fp + fn), abs=1e-5)
    assert [m.name for m in training_metrics(["bg", "CKD", "healthy"])[1:]] == [
        "dice_CKD", "iou_CKD", "dice_healthy", "iou_healthy"]


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
