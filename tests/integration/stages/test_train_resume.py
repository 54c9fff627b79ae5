"""A killed training resumes at its last completed epoch and gives the uninterrupted model.

The reference is the same tiny training run without interruption, with the schedule
callbacks on (early stopping, ReduceLROnPlateau, best-weights checkpoint), whose states
must come back too. One test kills a real `flexunet train` process with SIGKILL; another
crashes a run in-process at a known epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

import pipeline.stages.train as train_module
from pipeline.stages.prepare import prepare
from pipeline.layout import Layout
from pipeline.config.load import params_from_dict
from pipeline.model.resume import STATE_ROOT, TrainingState
from pipeline.tracking import resolve_tracking_uri
from pipeline.stages.train import train
from tests.conftest import tiny_dict

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume-data")
    prepare(Layout(root, params_from_dict(tiny_dict())))
    return root


# patience 3: early stopping cannot end training before the crash at epoch 3
SCHEDULE = {"lr_schedule": "constant", "learning_rate_reducer": True, "reducer_patience": 1, "reducer_factor": 0.5,
            "patience": 3, "keep_weights": "best", "epochs": 5, "learning_rate": 0.02}


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_root) -> Layout:
    layout = _project(tmp_path_factory.mktemp("resume-reference") / "p", data_root, **SCHEDULE)
    train(layout)
    return layout


def _lr_curve(layout: Layout) -> list[float]:
    run_id = json.loads(layout.run_file.read_text())["run_id"]
    return [m.value for m in sorted(_client(layout).get_metric_history(run_id, "learning_rate"), key=lambda m: m.step)]


def _project(root: Path, data_root: Path, **train) -> Layout:
    raw = tiny_dict()
    raw["dataset"]["root"] = str(data_root / "data")
    raw["model"]["normalization"] = True   # the default's BatchNorm: its moving statistics must resume too
    raw["train"].update({"epochs": 4, "num_infer_images": 1, **train})
    raw["mlflow"]["log_model"] = False
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return Layout(root, params_from_dict(raw))


def _weights(layout: Layout) -> list[np.ndarray]:
    return keras.models.load_model(layout.model_file, compile=False).get_weights()


def _assert_same_model(a: Layout, b: Layout) -> None:
    for x, y in zip(_weights(a), _weights(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    ha, hb = (json.loads((lay.metrics / "train.json").read_text()) for lay in (a, b))
    assert ha["epochs_run"] == hb["epochs_run"] and ha["kept_epoch"] == hb["kept_epoch"]
    assert ha["final_val_loss"] == pytest.approx(hb["final_val_loss"], rel=1e-5)


def _client(layout: Layout) -> MlflowClient:
    return MlflowClient(resolve_tracking_uri(layout.params.mlflow, layout.root))


def test_a_sigkilled_training_resumes_and_gives_the_uninterrupted_model(tmp_path, data_root, reference):
    layout = _project(tmp_path / "killed", data_root, **SCHEDULE)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    worker = subprocess.Popen([str(BIN / "flexunet"), "train", "--params", str(layout.root / "params.yaml")],
                              cwd=layout.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not list((layout.root / STATE_ROOT).glob("*/epoch-00002/state.json")):
        assert worker.poll() is None, worker.stdout.read()
        assert time.monotonic() < deadline, "epoch 2 never completed"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert not layout.model_file.exists()
    experiment = _client(layout).get_experiment_by_name(layout.params.mlflow.experiment_name).experiment_id
    (killed_run,) = _client(layout).search_runs([experiment], "tags.`flexunet.stage` = 'train'")
    assert killed_run.info.status == "RUNNING"   # what SIGKILL leaves behind

    result = train(layout)   # what the next `dvc repro` runs
    summary = json.loads((layout.metrics / "train.json").read_text())
    assert 3 <= summary["resumed_at_epoch"] <= result.epochs_run and summary["epochs_configured"] == 5
    _assert_same_model(reference, layout)
    assert _lr_curve(layout) == pytest.approx(_lr_curve(reference))
    assert not list(layout.models.glob(".*")), "no hidden leftovers beside the model"
    assert not any((layout.root / STATE_ROOT).iterdir()), "the resume state is removed once training ends"

    client = _client(layout)
    killed = client.get_run(killed_run.info.run_id)
    assert killed.info.status == "FAILED"
    assert f"process {worker.pid}" in killed.data.tags["fail_reason"]
    assert "ended while the run was open" in killed.data.tags["fail_reason"]
    resumed = client.get_run(result.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["flexunet.resumed_from_run"] == killed_run.info.run_id
    assert [m.step for m in client.get_metric_history(result.run_id, "val_loss")] == list(range(1, result.epochs_run + 1))


class _Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("simulated crash at the start of epoch 3")


def test_a_crash_resumes_with_the_schedule_callbacks_state(tmp_path, data_root, reference, monkeypatch):
    layout = _project(tmp_path / "crashed", data_root, **SCHEDULE)
    real = train_module.stage_callbacks
    monkeypatch.setattr(train_module, "stage_callbacks", lambda *a: real(*a) + [_Crash()])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(layout)
    assert not layout.model_file.exists() and not (layout.metrics / "train.json").exists()
    state = next((layout.root / STATE_ROOT).iterdir())
    saved = json.loads(next(state.glob("epoch-00002/state.json")).read_text())
    assert set(saved["callbacks"]) == {"EarlyStopping", "ReduceLROnPlateau", "ModelCheckpoint"}
    monkeypatch.setattr(train_module, "stage_callbacks", real)

    # Other params (here the seed) have a state of their own: they would start over.
    fingerprint = layout.read_manifest()["fingerprint"]
    other = layout.params.model_copy(update={"train": layout.params.train.model_copy(update={"seed": 3})})
    assert TrainingState.for_params(layout.root, other, fingerprint).latest() is None
    assert TrainingState.for_params(layout.root, layout.params, fingerprint).latest().epochs_done == 2

    train(layout)
    assert json.loads((layout.metrics / "train.json").read_text())["resumed_at_epoch"] == 3
    _assert_same_model(reference, layout)
    lr = _lr_curve(layout)
    assert lr == pytest.approx(_lr_curve(reference)) and min(lr) < SCHEDULE["learning_rate"]   # the reducer fired, alike
