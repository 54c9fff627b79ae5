"""The space-to-depth rewrite (pipeline.model.space_to_depth) computes the same function as the Keras model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.model.flexunet import build_flexunet
from pipeline.config.schema import ModelParams
from pipeline.model.space_to_depth import (Unsupported, channel_index, levels_that_pay_off, multiply_add_ratio,
                                     phase_kernel, relative_conv_time, rewrite, transpose_kernel)
from tests.conftest import randomised


# ------------------------------------------------------------------ NumPy references
def conv_same(x: np.ndarray, kernel: np.ndarray, dilation: tuple[int, int]) -> np.ndarray:
    """Direct stride-1 'same' convolution (TF's padding rule) of an HWC image, HWIO kernel."""
    kh, kw, _, cout = kernel.shape
    eh, ew = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
    padded = np.pad(x, ((eh // 2, eh - eh // 2), (ew // 2, ew - ew // 2), (0, 0)))
    h, w = x.shape[:2]
    out = np.zeros((h, w, cout))
    for m in range(kh):
        for n in range(kw):
            patch = padded[m * dilation[0]: m * dilation[0] + h, n * dilation[1]: n * dilation[1] + w]
            out += patch @ kernel[m, n]
    return out


def to_phases(x: np.ndarray) -> np.ndarray:
    """tf.nn.space_to_depth(x, 2) of an HWC image: channel (2 * row + column) * C + c."""
    h, w, c = x.shape
    return x.reshape(h // 2, 2, w // 2, 2, c).transpose(0, 2, 1, 3, 4).reshape(h // 2, w // 2, 4 * c)


def from_phases(x: np.ndarray) -> np.ndarray:
    h, w, c4 = x.shape
    c = c4 // 4
    return x.reshape(h, w, 2, 2, c).transpose(0, 2, 1, 3, 4).reshape(2 * h, 2 * w, c)


def test_channel_index_is_a_permutation_in_space_to_depth_order():
    idx = channel_index([3])
    assert idx.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    two = channel_index([2, 3])  # a concatenation: the second segment starts after 4 x 2 channels
    assert two[:, 2:].tolist() == [[8, 9, 10], [11, 12, 13], [14, 15, 16], [17, 18, 19]]
    assert sorted(two.ravel().tolist()) == list(range(20))


@pytest.mark.parametrize("kernel_hw,dilation", [((11, 11), (1, 1)), ((9, 9), (1, 1)), ((5, 7), (2, 1)),
                                                ((3, 3), (3, 3)), ((1, 1), (1, 1)), ((4, 4), (1, 1))])
def test_phase_kernel_reproduces_the_convolution(kernel_hw, dilation):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 14, 3))
    kernel = rng.normal(size=(*kernel_hw, 3, 2))
    direct = conv_same(x, kernel, dilation)

    phase, pads = phase_kernel(kernel, dilation, [3])
    padded = np.pad(to_phases(x), (*pads, (0, 0)))
    h, w = x.shape[0] // 2, x.shape[1] // 2
    out = np.zeros((h, w, phase.shape[-1]))
    for m in range(phase.shape[0]):
        for n in range(phase.shape[1]):
            out += padded[m: m + h, n: n + w] @ phase[m, n]
    np.testing.assert_allclose(from_phases(out), direct, atol=1e-9)
    # an extent e (e + 1 input offsets over both output phases) needs at most (e + 1) // 2 + 1 taps
    extent = dilation[0] * (kernel_hw[0] - 1) + 1
    assert phase.shape[0] <= (extent + 1) // 2 + 1


def test_phase_kernel_of_a_concatenation_reads_each_segment():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8, 2)), rng.normal(size=(8, 8, 3))
    kernel = rng.normal(size=(3, 3, 5, 4))
    direct = conv_same(np.concatenate([a, b], -1), kernel, (1, 1))
    phase, pads = phase_kernel(kernel, (1, 1), [2, 3])
    padded = np.pad(np.concatenate([to_phases(a), to_phases(b)], -1), (*pads, (0, 0)))
    out = sum(padded[m: m + 4, n: n + 4] @ phase[m, n] for m in range(phase.shape[0]) for n in range(phase.shape[1]))
    np.testing.assert_allclose(from_phases(out), direct, atol=1e-9)


def test_transpose_kernel_matches_keras_conv2d_transpose():
    rng = np.random.default_rng(2)
    up = keras.layers.Conv2DTranspose(3, 2, strides=2, padding="same", use_bias=False)
    x = rng.normal(size=(1, 5, 6, 4)).astype(np.float32)
    expected = np.asarray(up(x))[0]
    as_1x1 = transpose_kernel(up.get_weights()[0])[0, 0]
    np.testing.assert_allclose(from_phases(x[0] @ as_1x1), expected, atol=1e-5)


def test_multiply_add_ratio_and_how_many_levels_pay_off():
    assert multiply_add_ratio((11, 11), (1, 1)) == pytest.approx(7 * 7 * 4 / 121)  # 1.62
    assert multiply_add_ratio((9, 9), (1, 1)) == pytest.approx(5 * 5 * 4 / 81)     # 1.23
    assert multiply_add_ratio((3, 3), (1, 1)) == pytest.approx(4.0)
    assert multiply_add_ratio((5, 5), (2, 2)) == pytest.approx(4.0)  # dilation 2: phases do not mix
    # 8 filters pad to one 16-block (2x the work) at one block's speed; 32 fill two blocks
    assert relative_conv_time(1.0, 8) == pytest.approx(2 / 0.64)
    assert relative_conv_time(1.0, 32) == pytest.approx(1.0)
    assert relative_conv_time(1.0, 40) == pytest.approx(48 / 40)

    def levels(kernel, filters, layers=6, dilation=1, block=16):
        kernels = [(max(3, kernel - 2 * i),) * 2 for i in range(layers)]
        dilations = [(max(1, dilation - i),) * 2 for i in range(layers)]
        return levels_that_pay_off(kernels, dilations, [filters * 2**i for i in range(layers)], block)

    assert levels(11, 8) == 2     # the CPU default: 11x11 and 9x9 on phases, 7x7 at 32 filters not
    assert levels(11, 16) == 0    # the seed's 16 filters: 1.62x the work vs 1.56x the time
    assert levels(3, 8) == 0      # 3x3: 4x the work
    assert levels(5, 4, layers=3) == 1  # the tests' tiny model
    assert levels(11, 8, dilation=2) == 0
    assert levels(11, 8, block=8) == 0  # AVX2: 8 filters fill a block (1.62x the work vs 1.56x the time)


# ------------------------------------------------------------------ whole models
@pytest.mark.parametrize("cfg,shape,levels", [
    (dict(base_filters=4, base_kernels=(7, 5), num_layers=3, dilation=(2, 1), normalization=True, dropout_rate=0.1),
     (2, 32, 48, 3), 1),
    (dict(base_filters=2, base_kernels=(3, 3), num_layers=2, image_channels=1, num_classes=2), (1, 6, 10, 1), 1),
    (dict(base_filters=8, base_kernels=(11, 11), num_layers=3, input_normalize=False), (1, 64, 64, 3), 1),
    (dict(base_filters=4, base_kernels=(9, 7), num_layers=4, dilation=(2, 2), normalization=True, dropout_rate=0.1),
     (1, 32, 24, 3), 2),  # the two top levels on phases: level 1's dropout and pooling too
])
def test_rewritten_model_computes_the_same_probabilities(cfg, shape, levels):
    params = ModelParams(**{"num_classes": 3, "image_width": 32, "image_height": 32, **cfg})  # H/W left open
    keras.utils.set_random_seed(0)
    model = randomised(build_flexunet(params, dynamic_size=True), seed=3)
    nodes_before = len(model.get_layer("enc1_conv0")._inbound_nodes)
    fast = rewrite(model, levels)
    x = np.random.default_rng(4).uniform(0, 255 if params.input_normalize else 1, shape).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    assert 0.05 < expected.max(-1).mean() < 0.99  # not saturated: probabilities carry the error
    np.testing.assert_allclose(np.asarray(fast(x)), expected, atol=2e-6)
    names = [layer.name for layer in fast.layers]
    assert "enc0_conv0_phases" in names and "enc0_pool_phases" in names and "dec0_up_phases" in names
    # the levels below full resolution hold the trained weights; the caller's model is untouched
    below = f"enc{levels}_conv0"
    np.testing.assert_array_equal(fast.get_layer(below).get_weights()[0], model.get_layer(below).get_weights()[0])
    assert len(model.get_layer("enc1_conv0")._inbound_nodes) == nodes_before
    assert (f"enc{levels - 1}_conv1_phases" in names) and (f"enc{levels}_conv0_phases" not in names)


def test_rewrite_of_layers_the_flexunet_does_not_use():
    """No bias, tanh, BatchNorm without centre, a concatenation with the image itself, a
    log-softmax head: still the same function."""
    inp = keras.Input((None, None, 2))
    x = keras.layers.Conv2D(3, 5, padding="same", use_bias=False, activation="tanh")(inp)
    x = keras.layers.BatchNormalization(center=False)(x)
    x = keras.layers.Concatenate()([inp, x])
    out = keras.layers.Conv2D(4, 1, activation="log_softmax")(x)
    model = randomised(keras.Model(inp, out), seed=7)
    x = np.random.default_rng(8).normal(size=(2, 12, 8, 2)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(rewrite(model)(x)), np.asarray(model(x, training=False)), atol=2e-5)


@pytest.mark.parametrize("make,message", [
    (lambda x: keras.layers.Conv2D(4, 3, strides=2, padding="same", name="strided")(x), "strided: only stride-1"),
    (lambda x: keras.layers.Conv2D(4, 3, padding="same", activation="sparsemax", name="odd")(x),  # mixes channels
     "odd: activation"),
    (lambda x: keras.layers.ReLU(name="relu_layer")(keras.layers.Conv2D(4, 3, padding="same")(x)),
     "relu_layer \\(ReLU\\) on a phase tensor"),
])
def test_unsupported_layers_are_refused(make, message):
    inp = keras.Input((None, None, 3))
    with pytest.raises(Unsupported, match=message):
        rewrite(keras.Model(inp, make(inp)))
