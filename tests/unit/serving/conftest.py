"""Shared by the serving tests: tiny ONNX models (tests/onnx_models.py), a test image, and the
one-line UserError check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from tests.onnx_models import make_tiny_onnx


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "rgb": make_tiny_onnx(d / "rgb.onnx"),
        "pixelwise": make_tiny_onnx(d / "pixelwise.onnx", kernel_size=1, tile_size=16),
        "grey": make_tiny_onnx(d / "grey.onnx", channels=1, num_classes=2, size_multiple=8),
    }


def ramp_image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    ramp = np.linspace(0, 255, w)[None, :, None]
    noise = np.random.default_rng(seed).normal(0, 30, (h, w, c))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def raises_one_line(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    return message
