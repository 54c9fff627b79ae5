"""Evaluate stage: test-split metrics, confusion matrix and mini_test panels.

Metrics are accumulated over the whole test split (pixel counts summed, then divided),
not averaged per batch, so they do not depend on the batch size. The object scores
(`evaluate.object_metrics`) and the uncertainty AUROC come from the same predictions in
the same pass. Everything is logged into the training run named in models/train_run.json.

For kidney-t2w the run is also scored on the real development sample
(`evaluate.real_sample`, pipeline/scoring/real_sample.py): metrics/real_sample.json,
plots/real_sample_panel.png and MLflow `real_*`, so a model that only learnt the
synthetic generator shows it. The glomeruli sample is whole 1024 px tiles at their own
pixel size, which only `flexunet predict`'s code predicts as a user gets them: the
evaluate_tiled stage scores it, and real_sample.json here says so.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import keras
import numpy as np
from tqdm import tqdm

from pipeline import plots
from pipeline.data.masks import ids_to_rgb
from pipeline.data.pairs import find_pairs, mini_test_pairs
from pipeline.data.samples import load_infer_samples
from pipeline.data.tfdata import load_split, make_dataset
from pipeline.config.schema import EvaluateParams
from pipeline.layout import TKV_EXTRA, Layout
from pipeline.model.flexunet import load_model
from pipeline.model.losses import get_loss
from pipeline.panels import make_panel, notice_panel
from pipeline.scoring.auroc import UncertaintyAuroc
from pipeline.scoring.confusion import Accumulator
from pipeline.scoring.objects import ObjectScores
from pipeline.scoring import real_tiles
from pipeline.scoring.real_sample import KIDNEY_DICE, not_scored, score_sample, summary_line, whole_slice_labels
from pipeline.scoring.tkv import SlicePrediction, tkv_report
from pipeline.tracking import find_project_root, start_run
from common.atomic import remove_on_failure, write_json
from common.imageio import resize_image, resize_labels, save_palette_png, save_rgb_png
from serving.labels import to_labels

log = logging.getLogger(__name__)


def evaluate_split(model: keras.Model, layout: Layout, split: str = "test"
                   ) -> tuple[dict[str, float | None], np.ndarray, dict[str, SlicePrediction]]:
    """Metrics (pixel, object and uncertainty scores), confusion matrix, and per image
    (stem) what TKV needs of it (pipeline.scoring.tkv)."""
    p = layout.params
    pairs = load_split(layout.data_dir, split, p.mask, (p.model.image_width, p.model.image_height))
    ds = make_dataset(pairs, p.mask, channels=p.model.image_channels, batch_size=p.evaluate.batch_size)
    loss_fn = get_loss(p.train.loss)
    acc = Accumulator(p.model.num_classes, p.mask.single_foreground_class)
    objects, uncertainty = ObjectScores(p.evaluate.object_metrics, p.model.num_classes,
                                                p.predict.min_object_px or 0), UncertaintyAuroc()
    steps = -(-len(pairs) // p.evaluate.batch_size)
    slices: list[SlicePrediction] = []
    for images, onehot in tqdm(ds, total=steps, desc=f"evaluating {split}", unit="batch"):
        probs = model(images, training=False)
        truth, probs_np = onehot.numpy(), np.asarray(probs)
        labels = acc.update(truth, probs_np, float(keras.ops.mean(loss_fn(onehot, probs))))
        ids = truth.argmax(-1)
        objects.add(ids, labels)   # the served labels: the objects a user gets
        uncertainty.update(probs_np, ids)
        slices += _for_tkv(labels, probs_np, ids, images)
    metrics = {**acc.metrics(p.mask.class_names), **objects.metrics(), **uncertainty.metrics()}
    return metrics, acc.confusion, {pair.image.stem: c for pair, c in zip(pairs, slices)}


def _for_tkv(labels: np.ndarray, probs: np.ndarray, truth: np.ndarray, images: Any) -> list[SlicePrediction]:
    """Per image of a batch: what the TKV and its volume rules need."""
    grey = np.asarray(images)[..., 0].astype(np.uint8)
    return [SlicePrediction(lab != 0, p[..., 1:].astype(np.float16), t != 0, g)
            for lab, p, t, g in zip(labels, probs, truth, grey)]


def extra_slices(model: keras.Model, layout: Layout) -> dict[str, SlicePrediction]:
    """The test scans' slices kept outside the test split for TKV (pipeline.layout.TKV_EXTRA)."""
    p = layout.params
    folder = layout.data_dir / TKV_EXTRA
    if not (folder / "images").is_dir():
        return {}
    pairs = find_pairs(folder)
    ds = make_dataset(pairs, p.mask, channels=p.model.image_channels, batch_size=p.evaluate.batch_size)
    slices: list[SlicePrediction] = []
    for images, onehot in tqdm(ds, total=-(-len(pairs) // p.evaluate.batch_size), desc="TKV extra slices",
                               unit="batch"):
        probs = np.asarray(model(images, training=False))
        labels = to_labels(probs, single_foreground_class=p.mask.single_foreground_class)
        slices += _for_tkv(labels, probs, onehot.numpy().argmax(-1), images)
    return {pair.image.stem: c for pair, c in zip(pairs, slices)}


def save_mini_test(model: keras.Model, layout: Layout) -> np.ndarray:
    """Predict mini_test (plain, model size), save palette masks and one panel; return it."""
    p = layout.params
    pairs = mini_test_pairs(layout.data_dir, p.evaluate.num_panels)   # no mini_test: the first test images
    images, truths = load_infer_samples(layout, len(pairs), pairs)
    probs = model.predict(images.astype(np.float32), verbose=0, batch_size=p.evaluate.batch_size)
    colours = np.asarray(p.mask.colours, dtype=np.uint8)
    stems = [pair.image.stem for pair in pairs]
    labels = to_labels(probs, single_foreground_class=p.mask.single_foreground_class)
    for stem, ids in zip(stems, labels):
        save_palette_png(layout.predictions / f"{stem}.png", ids, p.mask.colours)
    panel = make_panel(list(images), truths, [colours[i] for i in labels])
    save_rgb_png(layout.plots / "mini_test_panel.png", panel)
    return panel


# Panel rows at this size: 8 slices at 512 px would make a 10 MB picture of the same masks.
PANEL_SIDE = 256


def real_sample(model: keras.Model, layout: Layout) -> tuple[dict[str, Any], np.ndarray | None]:
    """Score the model on evaluate.real_sample (kidney-t2w only) and draw its panel; the
    report says why when it is skipped (no panel then)."""
    p = layout.params
    reason = not_scored(p)
    if reason is not None:
        return {"available": False, "reason": reason}, None
    report, cases = score_sample(p, layout.root, lambda _, image: whole_slice_labels(
        lambda x: model(x, training=False), image, p.model.image_width, p.mask.single_foreground_class))
    rows = [[resize_image(image, PANEL_SIDE, PANEL_SIDE)]
            + [ids_to_rgb(resize_labels(ids, PANEL_SIDE, PANEL_SIDE), p.mask.colours) for ids in (truth, labels)]
            for image, truth, labels in cases]
    return report, make_panel(*map(list, zip(*rows)))


def quality_warnings(metrics: dict[str, float], training: dict[str, Any] | None, floors: EvaluateParams,
                     real: float | None = None, real_decides: bool | None = None) -> list[str]:
    """One line per reason to distrust this model: training cut short, or a Dice under its
    floor (`real`: the real-sample kidney Dice, None when not scored; `real_decides`: a
    real-sample score picks the champion, by default when `real` is given; glomeruli get
    theirs later, from evaluate_tiled)."""
    out = []
    if training:
        run, configured = training.get("epochs_run"), training.get("epochs_configured")
        why = "train.max_minutes fired" if training.get("time_guard_fired") else "early stopping (train.patience)"
        if isinstance(run, int) and isinstance(configured, int) and run < configured:
            out.append(f"training ran {run} of {configured} epochs ({why})")
        elif training.get("time_guard_fired"):
            out.append("train.max_minutes fired")
    dice = metrics["mean_foreground_dice"]
    if dice < floors.min_dice:
        deciding, _ = floors.champion_floor(real is not None if real_decides is None else real_decides)
        out.append(f"test mean foreground Dice {dice:.4f} is below evaluate.min_dice {floors.min_dice}"
                   + ("" if deciding == "min_dice" else " (the real sample, not this floor, decides the champion)"))
    if real is not None and real < floors.min_real_dice:
        out.append(f"real-sample kidney Dice {real:.4f} is below evaluate.min_real_dice {floors.min_real_dice}")
    return out


def _training_summary(layout: Layout) -> dict[str, Any] | None:
    path = layout.train_metrics_file
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def evaluate(layout: Layout) -> dict[str, Any]:
    p = layout.params
    model = load_model(layout.model_file)
    run_info = layout.read_run()
    tkv_json, tkv_plot = layout.metrics / "tkv.json", layout.plots / "bland_altman.png"
    real_json, real_panel = layout.real_sample_file, layout.plots / "real_sample_panel.png"
    outputs = [layout.eval_metrics_file, layout.plots / "confusion_matrix.png",
               layout.plots / "mini_test_panel.png", layout.predictions, tkv_json, tkv_plot, real_json, real_panel]
    project_root = find_project_root(layout.root)
    with remove_on_failure(outputs), start_run(p.mlflow, project_root, run_id=run_info["run_id"]) as run:
        metrics, confusion, slices = evaluate_split(model, layout)
        plots.confusion_matrix(confusion, p.mask.class_names, layout.plots / "confusion_matrix.png")
        save_mini_test(model, layout)
        real, panel = real_sample(model, layout)
        write_json(real_json, real)
        save_rgb_png(real_panel, panel if panel is not None else
                     notice_panel(f"real sample not scored: {real['reason']}"))
        real_dice = real.get(KIDNEY_DICE)   # absent when the sample was not scored
        warnings = quality_warnings(metrics, _training_summary(layout), p.evaluate, real_dice,
                                    real_decides=real_dice is not None or real_tiles.not_scored(p) is None)
        report = {**metrics, "confusion_matrix": confusion.tolist(), "object_metrics": p.evaluate.object_metrics,
                  "min_dice": p.evaluate.min_dice,
                  "below_min_dice": metrics["mean_foreground_dice"] < p.evaluate.min_dice,
                  "min_real_dice": p.evaluate.min_real_dice,
                  "below_min_real_dice": None if real_dice is None else real_dice < p.evaluate.min_real_dice,
                  "warnings": warnings}
        write_json(layout.eval_metrics_file, report)
        if warnings:
            run.set_tags({"flexunet.warnings": "; ".join(warnings)})
        slices.update(extra_slices(model, layout))
        tkv = tkv_report(layout.read_manifest(), slices, tkv_json, tkv_plot, class_names=p.mask.class_names,
                         min_component_ml=p.evaluate.min_component_ml)
        run.log_numbers(metrics, prefix="test_")
        run.log_numbers({k: v for k, v in tkv.items() if k != "min_component_ml"}, prefix="test_tkv_")
        run.log_numbers(tkv.get("without_rules", {}), prefix="test_tkv_without_rules_")
        run.log_numbers({k: v for k, v in real.items() if k.startswith("real_")})
        for path, folder in ((layout.plots / "confusion_matrix.png", "plots"), (tkv_plot, "plots"),
                             (layout.plots / "mini_test_panel.png", "plots"), (layout.eval_metrics_file, "metrics"),
                             (tkv_json, "metrics"), (real_json, "metrics"), (real_panel, "plots")):
            run.log_artifact(path, folder)
        if tkv.get("available"):
            log.info("TKV on %d test scans: bias %+.1f ml, 95%% limits of agreement %+.1f .. %+.1f ml (without the "
                     "volume rules %+.1f ml, %+.1f .. %+.1f)%s", tkv["scans"], tkv["bias_ml"], tkv["loa_low_ml"],
                     tkv["loa_high_ml"], tkv["without_rules"]["bias_ml"], tkv["without_rules"]["loa_low_ml"],
                     tkv["without_rules"]["loa_high_ml"],
                     f", repeat-scan CV {tkv['repeat_cv_predicted_percent']:.1f} % (true masks "
                     f"{tkv['repeat_cv_true_percent']:.1f} %)" if tkv.get("repeat_subjects") else "")
    log.info("test: mean foreground Dice %.4f, seed dice_coef_multiclass %.4f",
             metrics["mean_foreground_dice"], metrics["dice_coef_multiclass"])
    if metrics["uncertainty_auroc"] is not None:
        log.info("test: uncertainty AUROC for wrong pixels %.4f (mean uncertainty %.3f wrong, %.3f right)",
                 metrics["uncertainty_auroc"], metrics["uncertainty_mean_wrong"], metrics["uncertainty_mean_right"])
    if real.get("available"):
        log.info("%s; %d of %d mask pixels snapped (blended edges)", summary_line(real, p.mask.class_names),
                 real["real_snapped_pixels"], real["real_mask_pixels"])
    else:
        log.info("real sample not scored: %s", real["reason"])
    for warning in warnings:
        log.warning("%s: this model is not to be trusted (metrics/eval.json 'warnings')", warning)
    return report
