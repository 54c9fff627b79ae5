"""Export-time rewrite of a U-Net's top levels onto 2x2 space-to-depth phases.

Why: onnxruntime's CPU convolutions (its NCHWc kernels) compute output channels in
blocks of 16 on AVX-512 CPUs (8 on AVX2), and run one block slower than several. The CPU
default FlexUNet has 8 filters at full resolution, so half of the work of its most
expensive convolutions -- 11x11 over the whole image -- is padding, and 16 at half
resolution. On the four 2x2 phases of a level's input (half the height and width, 4x the
channels) those levels have 32 and 64 channels. `levels_that_pay_off` weighs that against
the extra multiply-adds of phase kernels.

The rewrite is exact in real arithmetic: a stride-1 convolution of the image is a
convolution of its phases with a rearranged kernel; 2x2 max pooling is the maximum over
the phases; a 2x2 stride-2 transposed convolution is a 1x1 convolution into the phases;
per-channel layers (bias, ReLU, BatchNorm) act on each phase. Only float rounding
differs, and the export's TF/ONNX parity check still compares against the Keras model.

Channel layout of a phase tensor: `tf.nn.space_to_depth`'s, phase p = 2 * row + column
major, i.e. channel p * C + c. A concatenation of phase tensors is a list of such
"segments"; `channel_index` maps (phase, original channel) to the phase-tensor channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import layers

PHASES = 4  # 2x2


class Unsupported(ValueError):
    """The model has a layer this rewrite does not know how to move onto phases."""


# --------------------------------------------------------------------------- weights (pure NumPy)
def channel_index(segments: Sequence[int]) -> np.ndarray:
    """idx[p, c]: the phase-tensor channel holding original channel c in phase p."""
    idx = np.empty((PHASES, sum(segments)), dtype=np.int64)
    start = 0
    for size in segments:
        for p in range(PHASES):
            idx[p, start:start + size] = PHASES * start + p * size + np.arange(size)
        start += size
    return idx


def axis_taps(kernel: int, dilation: int) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    """One axis of a stride-1 'same' convolution, seen on 2 phases.

    Output pixel 2a + r reads input 2a + r + dilation * m - pad, with pad the 'same'
    padding before. That is input phase s at a + t, with s = q mod 2, t = q // 2 for
    q = r + dilation * m - pad. Returns (t_min, t_max, [(r, m, s, t), ...]).
    """
    pad_before = dilation * (kernel - 1) // 2
    entries = []
    for r in (0, 1):
        for m in range(kernel):
            q = r + dilation * m - pad_before
            entries.append((r, m, q % 2, q // 2))
    ts = [e[3] for e in entries]
    return min(ts), max(ts), entries


def phase_kernel(kernel: np.ndarray, dilation: tuple[int, int],
                 in_segments: Sequence[int]) -> tuple[np.ndarray, tuple[tuple[int, int], tuple[int, int]]]:
    """An HWIO 'same' kernel -> (its phase kernel, ((top, bottom), (left, right)) zero padding
    for a 'valid' convolution of the phase tensor)."""
    kh, kw, cin, cout = kernel.shape
    if sum(in_segments) != cin:
        raise Unsupported(f"kernel has {cin} input channels, the phase tensor {sum(in_segments)}")
    hmin, hmax, rows = axis_taps(kh, dilation[0])
    wmin, wmax, cols = axis_taps(kw, dilation[1])
    out = np.zeros((hmax - hmin + 1, wmax - wmin + 1, PHASES * cin, PHASES * cout), dtype=kernel.dtype)
    src, dst = channel_index(in_segments), channel_index([cout])
    for r_h, m_h, s_h, t_h in rows:
        for r_w, m_w, s_w, t_w in cols:
            # each (output phase, input phase, tap) is reached by exactly one kernel tap
            out[t_h - hmin, t_w - wmin][np.ix_(src[2 * s_h + s_w], dst[2 * r_h + r_w])] = kernel[m_h, m_w]
    return out, ((-hmin, hmax), (-wmin, wmax))


def transpose_kernel(kernel: np.ndarray) -> np.ndarray:
    """Conv2DTranspose(kernel 2, stride 2) weights (2, 2, out, in) -> the 1x1 kernel
    (1, 1, in, 4 * out) writing output pixel (2a + r, 2b + s) into phase 2r + s."""
    _, _, cout, cin = kernel.shape
    out = np.zeros((1, 1, cin, PHASES * cout), dtype=kernel.dtype)
    dst = channel_index([cout])
    for r in (0, 1):
        for s in (0, 1):
            out[0, 0][:, dst[2 * r + s]] = kernel[r, s].T
    return out


def tile_per_channel(values: np.ndarray, segments: Sequence[int]) -> np.ndarray:
    """A per-channel vector (bias, BatchNorm statistics) laid out for the phase tensor."""
    idx = channel_index(segments)
    out = np.empty(PHASES * len(values), dtype=values.dtype)
    for p in range(PHASES):
        out[idx[p]] = values
    return out


# --------------------------------------------------------------------------- when it pays
def multiply_add_ratio(kernel: tuple[int, int], dilation: tuple[int, int]) -> float:
    """Multiply-adds of a convolution on phases / of the direct one (>= 1: the phase kernel
    covers every output phase's taps, so some of its taps are zeros for some phases)."""
    (hmin, hmax, _), (wmin, wmax, _) = axis_taps(kernel[0], dilation[0]), axis_taps(kernel[1], dilation[1])
    return (hmax - hmin + 1) * (wmax - wmin + 1) * PHASES / (kernel[0] * kernel[1])


# onnxruntime's NCHWc convolutions (MLAS) pad output channels to whole blocks (16 on
# AVX-512) and reuse each input load across up to 4 blocks: with one block they ran at 64-66 %
# of the speed of two on this CPU (benchmarks/space_to_depth.py: 9x9 and 7x7 kernels), the
# reason a 16-filter level also gains from 4x the channels.
ONE_BLOCK_SPEED = 0.64


def relative_conv_time(multiply_adds: float, filters: int, channel_block: int = 16) -> float:
    """Time of a convolution with `filters` outputs, per unit of its real multiply-adds."""
    blocks = -(-filters // channel_block)
    return multiply_adds * blocks * channel_block / filters / (ONE_BLOCK_SPEED if blocks == 1 else 1.0)


def levels_that_pay_off(kernels: Sequence[tuple[int, int]], dilations: Sequence[tuple[int, int]],
                        filters: Sequence[int], channel_block: int = 16) -> int:
    """How many levels from the top run faster on phases (by `relative_conv_time`). Default
    model (8 filters, 11x11 then 9x9, 7x7 ...): 2 levels; 3x3 kernels (4x the multiply-adds)
    or 32+ filters (nothing padded, full speed already) stop it."""
    count = 0
    for kernel, dilation, width in zip(kernels, dilations, filters):
        direct = relative_conv_time(1.0, width, channel_block)
        phases = relative_conv_time(multiply_add_ratio(kernel, dilation), PHASES * width, channel_block)
        if phases >= direct:
            break
        count += 1
    return count


# --------------------------------------------------------------------------- layers
class SpaceToDepth(layers.Layer):
    """(N, H, W, C) -> (N, H/2, W/2, 4C), channel (2 * row + column) * C + c."""

    def call(self, x: Any) -> Any:
        import tensorflow as tf

        return tf.nn.space_to_depth(x, 2)


class DepthToSpace(layers.Layer):
    """The inverse of SpaceToDepth."""

    def call(self, x: Any) -> Any:
        import tensorflow as tf

        return tf.nn.depth_to_space(x, 2)


class PhaseMax(layers.Layer):
    """2x2 max pooling of a one-segment phase tensor: the maximum over its phases."""

    def call(self, x: Any) -> Any:
        import tensorflow as tf

        a, b, c, d = tf.split(x, PHASES, axis=-1)
        return tf.maximum(tf.maximum(a, b), tf.maximum(c, d))


# --------------------------------------------------------------------------- graph walk
# Activations that act on each value alone, so on each phase alone; softmax-like ones mix
# channels and are applied after the phases are put back together.
ELEMENTWISE = {"linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "sigmoid",
               "hard_sigmoid", "hard_silu", "hard_swish", "tanh", "softplus", "softsign", "exponential", "mish"}
ACROSS_CHANNELS = {"softmax", "log_softmax"}


@dataclass
class _Value:
    tensor: Any
    scale: int                            # 1: full resolution; 2 after one pooling; ...
    segments: tuple[int, ...] | None     # None: an ordinary NHWC tensor


def _inbound(layer_config: dict[str, Any]) -> list[str]:
    """Names of the layers feeding one layer, in argument order (one call per layer)."""
    names: list[str] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            history = obj.get("config", {}).get("keras_history") if obj.get("class_name") == "__keras_tensor__" else None
            if history:
                names.append(history[0])
                return
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    nodes = layer_config.get("inbound_nodes", [])
    if len(nodes) > 1:
        raise Unsupported(f"layer {layer_config['name']} is called more than once")
    walk(nodes)
    return names


def _numpy(variable: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable))


def _channels_last(layer: layers.Layer, cfg: dict[str, Any]) -> None:
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise Unsupported(f"{layer.name}: data_format {cfg['data_format']}")


class _Rewriter:
    def __init__(self, model: keras.Model, levels: int):
        self.model = model
        self.scales = {2**i for i in range(levels)}  # the resolutions computed on phases

    def to_phases(self, v: _Value, name: str) -> _Value:
        if v.segments is not None:
            return v
        channels = int(v.tensor.shape[-1])
        return _Value(SpaceToDepth(name=f"{name}_space_to_depth")(v.tensor), v.scale, (channels,))

    def to_image(self, v: _Value, name: str) -> _Value:
        if v.segments is None:
            return v
        if len(v.segments) != 1:
            raise Unsupported(f"{name}: a concatenation of phase tensors cannot be turned back into an image")
        return _Value(DepthToSpace(name=f"{name}_depth_to_space")(v.tensor), v.scale, None)

    def phase_conv(self, layer: layers.Layer, v: _Value, kernel: np.ndarray, pads: Any, activation: str,
                   scale: int | None = None) -> _Value:
        """A 'valid' Conv2D holding `kernel` and `layer`'s bias tiled over the phases."""
        x = v.tensor
        if any(sum(p) for p in pads):
            x = layers.ZeroPadding2D(pads, name=f"{layer.name}_phase_pad")(x)
        new = layers.Conv2D(kernel.shape[-1], kernel.shape[:2], padding="valid", use_bias=layer.use_bias,
                            activation=activation, name=f"{layer.name}_phases")
        out = new(x)
        cout = kernel.shape[-1] // PHASES
        new.set_weights([kernel] + ([tile_per_channel(_numpy(layer.bias), (cout,))] if layer.use_bias else []))
        return _Value(out, v.scale if scale is None else scale, (cout,))

    def conv(self, layer: layers.Conv2D, v: _Value) -> _Value:
        cfg = layer.get_config()
        _channels_last(layer, cfg)
        same = cfg["padding"] == "same" or tuple(cfg["kernel_size"]) == (1, 1)  # 1x1: 'valid' is 'same'
        if tuple(cfg["strides"]) != (1, 1) or not same or cfg.get("groups", 1) != 1:
            raise Unsupported(f"{layer.name}: only stride-1 'same' ungrouped convolutions are rewritten")
        activation = cfg["activation"]
        if not isinstance(activation, str) or activation not in ELEMENTWISE | ACROSS_CHANNELS:  # dict: custom
            raise Unsupported(f"{layer.name}: activation {activation!r}")
        v = self.to_phases(v, layer.name)
        # layer.kernel, not get_weights()[0]: with LoRA enabled it is the merged kernel
        kernel, pads = phase_kernel(_numpy(layer.kernel), tuple(cfg["dilation_rate"]), v.segments)
        across = activation in ACROSS_CHANNELS
        out = self.phase_conv(layer, v, kernel, pads, "linear" if across else activation)
        if across:  # normalises over the channels: back to the image first
            out = self.to_image(out, layer.name)
            out = _Value(layers.Activation(activation, name=f"{layer.name}_{activation}")(out.tensor), out.scale, None)
        return out

    def batchnorm(self, layer: layers.BatchNormalization, v: _Value) -> _Value:
        cfg = layer.get_config()
        if cfg["axis"] not in (-1, 3, [3], [-1]):
            raise Unsupported(f"{layer.name}: BatchNormalization over axis {cfg['axis']}")
        new = layers.BatchNormalization(epsilon=cfg["epsilon"], center=cfg["center"], scale=cfg["scale"],
                                        name=f"{layer.name}_phases")
        x = new(v.tensor)
        new.set_weights([tile_per_channel(w, v.segments) for w in layer.get_weights()])
        return _Value(x, v.scale, v.segments)

    def maxpool(self, layer: layers.MaxPooling2D, v: _Value) -> _Value:
        cfg = layer.get_config()
        _channels_last(layer, cfg)
        if tuple(cfg["pool_size"]) != (2, 2) or tuple(cfg["strides"] or (2, 2)) != (2, 2) or len(v.segments) != 1:
            raise Unsupported(f"{layer.name}: only 2x2/2 max pooling of one phase tensor is rewritten")
        return _Value(PhaseMax(name=f"{layer.name}_phases")(v.tensor), v.scale * 2, None)

    def upconv(self, layer: layers.Conv2DTranspose, v: _Value) -> _Value:
        cfg = layer.get_config()
        _channels_last(layer, cfg)
        if tuple(cfg["kernel_size"]) != (2, 2) or tuple(cfg["strides"]) != (2, 2) or cfg.get("output_padding") \
                or tuple(cfg["dilation_rate"]) != (1, 1):
            raise Unsupported(f"{layer.name}: only 2x2 stride-2 transposed convolutions are rewritten")
        if not isinstance(cfg["activation"], str) or cfg["activation"] not in ELEMENTWISE:
            raise Unsupported(f"{layer.name}: activation {cfg['activation']!r} on a transposed convolution")
        v = self.to_image(v, layer.name)  # the input's own phases (a deeper level on phases)
        return self.phase_conv(layer, v, transpose_kernel(_numpy(layer.kernel)), ((0, 0), (0, 0)),
                               cfg["activation"], scale=v.scale // 2)

    def apply(self, layer: layers.Layer, args: list[_Value]) -> _Value:
        kind = type(layer)  # exact types: a subclass may compute something else
        if kind is layers.Dropout:
            return args[0]  # an inference-only graph
        if kind is layers.Concatenate and layer.axis in (-1, 3):
            if len({a.scale for a in args}) == 1 and any(a.segments for a in args):
                values = [self.to_phases(a, f"{layer.name}_{i}") for i, a in enumerate(args)]
                x = layers.Concatenate(name=f"{layer.name}_phases")([a.tensor for a in values])
                return _Value(x, args[0].scale, tuple(s for a in values for s in a.segments))
        elif len(args) == 1:
            (v,) = args
            if kind is layers.Conv2D and v.scale in self.scales:
                return self.conv(layer, v)
            if kind is layers.BatchNormalization and v.segments is not None:
                return self.batchnorm(layer, v)
            if kind is layers.MaxPooling2D:
                return self.maxpool(layer, v) if v.segments is not None else _Value(layer(v.tensor), v.scale * 2, None)
            if kind is layers.Conv2DTranspose:
                if v.scale // 2 in self.scales:
                    return self.upconv(layer, v)
                return _Value(layer(self.to_image(v, layer.name).tensor), v.scale // 2, None)
        if any(a.segments is not None for a in args):
            raise Unsupported(f"{layer.name} ({kind.__name__}) on a phase tensor")
        out = layer(args[0].tensor if len(args) == 1 else [a.tensor for a in args])
        return _Value(out, args[0].scale, None)

    def build(self) -> keras.Model:
        model = self.model
        config = model.get_config()
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise Unsupported("only single-input, single-output models are rewritten")
        inp = keras.Input(model.inputs[0].shape[1:], name=model.inputs[0].name)
        values: dict[str, _Value] = {}
        for layer_config in config["layers"]:
            layer = model.get_layer(layer_config["name"])
            if isinstance(layer, layers.InputLayer):
                values[layer.name] = _Value(inp, 1, None)
                continue
            values[layer.name] = self.apply(layer, [values[n] for n in _inbound(layer_config)])
        head = config["output_layers"]
        head = head[0] if isinstance(head[0], str) else head[0][0]  # [name, 0, 0] or [[name, 0, 0]]
        out = self.to_image(values[head], "output")
        return keras.Model(inp, out.tensor, name=f"{model.name}_space_to_depth")


def rewrite(model: keras.Model, levels: int = 1) -> keras.Model:
    """The same function as `model` (a functional U-Net whose input sides are multiples of
    2**levels), with its `levels` top resolutions computed on 2x2 phases. Raises
    Unsupported for other graphs.

    The unchanged levels call layers of a clone of `model` (same weights): calling the
    caller's own layers would add nodes to its graph."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return _Rewriter(clone, levels).build()
