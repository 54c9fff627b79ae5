"""FlexUNet's shape rules, without TensorFlow: kernel and dilation per level, and the
FLOPs a configuration costs (what params validation and the tune stage's cost cap need,
in processes that never import TensorFlow)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # the schema imports this module to check model costs
    from pipeline.config.schema import ModelParams


def kernel_schedule(base_kernels: tuple[int, int], num_layers: int) -> list[tuple[int, int]]:
    """Encoder kernel per level: the base kernel shrinking by 2 per level, floored at 3."""
    return [(max(3, base_kernels[0] - 2 * i), max(3, base_kernels[1] - 2 * i)) for i in range(num_layers)]


def dilation_schedule(dilation: tuple[int, int], num_layers: int) -> list[tuple[int, int]]:
    """Encoder dilation per level: decreasing by 1 per level, floored at 1 (the seed's rule)."""
    return [(max(1, dilation[0] - i), max(1, dilation[1] - i)) for i in range(num_layers)]


def forward_flops(cfg: ModelParams) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass of one image through every convolution,
    from the configuration alone (no model is built). A training step costs about 3x this."""
    kernels = kernel_schedule(cfg.base_kernels, cfg.num_layers)
    filters = [cfg.base_filters * 2**i for i in range(cfg.num_layers)]
    pixels = [(cfg.image_height >> i) * (cfg.image_width >> i) for i in range(cfg.num_layers)]
    taps = [kh * kw for kh, kw in kernels]
    total = 0
    for i in range(cfg.num_layers):
        c_in = cfg.image_channels if i == 0 else filters[i - 1]
        total += pixels[i] * taps[i] * (c_in + filters[i]) * filters[i]
    for level in range(cfg.num_layers - 1):
        total += pixels[level + 1] * filters[level + 1] * 4 * filters[level]      # 2x2 transposed conv
        total += pixels[level] * taps[level] * (2 * filters[level] + filters[level]) * filters[level]
    total += pixels[0] * filters[0] * cfg.num_classes
    return 2 * total
