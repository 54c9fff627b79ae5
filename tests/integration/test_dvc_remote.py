"""Data and models through a DVC remote: a second clone pulls what the first one pushed.

The `project` fixture (tests/integration/conftest.py) ran `dvc repro` once, committed the
result as tag `repro` and pushed its cache to a local directory remote. Here another
machine's view: `git clone` + `dvc pull` give every output back, with nothing to rerun,
and the pulled ONNX model predicts. No output names a path of the first clone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tests.integration.conftest import BIN, REPRO_TAG, sh


def test_a_second_clone_pulls_outputs_and_has_nothing_to_rerun(project: Path, tmp_path: Path):
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", "--branch", REPRO_TAG, str(project), str(clone)], tmp_path)
    assert not (clone / "models" / "model.onnx").exists()     # in the remote, not in git
    sh([str(BIN / "dvc"), "pull", "-q"], clone)
    for rel in ("models/model.keras", "models/model.onnx", "models/train_run.json", "data/kidney-t2w/manifest.json",
                "tune/best_params.yaml", "outputs/tiled_predictions/predictions.csv"):
        assert (clone / rel).is_file(), rel
    assert json.loads(sh([str(BIN / "dvc"), "status", "--json"], clone)) == {}
    assert "Running stage" not in sh([str(BIN / "dvc"), "repro"], clone)
    run_file = json.loads((clone / "models" / "train_run.json").read_text())
    assert set(run_file) == {"run_id"}      # the store is resolved on this machine, never the first's path
    assert str(project) not in (clone / "models" / "registered.json").read_text()

    sh([str(BIN / "flexunet"), "predict", "--model", "models/model.onnx", "--input", "data/kidney-t2w/mini_test/images",
        "--output", str(tmp_path / "pred")], clone)
    table = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert len(table) == len(list((clone / "data/kidney-t2w/mini_test/images").iterdir())) > 0
    assert len(list((tmp_path / "pred").glob("*.png"))) == len(table)
