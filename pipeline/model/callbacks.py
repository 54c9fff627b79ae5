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
        # The rate the next epoch starts with (after ReduceLROnPlateau, which runs first),
        # written back into `logs` so DVCLive and the resume state record the same value.
        logs = logs if logs is not None else {}
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.run.log_metrics({k: float(v) for k, v in logs.items()}, step=epoch + 1)


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
    blending are the tiler's defaults (serving.settings.TilingSettings'), not `predict.*`,
    so tuning serving never retrains the model."""

    def __init__(self, run: RunLogger, images: list[np.ndarray], truth_rgb: list[np.ndarray], colours,
                 *, tile_size: int, key: str = "epoch_change_tiled_infer", single_foreground_class: bool = False):
        super().__init__()
        self.run, self.images, self.truth_rgb, self.key = run, images, truth_rgb, key
        self.colours = np.asarray(colours, dtype=np.uint8)
        self.single = single_foreground_class
        self.tile_size = tile_size

    def on_epoch_end(self, epoch, logs=None):
        from serving.tiling import sliding_window_inference

        def predict_fn(batch: np.ndarray) -> np.ndarray:
            return np.asarray(self.model.predict_on_batch(batch))

        preds = [self.colours[to_labels(sliding_window_inference(image, predict_fn, tile_size=self.tile_size),
                                        single_foreground_class=self.single)]
                 for image in self.images]
        panel = make_panel(self.images, self.truth_rgb, preds, titles=("input", "truth", "tiled prediction"))
        self.run.log_image(panel, key=self.key, step=epoch + 1)


class TimeGuard(keras.callbacks.Callback):
    """Opt-in (train.max_minutes): stop after `minutes` of fitting, counting the minutes of
    the epochs a resumed run already completed (`elapsed`). `fired_after_epoch` tells."""

    def __init__(self, minutes: float, elapsed: float = 0.0):
        super().__init__()
        self.seconds, self.elapsed = minutes * 60.0, elapsed
        self.start = 0.0
        self.fired_after_epoch: int | None = None

    def on_train_begin(self, logs=None):
        self.start = time.monotonic() - self.elapsed

    def seconds_used(self) -> float:
        return time.monotonic() - self.start

    def on_epoch_end(self, epoch, logs=None):
        if self.seconds_used() > self.seconds:
            log.warning("train.max_minutes (%.1f) reached after epoch %d of %d: stopping", self.seconds / 60,
                        epoch + 1, self.params.get("epochs", 0))
            self.fired_after_epoch = epoch + 1
            self.model.stop_training = True


class EpochSeeds(keras.callbacks.Callback):
    """Sets every random layer's seed state (dropout) from (seed, epoch, layer) when an
    epoch begins, so the masks an epoch draws do not depend on how many epochs ran before
    in this process: a training resumed at epoch k draws what an uninterrupted one would."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        for i, generator in enumerate(seed_generators(self.model)):
            value = np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0] % 2**31
            generator.state.assign(np.array([value, 0], dtype=generator.state.dtype))


def seed_generators(model: keras.Model) -> list:
    """The model's SeedGenerators (one per dropout layer), in layer order."""
    found = (getattr(layer, "seed_generator", None) for layer in model.layers)
    return [g for g in found if isinstance(g, keras.random.SeedGenerator)]
