"""FlexUNet: the seed's U-Net with a large first kernel shrinking by 2 per level.

Per encoder level i (0 = top): two Conv2D(base_filters * 2**i, kernel max(3, k - 2i),
dilation max(1, d - i)) with dropout_rate * i between them, optional BatchNorm, and
MaxPool between levels. The decoder mirrors the encoder without the bottom level:
Conv2DTranspose(2x2, stride 2), concatenation with the skip, two convolutions. A 1x1
softmax head gives per-pixel class probabilities.
"""

from __future__ import annotations

from pathlib import Path

import keras
from keras import layers

from common.errors import DataError
from pipeline.model.architecture import dilation_schedule, kernel_schedule
from pipeline.config.schema import ModelParams


def _conv_block(x, filters: int, kernel, dilation, dropout: float, batchnorm: bool, name: str, dtype: str):
    for j in range(2):
        x = layers.Conv2D(
            filters,
            kernel,
            dilation_rate=dilation,
            padding="same",
            activation="relu",
            kernel_initializer="he_normal",
            name=f"{name}_conv{j}",
            dtype=dtype,
        )(x)
        if batchnorm:
            x = layers.BatchNormalization(name=f"{name}_bn{j}", dtype=dtype)(x)
        if j == 0 and dropout > 0:
            x = layers.Dropout(dropout, name=f"{name}_drop", dtype=dtype)(x)
    return x


def build_flexunet(cfg: ModelParams, *, dynamic_size: bool = False, dtype: str = "float32") -> keras.Model:
    """Build the functional FlexUNet. dynamic_size=True leaves H and W open (for export).

    dtype is the Keras dtype policy of every layer but the head: "mixed_bfloat16" computes
    in bfloat16 with float32 weights (training on CPUs with AVX512-BF16); the softmax head
    always computes in float32. Weights are the same either way, so a model trained mixed
    is saved, evaluated and exported as a float32 copy (`as_float32`).
    """
    height, width = (None, None) if dynamic_size else (cfg.image_height, cfg.image_width)
    inputs = keras.Input((height, width, cfg.image_channels), name="image")
    # Rescaling, not Lambda: it serialises and exports without custom code.
    # The full-resolution level (input, its skip, the last decoder block) stays float32:
    # bfloat16 keeps ~1 grey level of 255, and the weak cortico-medullary contrast that
    # tells a CKD kidney from a healthy one lives in that level's input.
    top = "float32"
    x = (layers.Rescaling(1.0 / 255.0, name="input_normalize", dtype=top)(inputs)
         if cfg.input_normalize else inputs)

    kernels = kernel_schedule(cfg.base_kernels, cfg.num_layers)
    dilations = dilation_schedule(cfg.dilation, cfg.num_layers)

    # --- encoder
    skips = []
    for i in range(cfg.num_layers):
        x = _conv_block(
            x, cfg.base_filters * 2**i, kernels[i], dilations[i],
            cfg.dropout_rate * i, cfg.normalization, name=f"enc{i}", dtype=top if i == 0 else dtype,
        )
        skips.append(x)
        if i < cfg.num_layers - 1:
            x = layers.MaxPooling2D(2, name=f"enc{i}_pool", dtype=dtype)(x)

    # --- decoder: levels num_layers-2 .. 0, kernels of the encoder reversed
    for level in range(cfg.num_layers - 2, -1, -1):
        filters = cfg.base_filters * 2**level
        level_dtype = top if level == 0 else dtype
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"dec{level}_up",
                                   dtype=level_dtype)(x)
        x = layers.Concatenate(name=f"dec{level}_concat", dtype=level_dtype)([x, skips[level]])
        x = _conv_block(
            x, filters, kernels[level], dilations[level],
            cfg.dropout_rate * level, cfg.normalization, name=f"dec{level}", dtype=level_dtype,
        )

    outputs = layers.Conv2D(cfg.num_classes, 1, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="FlexUNet")


def as_float32(model: keras.Model, cfg: ModelParams) -> keras.Model:
    """A float32 FlexUNet holding `model`'s weights (a no-op copy for a float32 model)."""
    copy = build_flexunet(cfg)
    copy.set_weights(model.get_weights())
    return copy


def load_model(path: Path) -> keras.Model:
    if not path.is_file():
        raise DataError(f"{path}: model not found; run the train stage first (dvc repro train)")
    return keras.models.load_model(path, compile=False)
