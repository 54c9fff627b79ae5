"""Tiny ONNX segmentation models honouring the export contract, built without TensorFlow.

Contract (see serving/card.py): input `image` NHWC float32 with raw 0..255 values and
dynamic N/H/W; output NHWK softmax probabilities; a ModelCard as JSON in
`metadata_props` under `serving.card.METADATA_KEY`. Graph:

    image -> Transpose(NCHW) -> Div 255 -> Conv kxk (fixed weights, 'same' zero pad)
          -> Softmax(axis=1) -> Transpose(NHWK) -> probabilities

The kxk kernel is symmetric under horizontal and vertical flips, so the model is
flip-equivariant (flip TTA must reproduce the plain prediction). Weights come from a
fixed seed: the same arguments always give the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serving.card import METADATA_KEY, ModelCard

OPSET = 17
IR_VERSION = 8   # the IR version that goes with opset 17; every onnxruntime >= 1.11 reads it


def tiny_card(*, channels: int = 3, num_classes: int = 3, size_multiple: int = 4,
              tile_size: int = 32, class_names: list[str] | None = None,
              colours: list[tuple[int, int, int]] | None = None,
              single_foreground_class: bool = False, **card_fields: Any) -> ModelCard:
    """The card make_tiny_onnx embeds (also handy for tests that need a card alone);
    card_fields: other ModelCard fields (tissue_threshold, spacing, scale, ...)."""
    names = class_names or ["background"] + [f"class{i}" for i in range(1, num_classes)]
    base = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    cols = colours or [base[i % len(base)] for i in range(num_classes)]
    layers = int(np.log2(size_multiple)) + 1 if size_multiple >= 1 else 1
    return ModelCard(channels=channels, num_classes=num_classes, size_multiple=size_multiple,
                     tile_size=tile_size, class_names=list(names), colours=list(cols),
                     num_layers=layers, dataset="tiny-test", single_foreground_class=single_foreground_class,
                     **card_fields)


def _weights(channels: int, num_classes: int, kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Conv weights (K, C, k, k) with a flip-symmetric spatial pattern, and bias (K,).

    Class k wins where the local mean intensity m (0..1) is nearest c_k = (k + 0.5) / K:
    logit_k = s * (2 c_k m - c_k^2) is -s (m - c_k)^2 up to a term shared by all classes,
    so every class appears on an image spanning 0..255. A small seeded per-channel jitter
    keeps channels from being interchangeable.
    """
    rng = np.random.default_rng(1234)
    sharpness = 40.0
    centres = (np.arange(num_classes, dtype=np.float64) + 0.5) / num_classes
    jitter = 1.0 + rng.uniform(-0.1, 0.1, size=(num_classes, channels))
    mix = (sharpness * 2.0 * centres[:, None] / channels) * jitter
    r = np.abs(np.arange(kernel_size) - kernel_size // 2)
    spatial = 1.0 / (1.0 + r[:, None] + r[None, :])          # symmetric in both axes
    spatial = spatial / spatial.sum()
    w = mix[:, :, None, None] * spatial[None, None]
    b = -sharpness * centres**2
    return w.astype(np.float32), b.astype(np.float32)


def tiny_model_proto(*, channels: int = 3, num_classes: int = 3, kernel_size: int = 3,
                     card: ModelCard | None = None) -> onnx.ModelProto:
    """The in-memory ModelProto (card=None: no metadata, for 'missing card' tests)."""
    w, b = _weights(channels, num_classes, kernel_size)
    pad = kernel_size // 2
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Div", ["nchw", "scale"], ["unit"]),
        helper.make_node("Conv", ["unit", "W", "B"], ["logits"],
                         kernel_shape=[kernel_size, kernel_size], pads=[pad] * 4),
        helper.make_node("Softmax", ["logits"], ["soft"], axis=1),
        helper.make_node("Transpose", ["soft"], ["probabilities"], perm=[0, 2, 3, 1]),
    ]
    inits = [
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "B"),
    ]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", "H", "W", channels])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", "H", "W", num_classes])
    graph = helper.make_graph(nodes, "tiny_flexunet", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="flexunet-tests")
    model.ir_version = IR_VERSION
    if card is not None:
        helper.set_model_props(model, {METADATA_KEY: card.to_json()})
    onnx.checker.check_model(model, full_check=True)
    return model


def make_tiny_onnx(path: Path | str, *, channels: int = 3, num_classes: int = 3,
                   size_multiple: int = 4, tile_size: int = 32,
                   class_names: list[str] | None = None,
                   colours: list[tuple[int, int, int]] | None = None,
                   kernel_size: int = 3, with_card: bool = True,
                   single_foreground_class: bool = False, **card_fields: Any) -> Path:
    """Write a tiny contract-honouring ONNX model to `path` and return the path.

    kernel_size: 1 makes every pixel independent (tiling is then exact w.r.t. a whole-image
    pass); 3 (default) gives a receptive field so borders matter. with_card=False omits the
    card (to test the 'missing card' error).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card = tiny_card(channels=channels, num_classes=num_classes, size_multiple=size_multiple,
                     tile_size=tile_size, class_names=class_names, colours=colours,
                     single_foreground_class=single_foreground_class, **card_fields)
    model = tiny_model_proto(channels=channels, num_classes=num_classes,
                             kernel_size=kernel_size, card=card if with_card else None)
    onnx.save_model(model, str(path))
    return path


def make_kidney_onnx(path: Path | str, *, threshold: float = 0.7, tile_size: int = 128, size_multiple: int = 4,
                     healthy: bool = False, **card_fields: Any) -> Path:
    """A kidney "oracle" for scans whose kidney is their brightest tissue: every pixel whose
    mean intensity (0..1) is above `threshold` is kidney, CKD (or healthy), the rest
    background. A 1x1 convolution, so a pixel's class depends on its own value only; the
    card says whole-slice, coronal, 3 classes, one diagnosis per scan."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sharpness, channels = 40.0, 3
    w = np.zeros((3, channels, 1, 1), np.float32)
    w[1:, :, 0, 0] = sharpness / channels
    b = np.array([0.0, -sharpness * threshold, -sharpness * threshold - 1.0], np.float32)
    if healthy:
        b[[1, 2]] = b[[2, 1]]
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Div", ["nchw", "scale"], ["unit"]),
        helper.make_node("Conv", ["unit", "W", "B"], ["logits"], kernel_shape=[1, 1]),
        helper.make_node("Softmax", ["logits"], ["soft"], axis=1),
        helper.make_node("Transpose", ["soft"], ["probabilities"], perm=[0, 2, 3, 1]),
    ]
    inits = [numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
             numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", "H", "W", channels])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", "H", "W", 3])
    model = helper.make_model(helper.make_graph(nodes, "kidney_oracle", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="flexunet-tests")
    model.ir_version = IR_VERSION
    fields = {"scale": "whole", "plane": "coronal", "spacing": 3.0, "spacing_range": (2.6, 3.5),
              "spacing_unit": "mm", "min_component_ml": 5.0, "tta_flips": ["lr"], **card_fields}
    card = tiny_card(channels=channels, num_classes=3, size_multiple=size_multiple, tile_size=tile_size,
                     class_names=["background", "CKD", "healthy"], colours=[(0, 0, 0), (255, 0, 0), (0, 255, 0)],
                     single_foreground_class=True, **fields)
    helper.set_model_props(model, {METADATA_KEY: card.to_json()})
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path
