"""Register stage: the exported model into the MLflow Model Registry, with aliases.

What it does, in the training run named in models/train_run.json:
1. Logs models/model.onnx twice: with the `mlflow.onnx` flavour (tensor signature, a test
   image as input example) as `onnx`, and as the `flexunet` pyfunc model
   (serving/pyfunc.py: whole images of any size through the tiled predictor, the ONNX
   file as artifact `onnx`, the `serving` package shipped as code) -- the one
   `mlflow models serve -m models:/<name>@champion` serves.
2. Registers the pyfunc model as a NEW version of `registry.model_name`, tagged with the
   test metrics of metrics/eval.json (`test_mean_foreground_dice`, ...), the real-sample
   score (below), the dataset fingerprint, the git commit of the training run and the ONNX file's sha256; its
   description is a model card in Markdown (model_card(): data, metrics, limits, intended
   use), from the ONNX file's card, metrics/eval.json and the dataset manifest.

Alias rule (documented in docs/serving.md):
- `challenger` always moves to the version just registered (or reused);
- `champion` moves to it only if its test mean foreground Dice >= the current champion's
  (read from the champion version's `test_mean_foreground_dice` tag; a tie moves it, so
  a retrain of equal quality takes over). The first version becomes champion; a champion
  without that tag (registered by hand) is replaced.
- When both versions were scored on the real sample (`evaluate.real_sample`), that score
  decides instead: the same real images for every version, where a synthetic test split
  changes with the generator, and it is what a synthetic-only model is for
  (docs/results.md, "Real sample"). kidney-t2w: the kidney Dice of metrics/real_sample.json
  (tag `real_kidney_dice`); glomeruli: the glomerulus Dice of the whole real tiles through
  `flexunet predict`, metrics/real_sample_predict.json (tag `real_glomerulus_dice`, and
  `real_object_f1` beside it).
- A new version under a floor never becomes champion, the first version included: it is
  registered with the challenger alias only, and the decision (one log line,
  models/registered.json) names the score, the floor and its key. A version scored on the
  real sample needs `evaluate.min_real_dice` there (glomeruli also
  `evaluate.min_real_object_f1` on the object F1, unless null), one not scored needs
  `evaluate.min_dice` on the test mean foreground Dice. The evaluate stage's warnings
  (training cut short, a Dice under a floor) are written into the decision too.

Idempotent: when a version whose `onnx_sha256` tag equals this file's sha256 exists, nothing
is logged or registered again; that version is reused and the alias rule re-applied (which
leaves the aliases unchanged on a repeated call). models/registered.json records the
outcome (not cached by DVC, so the run-cache can never restore it without registering).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config.schema import EvaluateParams
from pipeline.data.pairs import find_pairs
from pipeline.scoring.real_sample import KIDNEY_DICE
from pipeline.scoring.real_tiles import GLOMERULUS_DICE, OBJECT_F1
from common.errors import DataError
from pipeline.layout import Layout
from pipeline.tracking import (
    Registry, VersionInfo, find_project_root, git_commit, metric_number, resolve_tracking_uri, run_tags, start_run,
    store_record,
)
from common.atomic import remove_on_failure, write_json
from serving.card import ModelCard, read_card, sha256_file
from common.imageio import read_image

log = logging.getLogger(__name__)

SHA_TAG = "onnx_sha256"
DICE_TAG = "test_mean_foreground_dice"
REAL_TAG = "real_kidney_dice"   # kidney's version tag; metrics/real_sample.json's key is KIDNEY_DICE
GLOMERULUS_TAG = GLOMERULUS_DICE  # glomeruli's, metrics/real_sample_predict.json's key ...
OBJECT_F1_TAG = OBJECT_F1         # ... and its object F1 (the floor evaluate.min_real_object_f1)
PYFUNC_NAME = "flexunet"   # the pyfunc model's name inside the run
ONNX_NAME = "onnx"         # the mlflow.onnx model's name inside the run


def _read_eval(layout: Layout) -> tuple[dict[str, float], list[str]]:
    """The test metrics and the evaluate stage's warnings."""
    path = layout.eval_metrics_file
    if not path.is_file():
        raise DataError(f"{path}: not found; run the evaluate stage first (dvc repro evaluate)")
    raw = json.loads(path.read_text(encoding="utf-8"))
    if metric_number(raw.get("mean_foreground_dice")) is None:
        raise DataError(f"{path}: no 'mean_foreground_dice'; re-run the evaluate stage")
    # evaluate writes its settings (the floors) beside the metrics: they are not metrics.
    metrics = {k: n for k, v in raw.items()
               if (n := metric_number(v)) is not None and k not in EvaluateParams.model_fields}
    return metrics, [str(w) for w in raw.get("warnings", [])]


@dataclass(frozen=True)
class RealScore:
    """A version's real-sample score: what the alias rule judges it by when it has one."""

    tag: str                          # the version tag holding `dice`: REAL_TAG or GLOMERULUS_TAG
    label: str                        # its name in decisions: "real-sample kidney Dice"
    dice: float
    object_f1: float | None = None    # glomeruli: object F1 at IoU >= 0.5

    def tags(self) -> dict[str, str]:
        return {self.tag: repr(self.dice),
                **({OBJECT_F1_TAG: repr(self.object_f1)} if self.object_f1 is not None else {})}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_real(layout: Layout) -> RealScore | None:
    """The kidney Dice of metrics/real_sample.json, else the glomerulus Dice (and object F1)
    of metrics/real_sample_predict.json; None when the real sample was not scored."""
    kidney = metric_number(_read_json(layout.real_sample_file).get(KIDNEY_DICE))
    if kidney is not None:
        return RealScore(REAL_TAG, "real-sample kidney Dice", kidney)
    tiles = _read_json(layout.real_sample_predict_file)
    glomerulus = metric_number(tiles.get(GLOMERULUS_DICE))
    if glomerulus is not None:
        return RealScore(GLOMERULUS_TAG, "real-sample glomerulus Dice", glomerulus, metric_number(tiles.get(OBJECT_F1)))
    return None


def _real_record(real: RealScore | None, dataset: str) -> dict[str, float | None]:
    """registered.json's real-sample keys: the dataset's, None when not scored."""
    if dataset != "glomeruli":
        return {REAL_TAG: real.dice if real else None}
    return {GLOMERULUS_TAG: real.dice if real else None, OBJECT_F1_TAG: real.object_f1 if real else None}


def _tag_value(champion: VersionInfo, tag: str) -> float:
    try:
        return float(champion.tags.get(tag, "nan"))
    except ValueError:
        return math.nan


def _example_image(layout: Layout, card: ModelCard) -> np.ndarray:
    """First test image (model size, uint8): a realistic input example for both models."""
    pairs = find_pairs(layout.data_dir / "test")
    return read_image(pairs[0].image, card.channels)


def _version_tags(layout: Layout, run_id: str, tracking_uri: str, card: ModelCard, sha: str,
                  metrics: dict[str, float], real: RealScore | None) -> dict[str, str]:
    commit = run_tags(tracking_uri, run_id).get("mlflow.source.git.commit") or git_commit(layout.root)
    return {**{f"test_{k}": repr(v) for k, v in metrics.items()}, SHA_TAG: sha,
            **(real.tags() if real is not None else {}),
            "dataset_fingerprint": card.dataset_fingerprint or "unknown", "git_commit": commit or "unknown",
            "dataset": card.dataset or "unknown"}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _scored(dice: float, real: RealScore | None) -> tuple[str, float]:
    """The score the alias rule judges a version by, and its name."""
    return (real.label, real.dice) if real is not None else ("test mean foreground Dice", dice)


def floor_checks(floors: EvaluateParams, dice: float, real: RealScore | None
                 ) -> list[tuple[str, float | None, str, float]]:
    """(score name, score, floor key, floor) of every floor a champion must reach: the Dice
    it is judged by, and for glomeruli on the real sample the object F1 (unless null)."""
    key, floor = floors.champion_floor(real is not None)
    checks: list[tuple[str, float | None, str, float]] = [(*_scored(dice, real), key, floor)]
    if real is not None and real.tag == GLOMERULUS_TAG and floors.min_real_object_f1 is not None:
        checks.append(("real-sample object F1", real.object_f1, "min_real_object_f1", floors.min_real_object_f1))
    return checks


def _floor_line(floors: EvaluateParams, dice: float, real: RealScore | None) -> str:
    (name, score, key, floor), *others = floor_checks(floors, dice, real)
    line = f"The champion is judged on the {name} ({_fmt(score)}): a model under {floor:g} (`evaluate.{key}`)"
    for label, value, key, floor in others:
        line += f" or a {label} ({_fmt(value)}) under {floor:g} (`evaluate.{key}`)"
    return line + " never becomes champion."


def model_card(card: ModelCard, metrics: dict[str, float], warnings: list[str], manifest: dict[str, Any],
               *, name: str, floors: EvaluateParams, real: RealScore | None, run_id: str) -> str:
    """The registered version's description: a short model card in Markdown."""
    classes = card.class_names
    foreground = classes[1:]
    counts = manifest.get("counts", {})
    source = manifest.get("source", "unknown")
    scans = manifest.get("scans") or []
    subjects = {s.get("subject_id") for s in manifest.get("subjects", [])} or {s.get("subject_id") for s in scans}
    split_text = ", ".join(f"{split} {counts[split]}" for split in ("train", "valid", "test", "mini_test")
                           if split in counts)
    rows = "\n".join(f"| {c} | {_fmt(metrics.get(f'dice_{c}'))} | {_fmt(metrics.get(f'iou_{c}'))} | "
                      f"{_fmt(metrics.get(f'precision_{c}'))} | {_fmt(metrics.get(f'recall_{c}'))} |" for c in foreground)
    limits = [f"Trained and tested on **{source}** data only"
              + (": synthetic images, not validated on real scans." if source == "synthetic" else "."),
              f"Input: {'greyscale' if card.channels == 1 else 'RGB'} images, tiled at {card.tile_size} px "
              f"(sides padded to multiples of {card.size_multiple}); other modalities or resolutions are untested.",
              _floor_line(floors, metrics["mean_foreground_dice"], real)]
    if card.single_foreground_class:
        limits.append("One foreground class per image: the class with the larger summed probability wins.")
    limits += [f"Evaluate warned: {w}" for w in warnings]
    lines = [
        f"# {name}: FlexUNet segmentation of {card.dataset or 'unknown'}",
        "",
        "## Intended use",
        f"Pixel-wise segmentation into {', '.join(classes)}; research and pipeline demonstration, "
        "not for clinical decisions. Serve it with `mlflow models serve -m models:/"
        f"{name}@champion` (whole images of any size, tiled) or `flexunet predict` on the ONNX file.",
        "",
        "## Data",
        f"- Dataset `{card.dataset}` ({source}), fingerprint `{card.dataset_fingerprint or 'unknown'}`",
        f"- Images per split: {split_text or 'unknown'}"
        + (f"; {len(subjects)} subjects, split by subject" if subjects - {None} else ""),
        f"- Training run `{run_id}` (its *Datasets* list the splits)",
        "",
        "## Test metrics",
        f"Mean foreground Dice **{_fmt(metrics.get('mean_foreground_dice'))}**, pixel accuracy "
        f"{_fmt(metrics.get('pixel_accuracy'))}.",
        "",
        "| class | Dice | IoU | precision | recall |",
        "|---|---|---|---|---|",
        rows,
        "",
        "## Limits",
        *[f"- {item}" for item in limits],
    ]
    return "\n".join(lines) + "\n"


def _log_models(layout: Layout, run_id: str, card: ModelCard) -> str:
    """Log the ONNX flavour and the pyfunc wrapper into the training run; return the pyfunc URI."""
    import common
    import serving
    from serving import pyfunc

    p = layout.params
    image = _example_image(layout, card)
    config = {k: v for k, v in p.predict.tiling().as_dict().items() if v is not None}
    with tempfile.TemporaryDirectory() as tmp, \
            start_run(p.mlflow, find_project_root(layout.root), run_id=run_id) as run:
        # Clean copies of the packages: the served model imports `serving` (and the `common`
        # it uses) from them when the flexunet package is not installed (any --env-manager).
        code = [Path(tmp) / pkg.__name__ for pkg in (serving, common)]
        for pkg, dst in zip((serving, common), code):
            shutil.copytree(Path(pkg.__file__).parent, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        run.log_onnx_model(layout.onnx_file, image[None].astype(np.float32), name=ONNX_NAME)
        return run.log_pyfunc_model(
            pyfunc.FlexUNetPyfunc(), name=PYFUNC_NAME, artifacts={pyfunc.ONNX_ARTIFACT: str(layout.onnx_file)},
            code_paths=[str(c) for c in code], signature=pyfunc.signature(card.class_names),
            input_example=pyfunc.input_example(image), model_config=config)


def champion_decision(dice: float, version: str, champion: VersionInfo | None,
                      floors: EvaluateParams, real: RealScore | None = None) -> tuple[bool, str]:
    """(move champion here?, why, in one line) by the alias rule in the module docstring;
    `real` is this version's real-sample score (None: not scored)."""
    if champion is not None and champion.version == version:
        return True, f"version {version} is already the champion"
    # a score that is missing where a floor asks for it (an older metrics file) does not pass it
    under = [f"{name} {_fmt(score)} < evaluate.{key} {floor}" for name, score, key, floor
             in floor_checks(floors, dice, real) if score is None or score < floor]
    if under:
        return False, ", ".join(under) + ": registered as challenger only"
    if champion is None:
        return True, "first version: no champion yet"
    old_real = _tag_value(champion, real.tag) if real is not None else math.nan
    if real is not None and not math.isnan(old_real):
        verdict = ">=" if real.dice >= old_real else "<"
        return real.dice >= old_real, (f"{real.label} {real.dice:.4f} {verdict} champion v{champion.version}'s "
                                       f"{old_real:.4f} (test mean foreground Dice {dice:.4f})")
    old_dice = _tag_value(champion, DICE_TAG)
    if math.isnan(old_dice):
        return True, f"champion v{champion.version} has no {DICE_TAG} tag"
    if dice >= old_dice:
        return True, f"test mean foreground Dice {dice:.4f} >= champion v{champion.version}'s {old_dice:.4f}"
    return False, f"test mean foreground Dice {dice:.4f} < champion v{champion.version}'s {old_dice:.4f}"


def register(layout: Layout) -> dict[str, Any]:
    """The DVC stage: register (or reuse) a version, apply the alias rule, write registered.json."""
    p, r = layout.params, layout.params.registry
    if not layout.onnx_file.is_file():
        raise DataError(f"{layout.onnx_file}: not found; run the export stage first (dvc repro export)")
    metrics, warnings = _read_eval(layout)
    real = _read_real(layout)
    run_id = layout.read_run()["run_id"]
    sha, card = sha256_file(layout.onnx_file), read_card(layout.onnx_file)
    tracking_uri = resolve_tracking_uri(p.mlflow, find_project_root(layout.root))
    registry = Registry(tracking_uri)
    with remove_on_failure([layout.registered_file]):
        existing = registry.find_version(r.model_name, SHA_TAG, sha)
        if existing is None:
            uri = _log_models(layout, run_id, card)
            tags = _version_tags(layout, run_id, tracking_uri, card, sha, metrics, real)
            description = model_card(card, metrics, warnings, layout.read_manifest(), name=r.model_name,
                                     floors=p.evaluate, real=real, run_id=run_id)
            version = registry.create_version(r.model_name, uri, tags, description).version
            log.info("registered %s version %s", r.model_name, version)
        else:
            version = existing.version
            log.info("%s version %s already holds this ONNX model (sha256 %s...): reused", r.model_name,
                     version, sha[:12])
        dice = metrics["mean_foreground_dice"]
        promote, why = champion_decision(dice, version, registry.by_alias(r.model_name, r.champion_alias),
                                         p.evaluate, real)
        if warnings:
            why += "; evaluate warned: " + "; ".join(warnings)
        registry.set_alias(r.model_name, r.challenger_alias, version)
        if promote:
            registry.set_alias(r.model_name, r.champion_alias, version)
        final = registry.version(r.model_name, version)
        report = {
            "name": r.model_name, "version": version, "aliases": final.aliases, "reused": existing is not None,
            "champion": promote, "decision": why, "warnings": warnings, "onnx_sha256": sha, DICE_TAG: dice,
            **_real_record(real, p.dataset.name), "run_id": run_id,
            "model_uri": f"models:/{r.model_name}@{r.champion_alias}",
            "version_uri": f"models:/{r.model_name}/{version}",
            **store_record(tracking_uri, layout.root),   # a git-tracked file: no path of this clone
        }
        write_json(layout.registered_file, report)
    (log.warning if warnings or not promote else log.info)("%s v%s: %s -> %s", r.model_name, version, why,
                                                           ", ".join(final.aliases) or "no alias")
    return report
