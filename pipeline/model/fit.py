"""The one training loop: build, compile and fit FlexUNet from params.

Used by the train stage (a full run, resumable epoch by epoch) and by every tuning trial
(a subset, no files), so a trial's score and the final model come from the same code.
Fine-tuning (train.init_from) is the same loop started from a trained model's weights
instead of random ones; only the train stage passes them (a tuning trial compares
architectures, which one fixed start would not fit).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from common.errors import FlexUNetError
from pipeline.config.schema import Params, TrainParams
from pipeline.data.pairs import find_pairs
from pipeline.data.tfdata import SplitArrays, load_arrays, plain_batches, steps_per_epoch, training_stream
from pipeline.layout import Layout
from pipeline.model.architecture import forward_flops
from pipeline.model.callbacks import EpochSeeds, MlflowEpochLogger, TimeGuard
from pipeline.model.flexunet import build_flexunet, load_model
from pipeline.model.losses import get_loss, training_metrics
from pipeline.model.resume import RestoreCallbacks, SaveEpoch, Snapshot, TrainingState, restore

log = logging.getLogger(__name__)


def learning_rate(t: TrainParams, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """A fixed rate (the seed), or a per-step cosine decay to learning_rate x min_lr_fraction
    at the last step, after `warmup_epochs` of linear warm-up from that floor. Both are
    fixed in advance: no validation plateau decides anything."""
    if t.lr_schedule == "constant":
        return t.learning_rate
    warmup = round(t.warmup_epochs * steps_per_epoch)
    floor = t.learning_rate * t.min_lr_fraction
    return keras.optimizers.schedules.CosineDecay(
        floor if warmup else t.learning_rate, decay_steps=t.epochs * steps_per_epoch - warmup,
        alpha=t.min_lr_fraction, warmup_target=t.learning_rate if warmup else None, warmup_steps=warmup)


def resolve_precision(precision: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """'auto' -> mixed_bfloat16 where the CPU has native bfloat16 (AVX512-BF16 or AMX),
    float32 elsewhere (emulated bfloat16 is slower than float32)."""
    if precision != "auto":
        return precision
    try:
        flags = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "float32"
    return "mixed_bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def compile_model(params: Params, steps_per_epoch: int = 1, all_metrics: bool = True) -> keras.Model:
    """all_metrics=False: per-class Dice only (what a tuning trial scores), a smaller graph to trace."""
    model = build_flexunet(params.model, dtype=resolve_precision(params.train.precision))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(params.train, steps_per_epoch),
                                        clipvalue=params.train.clipvalue),
        loss=get_loss(params.train.loss),
        metrics=training_metrics(params.mask.class_names, dice_only=not all_metrics),
    )
    # Adam's moments built now, not inside the first traced train step: variables created
    # there make tf.function trace the whole step a second time (seconds per fit on a CPU).
    model.optimizer.build(model.trainable_variables)
    return model


def describe(model: keras.Model) -> str:
    """A FlexUNet's architecture in the params' terms, for the init_from mismatch error."""
    convs = {layer.name: layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)}
    first = convs.get("enc0_conv0")
    if first is None:   # not a FlexUNet: what can still be compared
        return f"{model.name}: {len(model.weights)} weight tensors, {model.count_params():,} parameters"
    levels = sum(1 for name in convs if name.startswith("enc") and name.endswith("_conv0"))
    batchnorm = any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    channels, classes = model.input_shape[-1], model.output_shape[-1]
    return (f"base_filters {first.filters}, first kernel {first.kernel_size[0]}x{first.kernel_size[1]}, "
            f"{levels} levels, {channels} channels, {classes} classes, normalization {str(batchnorm).lower()}")


def load_initial_weights(model: keras.Model, source: Path, label: str) -> None:
    """Fine-tuning: the weights of the trained model in `source` (a .keras file) into the
    freshly built `model`; shapes must match one to one (the image size may differ: every
    weight of the fully convolutional FlexUNet is independent of it)."""
    trained = load_model(source)
    ours, theirs = [tuple(w.shape) for w in model.weights], [tuple(w.shape) for w in trained.weights]
    if ours != theirs:
        raise FlexUNetError(f"train.init_from {label}: its model ({describe(trained)}) does not fit the one "
                            f"params.yaml builds ({describe(model)}); set model (and train.use_tuned_params: "
                            f"false) to its architecture, or train from scratch with train.init_from: null")
    model.set_weights(trained.get_weights())
    log.info("init_from: %d weight tensors (%s parameters) from %s", len(ours), f"{model.count_params():,}", label)


def _callbacks(layout: Layout, run, state: TrainingState | None, snapshot: Snapshot | None,
               stage: bool, stage_callbacks: list) -> tuple[list, TimeGuard | None]:
    """The training callbacks. stage=False is a tuning trial: no files (checkpoints,
    DVCLive), no panels (the train stage passes those in `stage_callbacks`), no time guard
    and no resume state, only the per-epoch MLflow curves."""
    t = layout.params.train
    schedule: list = []   # callbacks whose state carries from epoch to epoch
    if t.keep_weights == "best" and state is not None:
        schedule.append(keras.callbacks.ModelCheckpoint(state.best_weights, monitor="val_loss", save_best_only=True,
                                                        save_weights_only=True))
    if t.patience is not None:
        schedule.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=t.patience))
    if t.learning_rate_reducer:
        schedule.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=t.reducer_factor, patience=t.reducer_patience, min_lr=1e-7, verbose=int(stage)))
    callbacks: list = [EpochSeeds(t.seed), *schedule, MlflowEpochLogger(run)]
    guard = None
    if stage:
        callbacks += stage_callbacks
        if t.max_minutes:
            guard = TimeGuard(t.max_minutes, elapsed=snapshot.seconds if snapshot else 0.0)
            callbacks.append(guard)
    if snapshot is not None:
        callbacks.append(RestoreCallbacks(schedule, snapshot.callbacks))
    if state is not None:   # last: it records the others' state after the epoch
        clock = guard.seconds_used if guard else _clock(snapshot.seconds if snapshot else 0.0)
        callbacks.append(SaveEpoch(state, run.run_id, schedule, snapshot.history if snapshot else {}, clock))
    return callbacks, guard


def _clock(elapsed: float):
    start = time.monotonic() - elapsed
    return lambda: time.monotonic() - start


@dataclass
class Fit:
    model: keras.Model
    history: dict[str, list[float]]   # every epoch, the resumed ones included
    seconds: float                    # fitting time, the resumed epochs' included
    n_train: int
    guard: TimeGuard | None
    resumed_epochs: int = 0


def subset(pairs: list, count: int | None, seed: int) -> list:
    """A seeded sample of `count` pairs, kept in file order (all of them if count is None)."""
    if count is None or count >= len(pairs):
        return pairs
    keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=count, replace=False))
    return [pairs[i] for i in keep]


def load_training_data(layout: Layout, train_subset: int | None = None) -> tuple[SplitArrays, SplitArrays]:
    """The train split (a seeded subset of it, for trials) and the valid split, decoded and checked."""
    p, t = layout.params, layout.params.train
    arrays = {"channels": p.model.image_channels, "size": (p.model.image_width, p.model.image_height),
              "cache": t.cache}
    train_pairs = subset(find_pairs(layout.data_dir / "train"), train_subset, t.seed)
    return (load_arrays(train_pairs, p.mask, desc="decoding train", **arrays),
            load_arrays(find_pairs(layout.data_dir / "valid"), p.mask, desc="decoding valid", **arrays))


def fit(layout: Layout, run, *, state: TrainingState | None = None, stage: bool = False,
        stage_callbacks: list | None = None, extra_callbacks: list | None = None,
        data: tuple[SplitArrays, SplitArrays] | None = None, validation_freq: int = 1,
        init_from: tuple[Path, str] | None = None) -> Fit:
    """Build, compile and fit FlexUNet from layout.params: the one training loop, used by
    the train stage (stage=True; `state`: where epochs are saved for resuming;
    `stage_callbacks`: its DVCLive and epoch-change panels) and by every
    tuning trial (its train subset in `data`, shared by the study's trials; Optuna's
    pruning callback in extra_callbacks; validation only every `validation_freq` epochs
    when nothing prunes on the way). `init_from`: a .keras file (and what to call it in
    messages) whose weights start the training, unless it resumes (its snapshot holds
    the weights of its epochs, which started from those)."""
    p, t = layout.params, layout.params.train
    keras.utils.set_random_seed(t.seed)
    train_split, valid_split = data if data is not None else load_training_data(layout)
    steps = steps_per_epoch(len(train_split), t.batch_size)
    model = compile_model(p, steps_per_epoch=steps, all_metrics=stage)
    snapshot = state.latest() if state is not None else None
    start = 0
    if init_from is not None and snapshot is None:
        load_initial_weights(model, *init_from)
    if snapshot is not None:
        restore(model, snapshot)
        start = snapshot.epochs_done
        log.info("resuming at epoch %d of %d from %s", start + 1, t.epochs, snapshot.folder)
    train_ds = training_stream(train_split, batch_size=t.batch_size, epochs=t.epochs, start_epoch=start, seed=t.seed,
                               augment=t.augment, num_classes=p.model.num_classes)
    valid_ds = plain_batches(valid_split, batch_size=t.batch_size, num_classes=p.model.num_classes)
    log.info("FlexUNet: %s parameters, %d train / %d valid images, %s, %.2f GFLOP per image forward",
             f"{model.count_params():,}", len(train_split), len(valid_split), resolve_precision(t.precision),
             forward_flops(p.model) / 1e9)
    callbacks, guard = _callbacks(layout, run, state, snapshot, stage, stage_callbacks or [])
    began = time.monotonic()
    history = model.fit(train_ds, validation_data=valid_ds, validation_freq=validation_freq,
                        epochs=t.epochs, initial_epoch=start,
                        steps_per_epoch=steps, callbacks=callbacks + (extra_callbacks or []),
                        verbose=(1 if sys.stdout.isatty() else 2) if stage else 0)
    seconds = time.monotonic() - began + (snapshot.seconds if snapshot else 0.0)
    merged = {k: list(v) for k, v in snapshot.history.items()} if snapshot else {}
    for key, values in history.history.items():
        merged.setdefault(key, []).extend(values)
    if t.keep_weights == "best" and state is not None and state.best_weights.is_file():
        model.load_weights(state.best_weights)   # absent only if val_loss was never finite
    return Fit(model, merged, seconds, len(train_split), guard, start)


def onednn_enabled() -> bool:
    """Whether this process's TensorFlow runs oneDNN kernels (train.onednn, and TF's own
    CPU policy: it has no oneDNN path on CPUs without AVX512-VNNI/BF16 or AMX)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())
