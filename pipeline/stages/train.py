"""Train stage: fit FlexUNet on data/<name>/{train,valid}, tracked in MLflow and DVCLive.

Outputs (all or nothing): models/model.keras (the last epoch's weights, or the lowest
validation loss's with train.keep_weights: best), models/train_run.json (MLflow run id for
the later stages), metrics/train.json, plots/train_curves.png and the per-epoch DVCLive
plots in dvclive/. A killed training resumes at its last completed epoch (pipeline.model.resume).
The run records its three splits as inputs (the dataset fingerprint as their digest) and
samples system metrics (CPU, memory) while it trains.

Fine-tuning: `train.init_from` (a .keras file, or an MLflow URI resolved by
pipeline.tracking.download_keras_model) gives the weights the training starts from; the
run is tagged `flexunet.init_from` with the value and `flexunet.init_from_source` with
what was loaded.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic import atomic_path, remove_on_failure, write_json
from common.errors import DataError
from pipeline import plots
from pipeline.data.pairs import find_pairs
from pipeline.data.samples import load_infer_samples, load_large_samples
from pipeline.layout import SPLITS, Layout
from pipeline.model.architecture import forward_flops
from pipeline.model.callbacks import EpochChangeInference, EpochChangeTiledInference
from pipeline.model.fit import Fit, fit, onednn_enabled
from pipeline.model.flexunet import as_float32
from pipeline.model.resume import Snapshot, TrainingState
from pipeline.tracking import (download_keras_model, find_project_root, is_mlflow_uri, standard_tags, start_run,
                               store_record)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_path: Path
    best_epoch: int
    epochs_run: int
    metrics: dict[str, float]


def stage_callbacks(layout: Layout, run, snapshot: Snapshot | None) -> list:
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


CONTEXTS = {"train": "training", "valid": "validation", "test": "testing"}
# MLflow stores a dataset digest in at most 36 characters: the fingerprint's first 12, as a
# short git commit (the full one is the input's `dataset.fingerprint` tag and the run's).
DIGEST_CHARS = 12


def split_rows(layout: Layout, manifest: dict, split: str) -> list[dict]:
    """One row per image of the split: its files (project-relative) and, when the manifest
    knows them (kidney-t2w), the subject, scan and group it comes from."""
    scans = {stem: scan for scan in manifest.get("scans", []) for stem in scan.get("stems", [])}
    rows = []
    for pair in find_pairs(layout.data_dir / split):
        scan = scans.get(pair.image.stem, {})
        rows.append({"image": _relative(pair.image, layout.root), "mask": _relative(pair.mask, layout.root),
                     **{k: str(scan[k]) for k in ("subject_id", "scan", "group") if k in scan}})
    return rows


def _relative(path: Path, root: Path) -> str:
    """Project-relative when inside the project (the same on every clone), else absolute."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def log_datasets(layout: Layout, run, manifest: dict) -> None:
    """The train, valid and test splits as the run's inputs: the lineage the MLflow UI shows."""
    fingerprint = manifest.get("fingerprint") or "unknown"
    name = manifest.get("dataset") or layout.params.dataset.name
    for split in SPLITS:
        run.log_dataset(split_rows(layout, manifest, split), name=f"{name}/{split}",
                        source=_relative(layout.data_dir / split, layout.root),
                        digest=fingerprint[:DIGEST_CHARS], context=CONTEXTS[split],
                        tags={"dataset.fingerprint": fingerprint})


@contextmanager
def initial_weights(layout: Layout) -> Iterator[tuple[Path, str] | None]:
    """train.init_from as a local .keras file and its source (an MLflow model downloaded
    into a temporary folder, removed afterwards); None when it is null."""
    value = layout.params.train.init_from
    if value is None:
        yield None
        return
    if not is_mlflow_uri(value):
        path = layout.root / value
        if path.resolve() == layout.model_file.resolve():
            raise DataError(f"{path}: train.init_from names the train stage's own output, which DVC removes before "
                            f"the stage runs; copy it aside (cp {value} models/init.keras) and name the copy")
        if not path.is_file():
            raise DataError(f"{path}: train.init_from names no file; give a .keras model (e.g. models/model.keras "
                            f"of another run), an MLflow URI (models:/<name>@<alias>) or null")
        yield path, str(path)
        return
    with tempfile.TemporaryDirectory(prefix="init-from-") as tmp:
        path, source = download_keras_model(value, layout.params.mlflow, find_project_root(layout.root), Path(tmp))
        yield path, f"{value} ({source})" if source != value else value


def train(layout: Layout) -> TrainResult:
    p = layout.params
    manifest = layout.read_manifest()
    project_root = find_project_root(layout.root)
    state = TrainingState.for_params(project_root, p, manifest.get("fingerprint")) if p.train.resume else None
    snapshot = state.latest() if state is not None else None
    outputs = [layout.model_file, layout.run_file, layout.train_metrics_file,
               layout.plots / "train_curves.png", layout.dvclive]
    tags = standard_tags(project_root, manifest.get("fingerprint"), "train")
    tags["tf.onednn"] = str(onednn_enabled()).lower()
    if p.train.use_tuned_params:
        tags["flexunet.tuned_params"] = str(layout.tuned_params_file.relative_to(layout.root))
    if snapshot is not None:
        tags.update({"flexunet.resumed_from_run": snapshot.run_id or "unknown",
                     "flexunet.resumed_at_epoch": str(snapshot.epochs_done + 1)})
    # init_from is resolved first: a wrong value stops before any output is touched
    with initial_weights(layout) as init, remove_on_failure(outputs), \
            start_run(p.mlflow, project_root, tags=tags, system_metrics=True) as run:
        run.log_params(p.flat())
        if init is not None:
            run.set_tags({"flexunet.init_from": p.train.init_from, "flexunet.init_from_source": init[1]})
        log_datasets(layout, run, manifest)
        for epoch in range(snapshot.epochs_done if snapshot else 0):   # the new run's curves start at epoch 1
            run.log_metrics({k: v[epoch] for k, v in snapshot.history.items()}, step=epoch + 1)
        layout.models.mkdir(parents=True, exist_ok=True)
        result = fit(layout, run, state=state, stage=True, stage_callbacks=stage_callbacks(layout, run, snapshot),
                     init_from=init)
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
    write_json(layout.train_metrics_file, summary)
    plots.training_curves(history, layout.plots / "train_curves.png")
    run.log_numbers(summary)
    if guard is not None:
        run.set_tags({"flexunet.time_guard": f"train.max_minutes {t.max_minutes} fired after epoch {guard} "
                                             f"of {t.epochs}"})
    run.log_artifact(layout.plots / "train_curves.png", "plots")
    if layout.params.mlflow.log_model:
        m = layout.params.model
        run.log_keras_model(model, np.zeros((1, m.image_height, m.image_width, m.image_channels), np.float32))
    # The run id only: each clone resolves its own store (`dvc pull` brings this file to
    # machines where the first clone's path means nothing); a server or an outside file is kept.
    write_json(layout.run_file, {"run_id": run.run_id, **store_record(run.tracking_uri, layout.root)})
    log.info("%d of %d epochs; kept epoch %d (val_loss %.4f; best %d: %.4f); model -> %s", epochs_run, t.epochs,
             kept + 1, val_loss[kept], best + 1, val_loss[best], layout.model_file)
    return TrainResult(run.run_id, layout.model_file, kept + 1, epochs_run, best_metrics)
