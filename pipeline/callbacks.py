"""Keras callbacks for MLflow logging, epoch-change inference and a time budget."""

from __future__ import annotations

import logging
import time

import keras
import numpy as np

from pipeline.panels import make_panel
from pipeline.tracking import RunLogger
from serving.labels import to_labels

log = logging.getLogger(__name__)


class MlflowEpochLogger(keras.callbacks.Callback):
    """Every Keras log value plus the learning rate, with step=epoch (1-based)."""

    def __init__(self, run: RunLogger):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.run.log_metrics(metrics, step=epoch + 1)


class EpochChangeInference(keras.callbacks.Callback):
    """The seed's epoch_change_infer: predict a few mini_test images after every epoch and
    log one input | truth | prediction panel with step=epoch, so the MLflow UI's image
    slider shows the masks forming."""

    def __init__(self, run: RunLogger, images: np.ndarray, truth_rgb: list[np.ndarray], colours, key: str,
                 single_foreground_class: bool = False):
        super().__init__()
        self.run, self.images, self.truth_rgb, self.key = run, images, truth_rgb, key
        self.colours = np.asarray(colours, dtype=np.uint8)
        self.single = single_foreground_class

    def on_epoch_end(self, epoch, logs=None):
        probs = self.model.predict(self.images.astype(np.float32), verbose=0, batch_size=8)
        preds = [self.colours[p] for p in to_labels(probs, single_foreground_class=self.single)]
        panel = make_panel(list(self.images), self.truth_rgb, preds)
        self.run.log_image(panel, key=self.key, step=epoch + 1)


class EpochChangeTiledInference(keras.callbacks.Callback):
    """The seed's epoch_change_tiled_infer: the whole mini_test images (e.g. 1024 px
    histology) predicted through the same tiler serving uses, every epoch, logged as
    one panel with step=epoch. Windows are the model's own input size; overlap and
    blending are the tiler's defaults (0.25, Gaussian), not `predict.*`, so tuning serving
    never retrains the model."""

    def __init__(self, run: RunLogger, images: list[np.ndarray], truth_rgb: list[np.ndarray], colours,
                 *, tile_size: int, overlap: float = 0.25, blend: str = "gaussian",
                 key: str = "epoch_change_tiled_infer", single_foreground_class: bool = False):
        super().__init__()
        self.run, self.images, self.truth_rgb, self.key = run, images, truth_rgb, key
        self.colours = np.asarray(colours, dtype=np.uint8)
        self.single = single_foreground_class
        self.tiling = {"tile_size": tile_size, "overlap": overlap, "blend": blend}

    def on_epoch_end(self, epoch, logs=None):
        from serving.tiling import sliding_window_inference

        def predict_fn(batch: np.ndarray) -> np.ndarray:
            return np.asarray(self.model.predict_on_batch(batch))

        preds = [self.colours[to_labels(sliding_window_inference(image, predict_fn, **self.tiling),
                                        single_foreground_class=self.single)]
                 for image in self.images]
        panel = make_panel(self.images, self.truth_rgb, preds, titles=("input", "truth", "tiled prediction"))
        self.run.log_image(panel, key=self.key, step=epoch + 1)


class TimeBudget(keras.callbacks.Callback):
    """Stop after `minutes` of fitting; EarlyStopping still restores the best weights."""

    def __init__(self, minutes: float):
        super().__init__()
        self.seconds = minutes * 60.0
        self.start = 0.0
        self.stopped_epoch: int | None = None

    def on_train_begin(self, logs=None):
        self.start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if time.monotonic() - self.start > self.seconds:
            log.warning("time budget of %.1f min reached after epoch %d: stopping", self.seconds / 60, epoch + 1)
            self.stopped_epoch = epoch + 1
            self.model.stop_training = True
