"""Train stage: fit FlexUNet on data/<name>/{train,valid}, tracked in MLflow and DVCLive.

Outputs (all or nothing): models/model.keras (the last epoch's weights, or the lowest
validation loss's with train.keep_weights: best), models/train_run.json (MLflow run id for
the later stages), metrics/train.json, plots/train_curves.png and the per-epoch DVCLive
plots in dvclive/. A killed training resumes at its last completed epoch (pipeline.resume).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from pipeline import plots
from pipeline.callbacks import (
    EpochChangeInference, EpochChangeTiledInference, EpochSeeds, MlflowEpochLogger, TimeGuard,
)
from pipeline.data.dataset import (
    SplitArrays, find_pairs, load_arrays, plain_batches, steps_per_epoch, training_stream,
)
from pipeline.data.masks import ids_to_rgb, read_mask
from pipeline.layout import Layout
from pipeline.metrics import get_loss, training_metrics
from pipeline.architecture import forward_flops
from pipeline.model import as_float32, build_flexunet
from pipeline.params import Params, TrainParams
from pipeline.resume import RestoreCallbacks, SaveEpoch, Snapshot, TrainingState, restore
from pipeline.tracking import find_project_root, standard_tags, start_run
from serving.atomic import atomic_path, remove_on_failure, write_json
from serving.imageio import read_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_path: Path
    best_epoch: int
    epochs_run: int
    metrics: dict[str, float]


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


def load_infer_samples(layout: Layout, count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """First `count` mini_test pairs at model size (large images resized, as the seed's
    plain inference did; tiled inference keeps them whole)."""
    p = layout.params
    size = (p.model.image_width, p.model.image_height)
    pairs = find_pairs(layout.data_dir / "mini_test")[:count]
    images, truths = [], []
    for pair in pairs:
        image = read_image(pair.image, p.model.image_channels)
        ids = read_mask(pair.mask, p.mask)
        if image.shape[:2] != (size[1], size[0]):
            image = np.asarray(Image.fromarray(image.squeeze()).resize(size, Image.BILINEAR))
            image = image.reshape(size[1], size[0], -1)
            ids = np.asarray(Image.fromarray(ids).resize(size, Image.NEAREST))
        images.append(image)
        truths.append(ids_to_rgb(ids, p.mask.colours))
    return np.stack(images), truths


def load_large_samples(layout: Layout, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """First `count` mini_test pairs at their own size, for tiled inference."""
    p = layout.params
    pairs = find_pairs(layout.data_dir / "mini_test")[:count]
    images = [read_image(pair.image, p.model.image_channels) for pair in pairs]
    truths = [ids_to_rgb(read_mask(pair.mask, p.mask), p.mask.colours) for pair in pairs]
    return images, truths


def _callbacks(layout: Layout, run, state: TrainingState | None, snapshot: Snapshot | None,
               stage: bool) -> tuple[list, TimeGuard | None]:
    """The training callbacks. stage=False is a tuning trial: no files (checkpoints,
    DVCLive), no panels, no time guard and no resume state, only the per-epoch MLflow curves."""
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
        callbacks += _stage_callbacks(layout, run, snapshot)
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


def _stage_callbacks(layout: Layout, run, snapshot: Snapshot | None) -> list:
    """DVCLive (replaying a resumed run's epochs first) and the epoch-change panels."""
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback
    from dvclive.utils import standardize_metric_name

    p = layout.params
    # dvcyaml=None: dvc.yaml declares the plots itself; DVCLive must not rewrite it.
    live = Live(str(layout.dvclive), dvcyaml=None, save_dvc_exp=False, report=None)
    for epoch in range(snapshot.epochs_done if snapshot else 0):
        for key, values in snapshot.history.items():
            live.log_metric(standardize_metric_name(key, "dvclive.keras"), values[epoch])
        live.next_step()
    callbacks: list = [DVCLiveCallback(live=live)]
    single = p.mask.single_foreground_class
    if p.train.epoch_change_infer:
        images, truths = load_infer_samples(layout, p.train.num_infer_images)
        callbacks.append(EpochChangeInference(run, images, truths, p.mask.colours, "epoch_change_infer",
                                              single_foreground_class=single))
    if p.train.epoch_change_tiled_infer:
        images, truths = load_large_samples(layout, p.train.num_infer_images)
        callbacks.append(EpochChangeTiledInference(run, images, truths, p.mask.colours,
                                                   tile_size=p.model.image_width, single_foreground_class=single))
    return callbacks


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
        extra_callbacks: list | None = None, data: tuple[SplitArrays, SplitArrays] | None = None,
        validation_freq: int = 1) -> Fit:
    """Build, compile and fit FlexUNet from layout.params: the one training loop, used by
    the train stage (stage=True; `state`: where epochs are saved for resuming) and by every
    tuning trial (its train subset in `data`, shared by the study's trials; Optuna's
    pruning callback in extra_callbacks; validation only every `validation_freq` epochs
    when nothing prunes on the way)."""
    p, t = layout.params, layout.params.train
    keras.utils.set_random_seed(t.seed)
    train_split, valid_split = data if data is not None else load_training_data(layout)
    steps = steps_per_epoch(len(train_split), t.batch_size)
    model = compile_model(p, steps_per_epoch=steps, all_metrics=stage)
    snapshot = state.latest() if state is not None else None
    start = 0
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
    callbacks, guard = _callbacks(layout, run, state, snapshot, stage)
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


def train(layout: Layout) -> TrainResult:
    p = layout.params
    manifest = layout.read_manifest()
    project_root = find_project_root(layout.root)
    state = TrainingState.for_params(project_root, p, manifest.get("fingerprint")) if p.train.resume else None
    snapshot = state.latest() if state is not None else None
    outputs = [layout.model_file, layout.run_file, layout.metrics / "train.json",
               layout.plots / "train_curves.png", layout.dvclive]
    tags = standard_tags(project_root, manifest.get("fingerprint"), "train")
    tags["tf.onednn"] = str(onednn_enabled()).lower()
    if p.train.use_tuned_params:
        tags["flexunet.tuned_params"] = str(layout.tuned_params_file.relative_to(layout.root))
    if snapshot is not None:
        tags.update({"flexunet.resumed_from_run": snapshot.run_id or "unknown",
                     "flexunet.resumed_at_epoch": str(snapshot.epochs_done + 1)})
    with remove_on_failure(outputs), start_run(p.mlflow, project_root, tags=tags) as run:
        run.log_params(p.flat())
        for epoch in range(snapshot.epochs_done if snapshot else 0):   # the new run's curves start at epoch 1
            run.log_metrics({k: v[epoch] for k, v in snapshot.history.items()}, step=epoch + 1)
        layout.models.mkdir(parents=True, exist_ok=True)
        result = fit(layout, run, state=state, stage=True)
        model = as_float32(result.model, p.model)
        done = _finish(layout, run, model, result)
    if state is not None:
        state.clear()
    return done


def _finish(layout: Layout, run, model, result: Fit) -> TrainResult:
    t, history = layout.params.train, result.history
    val_loss = history["val_loss"]
    epochs_run = len(val_loss)
    best = int(np.nanargmin(val_loss))
    kept = best if t.keep_weights == "best" else epochs_run - 1
    final_metrics = {f"final_{k}": float(v[-1]) for k, v in history.items() if k.startswith("val_")}
    best_metrics = {f"best_{k}": float(v[best]) for k, v in history.items() if k.startswith("val_")}
    guard = result.guard.fired_after_epoch if result.guard else None
    summary = {
        **best_metrics, **final_metrics, "best_epoch": best + 1, "kept_epoch": kept + 1,
        "epochs_run": epochs_run, "epochs_configured": t.epochs, "resumed_at_epoch": result.resumed_epochs + 1
        if result.resumed_epochs else None, "train_seconds": round(result.seconds, 1),
        "train_images_per_second": round(result.n_train * epochs_run / result.seconds, 2),
        "time_guard_fired": guard is not None, "params": int(model.count_params()),
        "forward_gflop_per_image": round(forward_flops(layout.params.model) / 1e9, 4),
    }
    with atomic_path(layout.model_file, suffix=".keras") as tmp:
        model.save(tmp)
    write_json(layout.metrics / "train.json", summary)
    plots.training_curves(history, layout.plots / "train_curves.png")
    run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if guard is not None:
        run.set_tags({"flexunet.time_guard": f"train.max_minutes {t.max_minutes} fired after epoch {guard} "
                                             f"of {t.epochs}"})
    run.log_artifact(layout.plots / "train_curves.png", "plots")
    if layout.params.mlflow.log_model:
        m = layout.params.model
        run.log_keras_model(model, np.zeros((1, m.image_height, m.image_width, m.image_channels), np.float32))
    write_json(layout.run_file, {"run_id": run.run_id, "tracking_uri": run.tracking_uri})
    log.info("%d of %d epochs; kept epoch %d (val_loss %.4f; best %d: %.4f); model -> %s", epochs_run, t.epochs,
             kept + 1, val_loss[kept], best + 1, val_loss[best], layout.model_file)
    return TrainResult(run.run_id, layout.model_file, kept + 1, epochs_run, best_metrics)


def onednn_enabled() -> bool:
    """Whether this process's TensorFlow runs oneDNN kernels (train.onednn, and TF's own
    CPU policy: it has no oneDNN path on CPUs without AVX512-VNNI/BF16 or AMX)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())
