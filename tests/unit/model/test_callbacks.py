"""Epoch-change inference callbacks log what the MLflow UI's image slider shows."""

from __future__ import annotations

import numpy as np

from pipeline.model.callbacks import EpochChangeTiledInference
from pipeline.model.flexunet import build_flexunet
from pipeline.panels import GAP, HEADER
from pipeline.config.schema import ModelParams


class FakeRun:
    def __init__(self):
        self.images: list[tuple[str, int, np.ndarray]] = []

    def log_image(self, image, key, step=None):
        self.images.append((key, step, np.asarray(image)))


def test_tiled_epoch_change_inference_predicts_whole_large_images():
    cfg = ModelParams(image_width=32, image_height=32, num_classes=2, base_filters=2, base_kernels=(3, 3),
                      num_layers=2, dropout_rate=0.0)
    model = build_flexunet(cfg)  # fixed 32 px input: the tiler must feed it 32 px windows
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8), rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)]
    truths = [np.zeros(img.shape, np.uint8) for img in images]
    run = FakeRun()
    callback = EpochChangeTiledInference(run, images, truths, [(0, 0, 0), (255, 0, 0)], tile_size=32)
    callback.set_model(model)
    callback.on_epoch_end(0)
    callback.on_epoch_end(1)
    assert [(key, step) for key, step, _ in run.images] == [("epoch_change_tiled_infer", 1),
                                                            ("epoch_change_tiled_infer", 2)]
    panel = run.images[0][2]
    # rows: 64 px and 20 px images (smaller than a tile: padded, predicted, cropped back)
    assert panel.shape == (HEADER + 64 + GAP + 20, 3 * 80 + 2 * GAP, 3)
    prediction = panel[HEADER:HEADER + 64, 2 * (80 + GAP):]
    assert {tuple(c) for c in np.unique(prediction.reshape(-1, 3), axis=0)} <= {(0, 0, 0), (255, 0, 0)}
