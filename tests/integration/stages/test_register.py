"""Register stage: versions, tags, the champion/challenger rule, idempotency, and the served pyfunc.

The models are untrained tiny FlexUNets (seeded weights give distinct ONNX files); the
Dice the alias rule compares comes from a hand-written metrics/eval.json.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.stages.prepare import prepare
from common.errors import DataError
from pipeline.stages.export import card_for, to_onnx
from pipeline.layout import Layout
from pipeline.model.flexunet import build_flexunet
from pipeline.config.load import params_from_dict
from pipeline.stages.register import register
from pipeline.stages.train import log_datasets
from pipeline.tracking import Registry, resolve_tracking_uri, run_tags, standard_tags, start_run, use_store
from common.atomic import write_json
from tests.conftest import tiny_dict


def _layout(root: Path, model_name: str) -> Layout:
    raw = tiny_dict()
    raw["registry"]["model_name"] = model_name
    return Layout(root, params_from_dict(raw))


def _new_model(layout: Layout, seed: int, dice: float, real: float | None = None) -> None:
    """A distinct ONNX model (seeded weights) whose test Dice is `dice` and real-sample
    kidney Dice `real` (None: the real sample was not scored)."""
    keras.utils.set_random_seed(seed)
    card = card_for(layout.params, layout.read_run()["run_id"], layout.read_manifest())
    to_onnx(build_flexunet(layout.params.model), layout.onnx_file, card)
    write_json(layout.eval_metrics_file, {"mean_foreground_dice": dice, "dice_CKD": dice, "loss": 0.3,
                                               "confusion_matrix": [[1, 0], [0, 1]], "min_dice": 0.0,
                                               "min_real_dice": 0.0})   # the floors evaluate writes beside the metrics
    write_json(layout.real_sample_file, {"available": real is not None, "real_kidney_dice": real})


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> tuple[Layout, dict, Path]:
    """One project (data, MLflow store, training run with the train stage's inputs) for the
    module; model `t-serve` registered. Other tests register other model names in the same
    store. Returns a copy of its ONNX file."""
    root = tmp_path_factory.mktemp("register")
    layout = _layout(root, "t-serve")
    manifest = prepare(layout)
    with start_run(layout.params.mlflow, root, tags=standard_tags(root, manifest["fingerprint"], "train")) as run:
        log_datasets(layout, run, manifest)
    write_json(layout.run_file, {"run_id": run.run_id})
    _new_model(layout, seed=1, dice=0.7)
    onnx_copy = root / "served.onnx"
    shutil.copyfile(layout.onnx_file, onnx_copy)
    return layout, register(layout), onnx_copy


def _store(layout: Layout) -> str:
    return resolve_tracking_uri(layout.params.mlflow, layout.root)


def _registry(layout: Layout) -> Registry:
    return Registry(_store(layout))


def test_first_version_is_champion_and_challenger_and_tagged(served):
    layout, report, _ = served
    assert (report["version"], report["aliases"], report["champion"]) == ("1", ["challenger", "champion"], True)
    assert report["model_uri"] == "models:/t-serve@champion"
    assert json.loads(layout.registered_file.read_text()) == report
    tags = _registry(layout).version("t-serve", "1").tags
    run = layout.read_run()
    assert tags["onnx_sha256"] == report["onnx_sha256"] and len(tags["onnx_sha256"]) == 64
    assert float(tags["test_mean_foreground_dice"]) == 0.7 and float(tags["test_dice_CKD"]) == 0.7
    assert not {"test_min_dice", "test_min_real_dice"} & set(tags)   # floors are settings, not metrics
    assert tags["dataset_fingerprint"] == layout.read_manifest()["fingerprint"]
    assert tags["git_commit"] == run_tags(_store(layout), run["run_id"]).get("mlflow.source.git.commit", "unknown")
    assert "tracking_uri" not in report   # the project's own store: no path of this clone in git


def test_the_version_description_is_a_model_card(served):
    layout, report, _ = served
    card = _registry(layout).version("t-serve", "1").description
    fingerprint = layout.read_manifest()["fingerprint"]
    for heading in ("## Intended use", "## Data", "## Test metrics", "## Limits"):
        assert heading in card
    assert card.startswith("# t-serve: FlexUNet segmentation of kidney-t2w")
    assert f"fingerprint `{fingerprint}`" in card and f"`{report['run_id']}`" in card
    assert "Mean foreground Dice **0.7000**" in card and "| CKD | 0.7000 |" in card
    assert "synthetic images, not validated on real scans" in card
    assert "under 0 (`evaluate.min_dice`) never becomes champion" in card   # not scored on the real sample


def test_the_training_run_lists_its_splits_as_datasets(served):
    from mlflow.tracking import MlflowClient

    layout, report, _ = served
    inputs = MlflowClient(_store(layout)).get_run(report["run_id"]).inputs.dataset_inputs
    fingerprint = layout.read_manifest()["fingerprint"]
    found = {i.dataset.name: ({t.key: t.value for t in i.tags}, i.dataset) for i in inputs}
    assert set(found) == {"kidney-t2w/train", "kidney-t2w/valid", "kidney-t2w/test"}
    tags, dataset = found["kidney-t2w/train"]
    assert tags["mlflow.data.context"] == "training" and tags["dataset.fingerprint"] == fingerprint
    assert dataset.digest == fingerprint[:12] and json.loads(dataset.source) == {"uri": "data/kidney-t2w/train"}
    assert json.loads(dataset.profile)["num_rows"] == layout.read_manifest()["counts"]["train"]
    assert {"image", "mask", "subject_id", "scan", "group"} <= {c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]}


def test_same_model_again_reuses_the_version(served):
    layout, _, _ = served
    again = register(layout)
    assert (again["version"], again["reused"], again["champion"]) == ("1", True, True)
    assert [v.version for v in _registry(layout).versions("t-serve")] == ["1"]


def test_champion_moves_only_on_equal_or_better_dice(served):
    layout = _layout(served[0].root, "t-alias")
    registry = _registry(layout)

    def aliases() -> dict[str, str]:
        return {a: registry.by_alias("t-alias", a).version for a in ("champion", "challenger")}

    _new_model(layout, seed=1, dice=0.6)
    assert register(layout)["version"] == "1" and aliases() == {"champion": "1", "challenger": "1"}
    _new_model(layout, seed=2, dice=0.5)  # worse: challenger only
    worse = register(layout)
    assert (worse["version"], worse["champion"], worse["aliases"]) == ("2", False, ["challenger"])
    assert "0.5000 < champion v1's 0.6000" in worse["decision"]
    assert aliases() == {"champion": "1", "challenger": "2"}
    _new_model(layout, seed=3, dice=0.6)  # equal: takes over
    assert register(layout)["champion"] and aliases() == {"champion": "3", "challenger": "3"}
    _new_model(layout, seed=2, dice=0.5)  # the worse model once more: reused, still not champion
    again = register(layout)
    assert (again["version"], again["reused"], again["champion"]) == ("2", True, False)
    assert aliases() == {"champion": "3", "challenger": "2"}
    assert len(registry.versions("t-alias")) == 3


def test_the_real_sample_decides_when_both_versions_were_scored_on_it(served):
    layout = _layout(served[0].root, "t-real")
    registry = _registry(layout)
    _new_model(layout, seed=1, dice=0.95)                  # v1: no real score
    assert register(layout)["real_kidney_dice"] is None
    assert "real_kidney_dice" not in registry.version("t-real", "1").tags
    _new_model(layout, seed=2, dice=0.9, real=0.7)         # champion unscored on real: test Dice
    second = register(layout)
    assert (second["version"], second["champion"]) == ("2", False)
    assert registry.version("t-real", "2").tags["real_kidney_dice"] == "0.7"
    _new_model(layout, seed=3, dice=0.97, real=0.2)        # v3 wins on test Dice, scored on real
    assert register(layout)["champion"]
    _new_model(layout, seed=4, dice=0.8, real=0.65)        # worse synthetic, better real: champion
    fourth = register(layout)
    assert (fourth["version"], fourth["champion"], fourth["real_kidney_dice"]) == ("4", True, 0.65)
    assert "real-sample kidney Dice 0.6500 >= champion v3's 0.2000" in fourth["decision"]
    _new_model(layout, seed=5, dice=0.99, real=0.6)        # better synthetic, worse real: not
    fifth = register(layout)
    assert (fifth["champion"], registry.by_alias("t-real", "champion").version) == (False, "4")
    assert "real-sample kidney Dice 0.6000 < champion v4's 0.6500" in fifth["decision"]


def test_a_model_under_the_quality_floor_never_becomes_champion(served):
    raw = tiny_dict()
    raw["registry"]["model_name"] = "t-floor"
    raw["evaluate"]["min_dice"] = 0.8
    layout = Layout(served[0].root, params_from_dict(raw))
    _new_model(layout, seed=4, dice=0.5)
    report = json.loads((layout.eval_metrics_file).read_text())
    report["warnings"] = ["training ran 4 of 30 epochs (train.max_minutes fired)"]
    write_json(layout.eval_metrics_file, report)
    first = register(layout)   # even the first version: no champion rather than a broken one
    assert (first["version"], first["champion"], first["aliases"]) == ("1", False, ["challenger"])
    assert "0.5000 < evaluate.min_dice 0.8: registered as challenger only" in first["decision"]
    assert "training ran 4 of 30 epochs" in first["decision"] and first["warnings"] == report["warnings"]
    assert _registry(layout).by_alias("t-floor", "champion") is None
    _new_model(layout, seed=5, dice=0.85)
    second = register(layout)
    assert (second["version"], second["champion"], second["warnings"]) == ("2", True, [])


def test_scored_on_the_real_sample_its_floor_decides_not_the_test_dice_floor(served, caplog):
    raw = tiny_dict()
    raw["registry"]["model_name"] = "t-real-floor"
    raw["evaluate"].update(min_dice=0.8, min_real_dice=0.6)
    layout = Layout(served[0].root, params_from_dict(raw))
    _new_model(layout, seed=6, dice=0.99, real=0.4)   # fits the generator, misses real kidneys
    with caplog.at_level("INFO", logger="pipeline.stages.register"):
        first = register(layout)
    assert (first["version"], first["champion"], first["aliases"]) == ("1", False, ["challenger"])
    line = "real-sample kidney Dice 0.4000 < evaluate.min_real_dice 0.6: registered as challenger only"
    assert first["decision"] == line
    said = [r.getMessage() for r in caplog.records if "challenger only" in r.getMessage()]
    assert said == [f"t-real-floor v1: {line} -> challenger"]   # one line, naming score, floor and key
    assert "evaluate.min_real_dice" in _registry(layout).version("t-real-floor", "1").description
    _new_model(layout, seed=7, dice=0.3, real=0.7)    # synthetic class not learnt, real kidneys found
    second = register(layout)
    assert (second["version"], second["champion"]) == ("2", True)
    assert _registry(layout).by_alias("t-real-floor", "champion").version == "2"
    # A floor raised later does not take the alias from the champion it already names.
    raw["evaluate"]["min_real_dice"] = 0.8
    again = register(Layout(layout.root, params_from_dict(raw)))
    assert (again["version"], again["reused"], again["champion"]) == ("2", True, True)
    assert again["decision"].startswith("version 2 is already the champion")
    assert _registry(layout).by_alias("t-real-floor", "champion").version == "2"


def test_missing_inputs_are_one_line_errors(served, tmp_path):
    layout = _layout(tmp_path, "t-missing")
    with pytest.raises(DataError, match="model.onnx: not found; run the export stage"):
        register(layout)
    layout.models.mkdir()
    shutil.copyfile(served[2], layout.onnx_file)
    with pytest.raises(DataError, match="eval.json: not found; run the evaluate stage"):
        register(layout)
    assert not layout.registered_file.exists()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_champion_pyfunc_predicts_whole_images_of_any_size(served):
    import mlflow

    from serving.predictor import TiledPredictor

    layout, report, onnx_file = served
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)      # not a multiple of tile 32 nor of 4
    grey16 = rng.integers(0, 4000, (37, 50), dtype=np.uint16)    # 16-bit grey: stretched, replicated
    with use_store(_store(layout)):
        model = mlflow.pyfunc.load_model(report["model_uri"])
    out = model.predict(pd.DataFrame({"image": [_png(rgb), _png(grey16), _png(rgb)], "tta": [None, True, True]}))
    assert list(out["height"]) == [45, 37, 45] and list(out["width"]) == [70, 50, 70]
    masks = [Image.open(io.BytesIO(base64.b64decode(b64))) for b64 in out["mask_png"]]
    assert masks[0].mode == "P" and masks[0].size == (70, 45)
    assert masks[0].getpalette()[:9] == [0, 0, 0, 255, 0, 0, 0, 255, 0]
    assert not np.array_equal(np.asarray(masks[0]), np.asarray(masks[2]))  # tta changes this model's answer
    overlap = layout.params.predict.overlap
    for mask, tta in ((masks[0], False), (masks[2], True)):  # the per-row option reaches the predictor
        expected = TiledPredictor.from_onnx(onnx_file, overlap=overlap, tta=tta).predict(rgb)
        np.testing.assert_array_equal(np.asarray(mask), expected)
    counts = out[["pixels_background", "pixels_CKD", "pixels_healthy"]].to_numpy()
    assert list(counts.sum(1)) == [45 * 70, 37 * 50, 45 * 70]
    assert list(counts[0]) == list(np.bincount(np.asarray(masks[0]).ravel(), minlength=3))


def test_scoring_server_accepts_json_and_rejects_bad_images(served):
    """The /invocations handler of `mlflow models serve`, called without a socket."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    layout, report, _ = served
    with use_store(_store(layout)):
        model = mlflow.pyfunc.load_model(report["model_uri"])
    schema = model.metadata.get_input_schema()
    b64 = base64.b64encode(_png(np.full((33, 41, 3), 90, np.uint8))).decode()
    requests = [
        {"dataframe_split": {"columns": ["image", "overlap"], "data": [[b64, 0.5]]}},
        {"dataframe_records": [{"image": b64, "tta": True}]},
        {"inputs": {"image": [b64]}},
    ]
    for body in requests:
        answer = invocations(json.dumps(body), "application/json", model, schema)
        assert answer.status == 200, (body.keys(), answer.response)
        record = json.loads(answer.response)["predictions"][0]
        assert (record["height"], record["width"]) == (33, 41)
        assert Image.open(io.BytesIO(base64.b64decode(record["mask_png"]))).size == (41, 33)
    bad = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not an image").decode()]]}}
    with pytest.raises(MlflowException, match="row 0: not a readable image") as caught:
        invocations(json.dumps(bad), "application/json", model, schema)
    assert caught.value.get_http_status_code() == 400  # the server's exception handler answers this
