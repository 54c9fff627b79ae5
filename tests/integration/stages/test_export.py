"""Export stage: ONNX contract (named dynamic input, card metadata), TF parity, int8, clean failure,
space-to-depth levels."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest

from common.errors import ParamsError
from pipeline.stages.prepare import prepare
from pipeline.model.flexunet import build_flexunet, load_model
from pipeline.model.space_to_depth import Unsupported, rewrite
from pipeline.stages.export import (ExportError, card_for, export, int8_file, session, space_to_depth_levels, to_onnx,
                                    tta_flips)
from pipeline.layout import Layout
from pipeline.config.load import params_from_dict
from pipeline.tracking import resolve_tracking_uri, run_status
from serving.card import METADATA_KEY, ModelCard, read_card
from tests.conftest import randomised, tiny_dict


def _params(**export_overrides):
    raw = tiny_dict()
    raw["model"]["normalization"] = True   # the default architecture: BatchNorm through ONNX
    raw["train"].update(epochs=1, epoch_change_infer=False)
    raw["mlflow"]["log_model"] = False
    raw["export"].update(export_overrides)
    return params_from_dict(raw)


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> tuple[Layout, dict]:
    """prepare + 1-epoch train + export (with int8), once for the module."""
    from pipeline.stages.train import train

    layout = Layout(tmp_path_factory.mktemp("export"), _params(quantize_int8=True))
    prepare(layout)
    train(layout)
    return layout, export(layout)


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_onnx_contract_named_dynamic_input_and_card(exported):
    layout, _ = exported
    model = onnx.load(str(layout.onnx_file))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["image"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[:3]] == ["batch", "height", "width"] and dims[3].dim_value == 3
    assert model.opset_import[0].version == 17

    sess = session(layout.onnx_file)
    name = sess.get_inputs()[0].name
    for shape in ((1, 32, 32, 3), (2, 64, 96, 3)):
        probs = sess.run(None, {name: np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)})[0]
        assert probs.shape == shape[:3] + (3,)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)  # softmax probabilities

    card = ModelCard.from_json(_meta(layout.onnx_file)[METADATA_KEY])
    manifest = layout.read_manifest()
    expected = card_for(layout.params, layout.read_run()["run_id"], manifest)
    # plus what to_onnx adds: how many levels this file computes on phases
    assert card == replace(expected, extra={**expected.extra, "space_to_depth_levels": "1"})
    assert (card.channels, card.num_classes, card.size_multiple, card.tile_size) == (3, 3, 4, 32)
    assert card.colours == [(0, 0, 0), (255, 0, 0), (0, 255, 0)] and len(card.dataset_fingerprint) == 64
    assert card.tta_flips == ["lr"]  # kidney MRI: trained with left-right flips only, no rot90


def test_tta_flips_follow_training_augmentation():
    raw = tiny_dict()
    for flip, rot90, expected in ((True, False, ["lr"]), (True, True, ["lr", "ud", "lrud"]),
                                  (False, True, ["lrud"]), (False, False, [])):
        raw["train"]["augment"].update(flip=flip, rot90=rot90)
        assert tta_flips(params_from_dict(raw)) == expected


def test_parity_metrics_within_targets_and_logged(exported):
    layout, report = exported
    saved = json.loads((layout.metrics / "export.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert 0 <= saved["parity_max_abs"] <= 1e-4
    assert saved["parity_argmax_agreement"] >= 0.9999
    assert saved["parity_images"] == len(list((layout.data_dir / "test" / "images").iterdir()))
    assert saved["onnx_sha256"] == hashlib.sha256(layout.onnx_file.read_bytes()).hexdigest()
    assert saved["onnx_bytes"] == layout.onnx_file.stat().st_size
    # the tiny model (4 filters, 5x5 then 3x3) has its top level on 2x2 phases (auto), and meets parity
    assert saved["space_to_depth_levels"] == 1
    assert "SpaceToDepth" in {n.op_type for n in onnx.load(str(layout.onnx_file)).graph.node}
    assert 0 <= saved["fp32_mean_foreground_dice"] <= 1 and saved["fp32_images_per_second"] > 0

    from mlflow.tracking import MlflowClient

    store = resolve_tracking_uri(layout.params.mlflow, layout.root)
    data = MlflowClient(store).get_run(layout.read_run()["run_id"]).data
    assert data.metrics["export_parity_max_abs"] == pytest.approx(saved["parity_max_abs"])
    assert data.tags["export.onnx_sha256"] == saved["onnx_sha256"]


def test_int8_model_quantised_with_card_and_reported(exported):
    layout, report = exported
    int8 = onnx.load(str(int8_file(layout)))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    assert _meta(int8_file(layout))[METADATA_KEY] == _meta(layout.onnx_file)[METADATA_KEY]
    sess = session(int8_file(layout))
    x = np.full((1, 64, 96, 3), 128, np.float32)
    assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape == (1, 64, 96, 3)
    assert 0 <= report["int8_mean_foreground_dice"] <= 1 and report["int8_images_per_second"] > 0
    assert report["int8_bytes"] == int8_file(layout).stat().st_size
    # int8 is an approximation, but not a different model
    assert report["int8_argmax_agreement_vs_tf"] > 0.9


def test_impossible_parity_target_fails_and_leaves_no_outputs(exported, tmp_path):
    layout, _ = exported
    root = tmp_path / "copy"
    shutil.copytree(layout.root, root)
    strict = Layout(root, _params(parity_max_abs=1e-12, quantize_int8=True))
    with pytest.raises(ExportError, match=r"max \|p_tf - p_onnx\| .* > export.parity_max_abs 1e-12"):
        export(strict)
    for path in (strict.onnx_file, int8_file(strict), strict.metrics / "export.json"):
        assert not path.exists(), path
    # the training run is not marked failed by a failed export
    run = json.loads((root / "models" / "train_run.json").read_text())
    assert run_status(f"sqlite:///{root / 'mlflow.db'}", run["run_id"]) == "FINISHED"


def test_unsupported_opset_is_a_clear_error_and_writes_nothing(exported, tmp_path):
    layout, _ = exported
    model = load_model(layout.model_file)
    with pytest.raises(ExportError, match=r"m.onnx: tf2onnx conversion at opset 99 failed"):
        to_onnx(model, tmp_path / "m.onnx", card_for(layout.params, None, {}), opset=99)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- space-to-depth at export
def test_unsupported_graph_is_refused_and_export_names_the_switch(tmp_path):
    inp = keras.Input((None, None, 3), name="image")
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="strided")(inp)
    out = keras.layers.Conv2DTranspose(3, 2, strides=2, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    with pytest.raises(Unsupported, match="strided: only stride-1"):
        rewrite(model)
    card = card_for(params_from_dict(tiny_dict()), None, {})
    with pytest.raises(ExportError, match=r"m.onnx: cannot compute 1 level\(s\) on 2x2 phases .* "
                                          r"set export.space_to_depth: 0"):
        to_onnx(model, tmp_path / "m.onnx", card, phase_levels=1)
    assert list(tmp_path.iterdir()) == []


def test_onnx_with_phases_matches_keras_and_says_so_in_its_card(tmp_path):
    raw = tiny_dict()
    params = params_from_dict(raw)
    assert space_to_depth_levels(params) == 1  # auto: 4 filters of 5x5 on phases, 8 of 3x3 not
    keras.utils.set_random_seed(0)
    model = randomised(build_flexunet(params.model, dynamic_size=True), seed=5)
    path = to_onnx(model, tmp_path / "m.onnx", card_for(params, None, {}), phase_levels=2)
    assert read_card(path).extra["space_to_depth_levels"] == "2"  # what the file computes
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"SpaceToDepth", "DepthToSpace"} <= ops
    x = np.random.default_rng(6).uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    probs = session(path).run(None, {"image": x})[0]
    # random weights give large logits, so float32 rounding shows: the export's parity target
    np.testing.assert_allclose(probs, np.asarray(model(x, training=False)), atol=1e-4)

    raw["model"]["base_kernels"] = [3, 3]
    assert space_to_depth_levels(params_from_dict(raw)) == 0  # 4x the work: the plain graph
    raw["export"]["space_to_depth"] = 2
    assert space_to_depth_levels(params_from_dict(raw)) == 2
    raw["export"]["space_to_depth"] = 3  # of a 3-level model (e.g. tuned shallower): its bottom stays
    assert space_to_depth_levels(params_from_dict(raw)) == 2
    for bad in ("sometimes", -1, True):  # YAML true would otherwise pass as 1
        raw["export"]["space_to_depth"] = bad
        with pytest.raises(ParamsError, match=r"'export.space_to_depth': .*a number of levels \(0 = off"):
            params_from_dict(raw)
