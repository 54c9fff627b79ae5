"""Train stage: fit FlexUNet on data/<name>/{train,valid}, tracked in MLflow and DVCLive.

Outputs (all or nothing): models/model.keras (best validation loss), models/train_run.json
(MLflow run id for the later stages), metrics/train.json, plots/train_curves.png and the
per-epoch DVCLive plots in dvclive/.
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
from pipeline.callbacks import EpochChangeInference, EpochChangeTiledInference, MlflowEpochLogger, TimeBudget
from pipeline.data.dataset import find_pairs, load_split, make_dataset
from pipeline.data.masks import ids_to_rgb, read_mask
from pipeline.layout import Layout
from pipeline.metrics import get_loss, training_metrics
from pipeline.model import as_float32, build_flexunet
from pipeline.params import Params, TrainParams
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
    """A fixed rate (the seed), or a per-step cosine decay over all `epochs`: with a short
    CPU budget the last epochs at a small rate settle the kidney borders that a constant
    rate keeps jittering."""
    if t.lr_schedule == "constant":
        return t.learning_rate
    return keras.optimizers.schedules.CosineDecay(
        t.learning_rate, decay_steps=t.epochs * steps_per_epoch, alpha=t.min_lr_fraction)


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


def compile_model(params: Params, steps_per_epoch: int = 1) -> keras.Model:
    model = build_flexunet(params.model, dtype=resolve_precision(params.train.precision))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(params.train, steps_per_epoch),
                                        clipvalue=params.train.clipvalue),
        loss=get_loss(params.train.loss),
        metrics=training_metrics(params.mask.class_names),
    )
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


def _callbacks(layout: Layout, run, checkpoint: Path | None) -> tuple[list, TimeBudget | None]:
    """The training callbacks; checkpoint=None is a tuning trial: no files (checkpoint,
    DVCLive), no panels and no time budget, only the per-epoch MLflow curves."""
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    t, stage = layout.params.train, checkpoint is not None
    callbacks: list = [
        *([keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_loss", save_best_only=True,
                                           save_weights_only=True)] if stage else []),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=t.patience, restore_best_weights=True),
        MlflowEpochLogger(run),
        # dvcyaml=None: dvc.yaml declares the plots itself; DVCLive must not rewrite it.
        *([DVCLiveCallback(live=Live(str(layout.dvclive), dvcyaml=None, save_dvc_exp=False, report=None))]
          if stage else []),
    ]
    if t.learning_rate_reducer:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=t.reducer_factor, patience=t.reducer_patience, min_lr=1e-7, verbose=int(stage)))
    if not stage:
        return callbacks, None
    if t.epoch_change_infer:
        images, truths = load_infer_samples(layout, t.num_infer_images)
        callbacks.append(EpochChangeInference(run, images, truths, layout.params.mask.colours, "epoch_change_infer",
                                              single_foreground_class=layout.params.mask.single_foreground_class))
    if t.epoch_change_tiled_infer:
        images, truths = load_large_samples(layout, t.num_infer_images)
        callbacks.append(EpochChangeTiledInference(run, images, truths, layout.params.mask.colours,
                                                   tile_size=layout.params.model.image_width,
                                                   single_foreground_class=layout.params.mask.single_foreground_class))
    budget = TimeBudget(t.max_minutes) if t.max_minutes else None
    if budget:
        callbacks.append(budget)
    return callbacks, budget


@dataclass
class Fit:
    model: keras.Model
    history: dict[str, list[float]]
    seconds: float
    n_train: int
    budget: TimeBudget | None


def subset(pairs: list, count: int | None, seed: int) -> list:
    """A seeded sample of `count` pairs, kept in file order (all of them if count is None)."""
    if count is None or count >= len(pairs):
        return pairs
    keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=count, replace=False))
    return [pairs[i] for i in keep]


def fit(layout: Layout, run, *, checkpoint: Path | None, extra_callbacks: list | None = None,
        train_subset: int | None = None) -> Fit:
    """Build, compile and fit FlexUNet from layout.params: the one training loop, used by
    the train stage (checkpoint = where the best weights go) and by every tuning trial
    (checkpoint=None, a train subset, Optuna's pruning callback in extra_callbacks)."""
    p = layout.params
    keras.utils.set_random_seed(p.train.seed)
    size = (p.model.image_width, p.model.image_height)
    train_pairs = subset(load_split(layout.data_dir, "train", p.mask, size), train_subset, p.train.seed)
    valid_pairs = load_split(layout.data_dir, "valid", p.mask, size)
    train_ds = make_dataset(train_pairs, p.mask, channels=p.model.image_channels, batch_size=p.train.batch_size,
                            augment=p.train.augment, shuffle_seed=p.train.seed)
    valid_ds = make_dataset(valid_pairs, p.mask, channels=p.model.image_channels, batch_size=p.train.batch_size)
    model = compile_model(p, steps_per_epoch=-(-len(train_pairs) // p.train.batch_size))
    log.info("FlexUNet: %s parameters, %d train / %d valid images, %s", f"{model.count_params():,}",
             len(train_pairs), len(valid_pairs), resolve_precision(p.train.precision))
    callbacks, budget = _callbacks(layout, run, checkpoint)
    start = time.monotonic()
    stage = checkpoint is not None
    history = model.fit(train_ds, validation_data=valid_ds, epochs=p.train.epochs,
                        callbacks=callbacks + (extra_callbacks or []),
                        verbose=(1 if sys.stdout.isatty() else 2) if stage else 0)
    seconds = time.monotonic() - start
    if checkpoint is not None and checkpoint.is_file():  # absent only if val_loss was never finite
        model.load_weights(checkpoint)
        checkpoint.unlink()
    return Fit(model, history.history, seconds, len(train_pairs), budget)


def train(layout: Layout) -> TrainResult:
    p = layout.params
    manifest = layout.read_manifest()
    project_root = find_project_root(layout.root)
    checkpoint = layout.models / ".best.weights.h5"
    outputs = [layout.model_file, layout.run_file, layout.metrics / "train.json",
               layout.plots / "train_curves.png", layout.dvclive, checkpoint]
    tags = standard_tags(project_root, manifest.get("fingerprint"), "train")
    if p.train.use_tuned_params:
        tags["flexunet.tuned_params"] = str(layout.tuned_params_file.relative_to(layout.root))
    with remove_on_failure(outputs), start_run(p.mlflow, project_root, tags=tags) as run:
        run.log_params(p.flat())
        layout.models.mkdir(parents=True, exist_ok=True)
        result = fit(layout, run, checkpoint=checkpoint)
        model = as_float32(result.model, p.model)
        return _finish(layout, run, model, result.history, result.seconds, result.n_train, result.budget)


def _finish(layout: Layout, run, model, history: dict, seconds: float, n_train: int,
            budget: TimeBudget | None) -> TrainResult:
    val_loss = history["val_loss"]
    best = int(np.nanargmin(val_loss))
    best_metrics = {f"best_{k}": float(v[best]) for k, v in history.items() if k.startswith("val_")}
    summary = {
        **best_metrics, "best_epoch": best + 1, "epochs_run": len(val_loss),
        "train_seconds": round(seconds, 1), "train_images_per_second": round(n_train * len(val_loss) / seconds, 2),
        "time_budget_hit": bool(budget and budget.stopped_epoch), "params": int(model.count_params()),
    }
    with atomic_path(layout.model_file, suffix=".keras") as tmp:
        model.save(tmp)
    write_json(layout.metrics / "train.json", summary)
    plots.training_curves(history, layout.plots / "train_curves.png")
    run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    run.log_artifact(layout.plots / "train_curves.png", "plots")
    if layout.params.mlflow.log_model:
        m = layout.params.model
        run.log_keras_model(model, np.zeros((1, m.image_height, m.image_width, m.image_channels), np.float32))
    write_json(layout.run_file, {"run_id": run.run_id, "tracking_uri": run.tracking_uri})
    log.info("best epoch %d of %d: val_loss %.4f; model -> %s", best + 1, len(val_loss), val_loss[best],
             layout.model_file)
    return TrainResult(run.run_id, layout.model_file, best + 1, len(val_loss), best_metrics)
