"""Fine-tuning with train.init_from on the real sample imported as an imagemask dataset.

The 8 real slices (data/real-sample/kidney-t2w, blended mask edges) go through the
import path a user's real data takes (dataset.source imagemask, color_mode tolerance),
then prepare, train and evaluate run with train.init_from naming a tiny model's .keras
file. At a learning rate of 1e-9 one epoch moves no weight measurably, so the saved model
must equal its source: the weights were loaded, not initialised. A source of another
architecture is one line naming both; models:/<name>@<alias> resolves to the registered
version's training run and its Keras model. 8 slices show the plumbing, not a gain.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.errors import FlexUNetError
from pipeline.config.load import params_from_dict
from pipeline.layout import Layout
from pipeline.model.flexunet import build_flexunet, load_model
from tests.conftest import REPO, randomised, tiny_dict

SAMPLE = REPO / "data" / "real-sample" / "kidney-t2w"
# A seed-layout split of the 8 subjects: both diagnoses in every split.
SPLITS = {"train": ["102000_5", "109000_3", "202000_9", "207000_4"], "valid": ["117000_6", "219000_5"],
          "test": ["125000_4", "223000_3"]}


def _import_sample(root: Path) -> Path:
    raw = root / "raw" / "kidney-t2w-real"
    for split, stems in SPLITS.items():
        for kind in ("images", "masks"):
            (raw / split / kind).mkdir(parents=True, exist_ok=True)
            for stem in stems:
                shutil.copy(SAMPLE / kind / f"{stem}.png", raw / split / kind)
    return raw


def _layout(root: Path, init_from: str | None, **train) -> Layout:
    raw = tiny_dict()
    raw["dataset"].update(source="imagemask", raw=str(_import_sample(root)))
    raw["mask"].update(color_mode="tolerance", color_tolerance=1)   # the slices' blended edges
    raw["train"].update(epochs=1, epoch_change_infer=False, init_from=init_from, **train)
    raw["mlflow"]["log_model"] = False
    return Layout(root, params_from_dict(raw))


def _source(path: Path, seed: int = 5, **model) -> Path:
    """A tiny FlexUNet of the tests' params (or `model` changes), random He-scale weights, saved."""
    params = params_from_dict({**tiny_dict(), "model": {**tiny_dict()["model"], **model}})
    path.parent.mkdir(parents=True, exist_ok=True)
    randomised(build_flexunet(params.model), seed).save(path)
    return path


def _max_difference(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a.get_weights(), b.get_weights()))


def test_fine_tuning_starts_from_the_source_weights_through_prepare_train_evaluate(tmp_path):
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.prepare import prepare
    from pipeline.stages.train import train
    from pipeline.tracking import resolve_tracking_uri, run_tags

    source = _source(tmp_path / "synthetic" / "model.keras")
    layout = _layout(tmp_path / "project", str(source), learning_rate=1e-9)
    manifest = prepare(layout)
    assert manifest["counts"]["train"] == 4 and manifest["mask_colours"]["snapped_pixels"] > 0
    result = train(layout)
    trained, original = load_model(layout.model_file), load_model(source)
    assert _max_difference(trained, original) < 1e-5
    fresh = build_flexunet(layout.params.model)   # what a training without init_from starts from
    assert _max_difference(fresh, original) > 0.1
    tags = run_tags(resolve_tracking_uri(layout.params.mlflow, layout.root), result.run_id)
    assert tags["flexunet.init_from"] == str(source)

    evaluate(layout)
    real = json.loads((layout.metrics / "real_sample.json").read_text())
    assert real["available"] and real["real_slices"] == 8 and real["real_snapped_pixels"] > 0
    for key in ("real_kidney_dice", "real_dice_CKD", "real_dice_healthy", "real_class_accuracy"):
        low, value, high = real[f"{key}_ci_low"], real[key], real[f"{key}_ci_high"]
        assert value is None or 0 <= low <= value <= high <= 1, key
    assert (layout.plots / "real_sample_panel.png").is_file()
    assert json.loads((layout.metrics / "eval.json").read_text())["mean_foreground_dice"] is not None


def test_a_source_of_another_architecture_is_one_line_naming_both(tmp_path):
    from pipeline.stages.prepare import prepare
    from pipeline.stages.train import train

    source = _source(tmp_path / "other.keras", base_filters=2)
    layout = _layout(tmp_path / "project", str(source))
    prepare(layout)
    with pytest.raises(FlexUNetError) as err:
        train(layout)
    msg = str(err.value)
    assert msg.startswith(f"train.init_from {source}: its model (base_filters 2, first kernel 5x5, 3 levels")
    assert "params.yaml builds (base_filters 4, first kernel 5x5, 3 levels" in msg and "\n" not in msg
    assert not layout.model_file.exists()
    with pytest.raises(FlexUNetError, match="names no file"):
        train(_layout(tmp_path / "project", "models/missing.keras"))   # relative to the project root
    with pytest.raises(FlexUNetError, match=r"names the train stage's own output, which DVC removes"):
        train(_layout(tmp_path / "project", "models/model.keras"))


def test_a_registered_alias_resolves_to_its_training_runs_keras_model(tmp_path):
    from pipeline.tracking import Registry, download_keras_model, resolve_tracking_uri, start_run

    params = params_from_dict(tiny_dict())
    model = load_model(_source(tmp_path / "src.keras"))
    with start_run(params.mlflow, tmp_path) as run:
        run.log_keras_model(model, np.zeros((1, 32, 32, 3), np.float32))
    registry = Registry(resolve_tracking_uri(params.mlflow, tmp_path))
    # The registered model is the ONNX pyfunc in real runs; any model of the run stands in.
    version = registry.create_version("fine-tune-source", f"runs:/{run.run_id}/model", tags={})
    registry.set_alias("fine-tune-source", "champion", version.version)

    path, source = download_keras_model("models:/fine-tune-source@champion", params.mlflow, tmp_path,
                                        tmp_path / "download")
    assert source == f"runs:/{run.run_id}/model" and path.suffix == ".keras"
    assert _max_difference(load_model(path), model) == 0.0
    with pytest.raises(FlexUNetError, match=r"train.init_from models:/fine-tune-source@nope: not found"):
        download_keras_model("models:/fine-tune-source@nope", params.mlflow, tmp_path, tmp_path / "d2")
