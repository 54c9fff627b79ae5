"""serving.load.load_predictor: .onnx files, folders, MLflow URIs, and missing, corrupt or
contract-breaking models (one-line errors)."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from serving.load import load_predictor
from serving.predictor import TiledPredictor
from tests.onnx_models import make_tiny_onnx, tiny_card, tiny_model_proto
from tests.unit.serving.conftest import raises_one_line


def test_folders_and_mlflow_run_uri(models, tmp_path, monkeypatch):
    folder = tmp_path / "download" / "model"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(models["rgb"].read_bytes())
    assert load_predictor(tmp_path / "download").card.channels == 3
    (folder / "model.int8.onnx").write_bytes(models["grey"].read_bytes())
    assert load_predictor(tmp_path / "download").card.channels == 3           # fp32 model.onnx wins
    (folder / "model.onnx").rename(folder / "other.onnx")
    raises_one_line("exactly one .onnx.*model.int8.onnx, model/other.onnx", load_predictor, tmp_path / "download")

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)   # what a user sets; the global URI is untouched
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(models["grey"]), "onnx")
    predictor = load_predictor(f"runs:/{run.info.run_id}/onnx", tile_size=16)
    assert predictor.card.channels == 1 and predictor.tile_size == 16
    msg = raises_one_line("models:/nope@champion: cannot download the model from MLflow", load_predictor,
                  "models:/nope@champion")
    assert uri in msg


def test_mlflow_uri_without_mlflow_names_the_extra(monkeypatch, models):
    monkeypatch.delitem(sys.modules, "serving.pyfunc", raising=False)
    monkeypatch.setitem(sys.modules, "mlflow", None)     # as if mlflow were not installed
    raises_one_line(r"models:/m@champion: MLflow URIs need the mlflow extra: pip install 'flexunet\[mlflow\]'",
            load_predictor, "models:/m@champion")
    raises_one_line("overlap 2", load_predictor, "models:/m@champion", overlap=2)   # settings fail first


def test_missing_and_corrupt_model_files(tmp_path):
    raises_one_line("model not found", load_predictor, tmp_path / "nope.onnx")
    raises_one_line("model file not found", TiledPredictor.from_onnx, tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    raises_one_line("not a readable ONNX model.*flexunet export", load_predictor, bad)
    truncated = tmp_path / "truncated.onnx"
    make_tiny_onnx(tmp_path / "ok.onnx")
    truncated.write_bytes((tmp_path / "ok.onnx").read_bytes()[:300])
    raises_one_line("not a readable ONNX model", load_predictor, truncated)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def test_models_breaking_the_contract(tmp_path):
    raises_one_line("no model card.*flexunet export", load_predictor,
                    make_tiny_onnx(tmp_path / "nocard.onnx", with_card=False))
    mismatch = tiny_model_proto(channels=3, card=tiny_card(channels=1))
    raises_one_line(r"shape \['N', 'H', 'W', 3\].*1 channel", load_predictor, _save(mismatch, tmp_path / "ch.onnx"))
    four = tiny_model_proto(channels=4, card=tiny_card(channels=4))
    raises_one_line("4 input channels; only 1 or 3", load_predictor, _save(four, tmp_path / "four.onnx"))
    classes = tiny_model_proto(num_classes=3, card=tiny_card(num_classes=4))
    raises_one_line("3 classes but its card says 4", load_predictor, _save(classes, tmp_path / "k.onnx"))

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", "H", "W"])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", "H", "W", 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [3])
    graph = helper.make_graph([helper.make_node("Unsqueeze", ["image", "axes"], ["probs"])], "rank3", [x], [y],
                              initializer=[axes])
    rank3 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rank3.ir_version = 8
    helper.set_model_props(rank3, {"flexunet.card": tiny_card().to_json()})
    raises_one_line("rank 3.*expected rank 4", load_predictor, _save(rank3, tmp_path / "rank3.onnx"))
