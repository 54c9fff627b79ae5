"""The export-time space-to-depth rewrite computes the same function as the Keras model."""

from __future__ import annotations

import keras
import numpy as np
import onnx
import pytest

from pipeline.export import ExportError, card_for, session, space_to_depth, to_onnx
from pipeline.model import build_flexunet
from pipeline.params import ModelParams, params_from_dict
from pipeline.space_to_depth import Unsupported, channel_index, phase_kernel, rewrite, transpose_kernel
from tests.conftest import tiny_dict


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


# ------------------------------------------------------------------ whole models
def _randomised(model: keras.Model, seed: int) -> keras.Model:
    """Random weights everywhere, BatchNorm statistics included (variance kept positive)."""
    rng = np.random.default_rng(seed)
    weights = [rng.uniform(0.5, 1.5, w.shape) if "variance" in v.path else rng.normal(0, 0.3, w.shape)
               for w, v in zip(model.get_weights(), model.weights)]
    model.set_weights([w.astype(np.float32) for w in weights])
    return model


@pytest.mark.parametrize("cfg,shape", [
    (dict(base_filters=4, base_kernels=(7, 5), num_layers=3, dilation=(2, 1), normalization=True, dropout_rate=0.1),
     (2, 32, 48, 3)),
    (dict(base_filters=2, base_kernels=(3, 3), num_layers=2, image_channels=1, num_classes=2), (1, 6, 10, 1)),
    (dict(base_filters=8, base_kernels=(11, 11), num_layers=3, input_normalize=True), (1, 64, 64, 3)),
])
def test_rewritten_model_computes_the_same_probabilities(cfg, shape):
    params = ModelParams(**{"num_classes": 3, "image_width": 32, "image_height": 32, **cfg})  # H/W left open
    keras.utils.set_random_seed(0)
    model = _randomised(build_flexunet(params, dynamic_size=True), seed=3)
    fast = rewrite(model)
    x = np.random.default_rng(4).uniform(0, 255 if params.input_normalize else 1, shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(fast(x)), np.asarray(model(x, training=False)), atol=2e-5)
    names = [layer.name for layer in fast.layers]
    assert "enc0_conv0_phases" in names and "enc0_pool_phases" in names and "dec0_up_phases" in names
    # the levels below full resolution are the trained layers themselves, not copies
    assert fast.get_layer("enc1_conv0") is model.get_layer("enc1_conv0")


def test_unsupported_graph_is_refused_and_export_names_the_switch(tmp_path):
    inp = keras.Input((None, None, 3), name="image")
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="strided")(inp)
    out = keras.layers.Conv2DTranspose(3, 2, strides=2, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    with pytest.raises(Unsupported, match="strided: only stride-1"):
        rewrite(model)
    card = card_for(params_from_dict(tiny_dict()), None, None)
    with pytest.raises(ExportError, match=r"m.onnx: cannot compute .* set export.space_to_depth: false"):
        to_onnx(model, tmp_path / "m.onnx", card, space_to_depth=True)
    assert list(tmp_path.iterdir()) == []


def test_onnx_with_phases_matches_keras_and_says_so_in_its_card(tmp_path):
    raw = tiny_dict()
    params = params_from_dict(raw)
    assert params.model.base_filters < 16 and space_to_depth(params)  # auto picks it for narrow models
    keras.utils.set_random_seed(0)
    model = _randomised(build_flexunet(params.model, dynamic_size=True), seed=5)
    card = card_for(params, None, None)
    assert card.extra["space_to_depth"] == "true"
    path = to_onnx(model, tmp_path / "m.onnx", card, space_to_depth=True)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"SpaceToDepth", "DepthToSpace"} <= ops
    x = np.random.default_rng(6).uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    probs = session(path).run(None, {"image": x})[0]
    # random weights give large logits, so float32 rounding shows: the export's parity target
    np.testing.assert_allclose(probs, np.asarray(model(x, training=False)), atol=1e-4)

    raw["export"]["space_to_depth"] = "auto"
    raw["model"]["base_filters"] = 16
    assert not space_to_depth(params_from_dict(raw))  # no padded work to remove: plain graph
    raw["export"]["space_to_depth"] = True
    assert space_to_depth(params_from_dict(raw))
