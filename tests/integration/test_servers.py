"""Real servers: an Optuna study on PostgreSQL shared by two worker processes (one killed
mid-trial), and a real MLflow tracking server (on the same PostgreSQL) holding what the
stages log; a dead tracking server stops every command in one line, fast.

One PostgreSQL cluster and one MLflow server for the session (tests/integration/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from PIL import Image

from pipeline import study as studies
from tests.conftest import tiny_dict
from tests.integration.servers import free_port
from tests.integration.stages.test_tune import _cli, _project, _raw, kill_mid_trial

BIN = Path(sys.executable).parent


def _parent_runs(client: MlflowClient, study_name: str) -> list:
    experiment = client.get_experiment_by_name("tests")
    return client.search_runs([experiment.experiment_id],
                              f"tags.`flexunet.stage` = 'tune' and tags.`optuna.study` = '{study_name}'")


def test_database_urls_hide_their_password_and_a_dead_database_is_one_line(tmp_path):
    from common.errors import FlexUNetError

    assert studies.shown("postgresql+psycopg://optuna:secret@db:5432/optuna") == \
        "postgresql+psycopg://optuna:***@db:5432/optuna"
    assert studies.shown("optuna/s.journal") == "optuna/s.journal"
    with pytest.raises(FlexUNetError) as err:   # nothing listens on port 1
        studies.open_storage("postgresql+psycopg://optuna:secret@127.0.0.1:1/optuna", tmp_path, 1)
    assert "cannot connect" in str(err.value) and "secret" not in str(err.value) and "\n" not in str(err.value)


def test_the_study_lock_is_an_advisory_lock_in_postgresql(tmp_path, postgres):
    """Two storages (as on two machines): one study's lock excludes the other holder until
    released; another study's lock does not wait."""
    import threading

    import sqlalchemy

    url = postgres.create_database(f"lock_{uuid.uuid4().hex[:8]}")
    one, two = (studies.open_storage(url, tmp_path, 1) for _ in range(2))
    entered = threading.Event()

    def second() -> None:
        with studies.study_lock(two, url, "study-a"):
            entered.set()

    with studies.study_lock(one, url, "study-a"):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(1.0), "the second holder got in while the first held the lock"
        with studies.study_lock(two, url, "study-b"):   # another study: no waiting
            pass
        with one.engine.connect() as conn:
            held = conn.execute(sqlalchemy.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                                "AND granted")).scalar()
        assert held == 1
    assert entered.wait(10)
    thread.join()


def test_two_workers_on_postgresql_one_killed_mid_trial(tmp_path, data_root, postgres, mlflow_server, monkeypatch):
    """Both workers start at once (racing for the study, its tables and its parent run);
    worker 1 is SIGKILLed mid-trial. Its trial is failed through the heartbeat, worker 0
    makes up for it, and the study ends at exactly n_trials, under one parent run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    url = postgres.create_database(f"optuna_{uuid.uuid4().hex[:8]}")
    raw = _raw(tmp_path, storage=url, n_trials=3, epochs_per_trial=2, enqueue_current=False, heartbeat_seconds=1)
    layout = _project(tmp_path, data_root, raw)
    workers = [_cli(layout.root, "--worker", str(i)) for i in range(2)]
    storage = studies.open_storage(url, layout.root, 1)
    name = studies.study_name(layout.params, layout.read_manifest()["fingerprint"])
    try:
        killed = kill_mid_trial(workers[1], storage, name, time.monotonic() + 120)
        out = workers[0].communicate(timeout=240)[0]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert workers[0].returncode == 0, out[-3000:]

    study = optuna.load_study(study_name=name, storage=storage)
    states = [t.state for t in study.trials]
    assert study.trials[killed].state == TrialState.FAIL                       # failed by the heartbeat check
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 3   # exactly n_trials
    assert states.count(TrialState.FAIL) == 1 and TrialState.RUNNING not in states
    assert yaml.safe_load(layout.tuned_params_file.read_text())["best_trial"] == study.best_trial.number

    client = MlflowClient(mlflow_server.uri)
    parents = _parent_runs(client, name)
    assert len(parents) == 1, "one parent run, however many workers race for it"
    parent_id = parents[0].info.run_id
    assert study.user_attrs["mlflow_parent_run_id"] == parent_id and parents[0].info.status == "FINISHED"
    assert "fail_reason" not in parents[0].data.tags   # worker 1's death did not close worker 0's parent run
    assert parents[0].data.params["tune.n_trials"] == "3" and "best_value" in parents[0].data.metrics
    children = client.search_runs([parents[0].info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == len(study.trials)
    dead = client.get_run(study.trials[killed].user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and "killed or crashed" in dead.data.tags["fail_reason"]
    for trial in study.trials:
        if trial.state == TrialState.COMPLETE:
            run = client.get_run(trial.user_attrs["mlflow_run_id"])
            assert float(run.data.params["learning_rate"]) == pytest.approx(trial.params["learning_rate"])
            assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]


def test_train_and_register_on_a_tracking_server(tmp_path, data_root, mlflow_server, monkeypatch):
    """Train logs params, per-epoch curves, epoch-change images and the Keras model to the
    server; register's champion loads back through it (serving.load.load_predictor)."""
    import keras

    from common.atomic import write_json
    from pipeline.config.load import params_from_dict
    from pipeline.layout import Layout
    from pipeline.model.flexunet import build_flexunet
    from pipeline.stages.export import card_for, to_onnx
    from pipeline.stages.register import register
    from pipeline.stages.train import train
    from serving.load import load_predictor

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    raw = tiny_dict()
    raw["dataset"]["root"] = str(data_root / raw["dataset"]["root"])
    raw["train"].update(epochs=2, epoch_change_infer=True)
    raw["registry"]["model_name"] = "t-server"
    layout = Layout(tmp_path, params_from_dict(raw))
    result = train(layout)

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.base_filters"] == "4"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_loss")] == [1, 2]
    images = [a.path for a in client.list_artifacts(result.run_id, "images")]
    assert sum("epoch_change_infer" in p for p in images) >= 2, images   # one panel per epoch (+ metadata)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{result.run_id}'")
    assert [m.name for m in models] == ["model"]
    assert "MLmodel" in {a.path for a in client.list_logged_model_artifacts(models[0].model_id)}

    # register needs an ONNX model and evaluate's metrics: an untrained export of the same
    # architecture is enough (as in stages/test_register.py).
    keras.utils.set_random_seed(1)
    card = card_for(layout.params, result.run_id, layout.read_manifest())
    to_onnx(build_flexunet(layout.params.model), layout.onnx_file, card)
    write_json(layout.metrics / "eval.json", {"mean_foreground_dice": 0.7, "dice_CKD": 0.7, "loss": 0.3,
                                               "confusion_matrix": [[1, 0], [0, 1]]})
    report = register(layout)
    assert report["champion"] and report["model_uri"] == "models:/t-server@champion"
    assert report["tracking_uri"] == mlflow_server.uri
    predictor = load_predictor(report["model_uri"])
    mask = predictor.predict(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    assert mask.shape == (40, 50)


# --------------------------------------------------------------------------- a dead server
def _closed_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"   # nothing listens there


def _fails_fast(cmd: list[str], cwd: Path, uri: str) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)
    seconds = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    assert uri in lines[0] and "MLFLOW_TRACKING_URI" in lines[0] and "not reachable" in lines[0]
    assert seconds < 15, f"took {seconds:.1f} s"
    return lines[0]


def test_predict_from_a_dead_tracking_server_fails_fast_in_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    _fails_fast([str(BIN / "flexunet"), "predict", "--model", "models:/x@champion", "--input", "in",
                 "--output", "out"], tmp_path, _closed_uri())


@pytest.mark.parametrize("stage", ["train", "register"])
def test_stages_with_a_dead_tracking_server_fail_fast_in_one_line(tmp_path, stage):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_dict(), sort_keys=False))
    _fails_fast([str(BIN / "flexunet"), stage, "--params", "params.yaml"], tmp_path, _closed_uri())
