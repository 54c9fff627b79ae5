"""End to end: a tiny `dvc repro` in a temporary copy of the project, then changes to it.

Checks what the pipeline promises: all outputs appear and training used the tuned values;
a second repro does nothing; `dvc metrics show` and `dvc plots show` work; a training
change run as `dvc exp run --temp` reruns train and what follows, logging into the
project's MLflow store (not the throw-away copy) with the experiment's name as a tag; the
same change in the workspace comes back from the run-cache but still registers; a predict
change reruns evaluate_tiled only; editing the mask reader makes every stage that
imports it stale (dvc.yaml's code deps are complete); more trials continue the study. The tests run in file order,
each on the state the previous one left (the `project` fixture: tests/integration/conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import BIN, sh

STAGES = ("prepare", "tune", "train", "evaluate", "export", "evaluate_tiled", "register")


def _ran(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def test_repro_produces_every_output(project):
    for rel in ("data/kidney-t2w/manifest.json", "models/model.keras", "models/train_run.json",
                "metrics/train.json", "metrics/eval.json", "metrics/dataset.json", "plots/train_curves.png",
                "plots/confusion_matrix.png", "plots/mini_test_panel.png", "plots/dataset_statistics.png",
                "dvclive/plots/metrics/train/loss.tsv", "dvc.lock", "models/model.onnx", "metrics/export.json",
                "models/registered.json", "metrics/tiled.json", "plots/tiled_panel.png",
                "outputs/tiled_predictions/predictions.csv", "tune/best_params.yaml", "metrics/tune.json",
                "plots/tune_history.png", "optuna/flexunet.journal", "metrics/tkv.json", "plots/bland_altman.png",
                "metrics/real_sample_predict.json", "plots/real_sample_predict_panel.png"):
        assert (project / rel).exists(), rel
    assert list((project / "outputs" / "mini_test_predictions").glob("*.png"))
    run_id = json.loads((project / "models" / "train_run.json").read_text())["run_id"]
    with sqlite3.connect(project / "mlflow.db") as db:
        status = db.execute("select status from runs where run_uuid=?", (run_id,)).fetchone()[0]
        metrics = {k for (k,) in db.execute("select distinct key from metrics where run_uuid=?", (run_id,))}
        tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_id,)).fetchall())
        datasets = {name for (name,) in db.execute(
            "select d.name from inputs i join datasets d on d.dataset_uuid = i.source_id where i.destination_id=?",
            (run_id,))}
    assert status == "FINISHED"
    assert datasets == {"kidney-t2w/train", "kidney-t2w/valid", "kidney-t2w/test"}
    # Outputs name no store path of this clone: each clone resolves its own (docs/tracking.md)
    assert json.loads((project / "models" / "train_run.json").read_text()) == {"run_id": run_id}
    assert "tracking_uri" not in json.loads((project / "models" / "registered.json").read_text())
    assert {"loss", "val_loss", "val_dice_CKD", "learning_rate", "test_mean_foreground_dice",
            "test_tkv_bias_ml", "test_tkv_without_rules_bias_ml", "test_stray_components", "test_uncertainty_auroc",
            "mini_test_tiled_stray_components", "predict_real_kidney_dice"} <= metrics
    evaluated = json.loads((project / "metrics" / "eval.json").read_text())
    assert 0 <= evaluated["uncertainty_auroc"] <= 1 and evaluated["stray_components"] >= 0
    tiled = json.loads((project / "metrics" / "tiled.json").read_text())
    assert tiled["tiled_stray_components"] >= 0 and tiled["object_metrics"] == "components"
    tkv = json.loads((project / "metrics" / "tkv.json").read_text())
    assert tkv["available"] and tkv["scans"] == len(tkv["per_scan"]) >= 2
    assert tkv["without_rules"]["scans"] == tkv["scans"] and 0 <= tkv["volume_class_accuracy"] <= 1
    # `flexunet predict` on the real sample gives what evaluate reports (ONNX vs Keras: 1e-6 apart)
    real = json.loads((project / "metrics" / "real_sample.json").read_text())
    by_predict = json.loads((project / "metrics" / "real_sample_predict.json").read_text())
    assert abs(by_predict["predict_real_kidney_dice"] - real["real_kidney_dice"]) <= 0.01
    assert by_predict["real_slices"] == 8 and "predict_real_kidney_dice" not in tiled
    assert len(tags["dataset.fingerprint"]) == 64 and len(tags["mlflow.source.git.commit"]) == 40
    registered = json.loads((project / "models" / "registered.json").read_text())
    assert registered["version"] == "1" or registered["version"] == 1
    with sqlite3.connect(project / "mlflow.db") as db:
        assert db.execute("select count(*) from model_versions").fetchone()[0] == 1
        aliases = {a for (a,) in db.execute("select alias from registered_model_aliases")}
    assert aliases == {"champion", "challenger"}


def test_second_repro_does_nothing(project):
    out = sh([str(BIN / "dvc"), "repro"], project)
    assert _ran(out) == set(), out


def test_editing_a_shared_module_makes_the_stages_that_import_it_stale(project):
    from pipeline import codegraph

    reader = project / "pipeline" / "data" / "masks.py"
    original = reader.read_text()
    expected = {s for s in STAGES if "pipeline/data/masks.py" in codegraph.code_files(
        project, codegraph.stage_modules(project, s))}
    assert {"prepare", "train", "evaluate"} <= expected
    reader.write_text(original + "\n# an edit\n")
    try:
        stale = set(json.loads(sh([str(BIN / "dvc"), "status", "--json"], project)))
    finally:
        reader.write_text(original)
    # What imports the reader is stale; the rest of the graph follows from their outputs.
    assert expected <= stale, (expected, stale)
    assert json.loads(sh([str(BIN / "dvc"), "status", "--json"], project)) == {}


def test_metrics_and_plots_show(project):
    data = sh([str(BIN / "dvc"), "metrics", "show", "--json"], project)
    assert "mean_foreground_dice" in data and "best_val_loss" in data
    sh([str(BIN / "dvc"), "plots", "show", "-o", "dvc_plots"], project)
    html = (project / "dvc_plots" / "index.html").read_text()
    assert "loss" in html


def test_the_default_flow_trains_with_the_tuned_values(project):
    """use_tuned_params (the default): the study's best trial decides the trained model."""
    best = yaml.safe_load((project / "tune" / "best_params.yaml").read_text())["params"]
    assert best["learning_rate"] != yaml.safe_load((project / "params.yaml").read_text())["train"]["learning_rate"]
    assert yaml.safe_load((project / "tune" / "train_overrides.yaml").read_text()) == {"params": best}
    run_id = json.loads((project / "models" / "train_run.json").read_text())["run_id"]
    with sqlite3.connect(project / "mlflow.db") as db:
        logged = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
        tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_id,)).fetchall())
    assert int(logged["model.base_filters"]) == best["base_filters"]
    assert logged["model.base_kernels"] == str((best["base_kernels"], best["base_kernels"]))
    assert float(logged["train.learning_rate"]) == pytest.approx(best["learning_rate"])
    assert tags["flexunet.tuned_params"] == "tune/best_params.yaml" and tags["tf.onednn"] == "false"


def test_exp_run_temp_reruns_after_data_and_logs_into_project_store(project):
    """A training change (`dvc exp run --temp -S train.epochs=2`) reruns train and what follows,
    not prepare or tune; its runs land in the project's MLflow store with the experiment's
    name, and its model becomes version 2 there."""
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "before the experiment", "--allow-empty"], project)
    out = sh([str(BIN / "dvc"), "exp", "run", "--temp", "-n", "two-epochs", "-S", "train.epochs=2"], project)
    assert _ran(out) == set(STAGES) - {"prepare", "tune"}, out
    with sqlite3.connect(project / "mlflow.db") as db:
        rows = db.execute("select r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                          "where t.key = 'dvc.exp_name' and t.value = 'two-epochs'").fetchall()
        assert db.execute("select count(*) from model_versions").fetchone()[0] == 2
    assert rows == [("FINISHED",)]
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db"))


def test_the_same_change_in_the_workspace_registers_without_retraining(project):
    """The experiment's stages come back from DVC's run-cache; register, whose output is not
    cached, runs anyway and points at the version of that model."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh([str(BIN / "dvc"), "repro"], project)
    assert "register" in _ran(out) and "train" not in _ran(out), out
    registered = json.loads((project / "models" / "registered.json").read_text())
    sha = hashlib.sha256((project / "models" / "model.onnx").read_bytes()).hexdigest()
    assert registered["onnx_sha256"] == sha and registered["reused"] and str(registered["version"]) == "2"


def test_overlap_change_reruns_evaluate_tiled_only(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["predict"]["overlap"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh([str(BIN / "dvc"), "repro"], project)
    assert _ran(out) == {"evaluate_tiled"}, out
    assert json.loads((project / "metrics" / "tiled.json").read_text())["overlap"] == 0.5


def _trials(project: Path) -> int:
    import optuna

    from pipeline.study import open_storage

    storage = open_storage("optuna/flexunet.journal", project, 30)
    (summary,) = optuna.get_all_study_summaries(storage)
    return summary.n_trials


def test_more_trials_continue_the_study_and_rerun_only_what_depends_on_it(project):
    before = yaml.safe_load((project / "tune" / "best_params.yaml").read_text())
    assert _trials(project) == 2
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tune"]["n_trials"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh([str(BIN / "dvc"), "repro"], project)
    assert _trials(project) == 3        # the same study, one more trial
    after = yaml.safe_load((project / "tune" / "best_params.yaml").read_text())
    # Training depends on the best values only: it reruns exactly when the new trial won.
    expected = {"tune"} if after["params"] == before["params"] else set(STAGES) - {"prepare"}
    assert _ran(out) == expected, out
    assert after["best_trial"] in (0, 1, 2)
