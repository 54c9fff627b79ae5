"""Tune stage: search-space validation, study naming, best values flowing into train, and
real tiny studies (resume, failed trials, a worker killed mid-trial, two workers sharing
one study), with their MLflow parent and nested runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline import study as studies
from common.errors import ParamsError
from pipeline.layout import Layout
from pipeline.config.load import params_from_dict, with_tuned_params
from pipeline.tracking import resolve_tracking_uri
from pipeline.stages.tune import objective_value, trial_params, tune
from tests.conftest import tiny_dict

BIN = Path(sys.executable).parent


def _raw(tmp_path: Path, **tune_overrides) -> dict:
    raw = tiny_dict()
    raw["train"].update(epoch_change_infer=False)
    raw["mlflow"]["log_model"] = False
    raw["tune"] = {
        "storage": str(tmp_path / "optuna" / "study.journal"), "n_trials": 3, "timeout_minutes": None,
        "epochs_per_trial": 2, "train_subset": 8, "pruner": "none",
        "search_space": {"base_filters": {"type": "categorical", "choices": [2, 4]},
                         "base_kernels": {"type": "int", "low": 3, "high": 5, "step": 2},
                         "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        **tune_overrides,
    }
    return raw


def _layout(root: Path, raw: dict) -> Layout:
    return Layout(root, params_from_dict(raw))


def _load(layout: Layout) -> optuna.Study:
    p = layout.params
    storage = studies.open_storage(p.tune.storage, layout.root, 30)
    return optuna.load_study(study_name=studies.study_name(p, layout.read_manifest()["fingerprint"]), storage=storage)


def _client(layout: Layout) -> MlflowClient:
    return MlflowClient(resolve_tracking_uri(layout.params.mlflow, layout.root))


# --------------------------------------------------------------------------- params
@pytest.mark.parametrize("space, message", [
    ({"base_kernels": {"type": "int", "low": 4, "high": 10, "step": 2}}, "must sample odd sizes"),
    ({"base_kernels": {"type": "categorical", "choices": [3, 6]}}, "[6] would be sampled"),
    ({"base_kernels": {"type": "float", "low": 3, "high": 5}}, "must be 'int' or 'categorical'"),
    ({"base_filters": {"type": "categorical", "choices": []}}, "at least 1 item"),
    ({"learning_rate": {"type": "float", "low": 1e-2, "high": 1e-3}}, "low 0.01 > high 0.001"),
    ({"learning_rate": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "log scale needs low > 0"),
    ({"base_filter": {"type": "categorical", "choices": [4]}}, "'base_filter' cannot be tuned"),
    ({}, "is empty"),
    ({"num_layers": {"type": "categorical", "choices": [2, 7]}}, "value 7 gives an invalid model section"),
    ({"learning_rate": {"type": "float", "low": 1e-3, "high": 2.0}}, "value 2.0 gives an invalid train section"),
])
def test_invalid_search_spaces_are_clear_errors(tmp_path, space, message):
    with pytest.raises(ParamsError) as err:
        params_from_dict(_raw(tmp_path, search_space=space), source="params.yaml")
    assert "params.yaml" in str(err.value) and "tune.search_space" in str(err.value)
    assert message in str(err.value)


def test_study_name_follows_the_objective_not_the_budget(tmp_path):
    base = params_from_dict(_raw(tmp_path))
    name = studies.study_name(base, "fp1")
    assert name.startswith("flexunet-") and name == studies.study_name(base, "fp1")
    more = params_from_dict(_raw(tmp_path, n_trials=50, timeout_minutes=30, storage="sqlite:///x.db"))
    assert studies.study_name(more, "fp1") == name
    assert studies.study_name(params_from_dict(_raw(tmp_path, epochs_per_trial=5)), "fp1") != name
    assert studies.study_name(base, "fp2") != name
    raw = _raw(tmp_path)
    raw["train"]["batch_size"] = 2
    assert studies.study_name(params_from_dict(raw), "fp1") != name


def test_storage_paths_are_anchored_at_the_project_root(tmp_path):
    assert studies.storage_location("optuna/s.journal", tmp_path) == str(tmp_path / "optuna" / "s.journal")
    assert studies.storage_location("sqlite:///optuna.db", tmp_path) == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert studies.storage_location("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"


def test_tuned_values_override_params_and_bad_files_are_named(tmp_path):
    params = params_from_dict(_raw(tmp_path))
    best = tmp_path / "best_params.yaml"
    best.write_text(yaml.safe_dump({"best_trial": 3, "params": {"base_filters": 8, "base_kernels": 7,
                                                                "learning_rate": 0.002}}))
    tuned = with_tuned_params(params, best)
    assert (tuned.model.base_filters, tuned.model.base_kernels, tuned.train.learning_rate) == (8, (7, 7), 0.002)
    assert tuned.model.num_layers == params.model.num_layers
    with pytest.raises(ParamsError, match="not found, but train.use_tuned_params is true"):
        with_tuned_params(params, tmp_path / "missing.yaml")
    best.write_text(yaml.safe_dump({"params": {"base_filter": 8}}))
    with pytest.raises(ParamsError, match=r"\['base_filter'\] cannot be tuned"):
        with_tuned_params(params, best)
    best.write_text(yaml.safe_dump({"params": {"base_kernels": 4}}))
    with pytest.raises(ParamsError, match="odd"):
        with_tuned_params(params, best)


def test_trial_params_use_the_trial_budget_and_validate(tmp_path):
    params = params_from_dict(_raw(tmp_path))
    tp = trial_params(params, {"base_filters": 2, "base_kernels": 3, "learning_rate": 5e-3})
    assert (tp.train.epochs, tp.model.base_kernels, tp.train.max_minutes) == (2, (3, 3), None)
    with pytest.raises(ParamsError, match="not divisible"):
        trial_params(params, {"num_layers": 7})


def test_objective_value_is_the_best_epoch_mean():
    assert objective_value([{"a": 0.2, "b": 0.4}, {"a": 0.5, "b": 0.7}, {"a": 0.1, "b": 0.1}]) == pytest.approx(0.6)
    assert objective_value([{"a": float("nan")}, {"a": 0.3}]) == pytest.approx(0.3)


# --------------------------------------------------------------------------- real studies
def test_study_runs_logs_nested_runs_and_resumes(tmp_path, data_root):
    layout = _layout(data_root, _raw(tmp_path, n_trials=2))
    result = tune(layout)
    assert sum(result.counts[s] for s in ("complete", "pruned")) == 2

    best = yaml.safe_load(layout.tuned_params_file.read_text())
    assert best["params"] == result.best_params and best["best_trial"] == result.best_trial
    assert best["params"]["base_filters"] in (2, 4) and best["params"]["base_kernels"] in (3, 5)
    assert 1e-4 <= best["params"]["learning_rate"] <= 1e-2
    study = _load(layout)
    assert study.trials[0].params["base_kernels"] == 5          # trial 0: params.yaml's own values
    assert study.trials[0].params["base_filters"] == 4
    metrics = json.loads((layout.metrics / "tune.json").read_text())
    assert metrics["best_value"] == pytest.approx(study.best_value) and metrics["trials_complete"] == 2
    for name in ("tune_history.png", "tune_importance.png"):
        assert (layout.plots / name).stat().st_size > 1000

    client = _client(layout)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert {a.path for a in client.list_artifacts(parent_id, "plots")} == {"plots/tune_history.png",
                                                                       "plots/tune_importance.png"}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1]
    for run in children:
        number = int(run.data.tags["optuna.trial_number"])
        assert run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.metrics["objective"] == pytest.approx(study.trials[number].value)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]   # per epoch
        # no pruner: only the last epoch is validated (it alone is the trial's value)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [2]
        assert int(run.data.params["base_filters"]) == study.trials[number].params["base_filters"]

    # Same objective, larger budget: the same study continues, and the resumed sampler
    # does not replay the first proposals.
    more = _layout(data_root, _raw(tmp_path, n_trials=3))
    tune(more)
    study = _load(more)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert len({t.params["learning_rate"] for t in study.trials}) == 3
    assert study.user_attrs["mlflow_parent_run_id"] == parent_id
    assert len(client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")) == 3


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, data_root, monkeypatch):
    """A configuration that runs out of memory (simulated: base_filters 4 raises MemoryError
    in training) is a failed trial with its reason; the study still reaches n_trials."""
    import pipeline.stages.tune as tune_module

    real_fit = tune_module.fit

    def fit(layout, run, **kw):
        if layout.params.model.base_filters == 4:
            raise MemoryError("simulated: out of memory for 4 base filters")
        return real_fit(layout, run, **kw)

    monkeypatch.setattr(tune_module, "fit", fit)
    raw = _raw(tmp_path, n_trials=1, enqueue_current=True)   # trial 0 = params.yaml: base_filters 4
    layout = _layout(data_root, raw)
    tune(layout)
    study = _load(layout)
    assert study.trials[0].state == TrialState.FAIL and study.trials[0].params["base_filters"] == 4
    assert "MemoryError: simulated" in study.trials[0].user_attrs["fail_reason"]
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 1
    assert all(t.params["base_filters"] == 2 for t in study.trials if t.state == TrialState.COMPLETE)
    run = _client(layout).get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "out of memory" in run.data.tags["fail_reason"]
    assert run.data.tags["optuna.state"] == "FAIL"


def test_a_pruned_trial_is_a_finished_run_marked_pruned(tmp_path, data_root):
    """The pruning callback inside fit(): a pruner that prunes every reported value."""
    from pipeline.tracking import start_run
    from pipeline.stages.tune import Objective, _run_one

    layout = _layout(data_root, _raw(tmp_path, epochs_per_trial=3, pruner="median"))   # validates every epoch
    storage = studies.open_storage(layout.params.tune.storage, layout.root, 30)
    study = optuna.create_study(study_name="prune-test", storage=storage, direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=1.1))   # Dice < 1.1: always
    with start_run(layout.params.mlflow, layout.root, run_name="parent") as parent:
        pass
    trial = study.ask()
    state = _run_one(study, trial, Objective(layout, layout.root, parent.run_id), storage)
    assert state == TrialState.PRUNED == study.trials[0].state
    assert list(study.trials[0].intermediate_values) == [1]   # reported epoch 1, pruned there
    run = _client(layout).get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "PRUNED"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert len(_client(layout).get_metric_history(run.info.run_id, "val_loss")) == 1


def _cli(root: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.Popen([str(BIN / "flexunet"), "tune", "--params", str(root / "params.yaml"), *args],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _project(tmp_path: Path, data_root: Path, raw: dict) -> Layout:
    """A project folder whose params point at the shared prepared dataset."""
    root = tmp_path / "project"
    root.mkdir()
    raw["dataset"]["root"] = str(data_root / raw["dataset"]["root"])
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return Layout(root, params_from_dict(raw))


def kill_mid_trial(worker: subprocess.Popen, storage, name: str, deadline: float) -> int:
    """SIGKILL `worker` while it runs a trial (frozen first with SIGSTOP, so the trial seen
    running is still running when it dies); returns that trial's number."""
    while True:
        assert time.monotonic() < deadline, "the worker started no trial in time"
        assert worker.poll() is None, worker.stdout.read()
        time.sleep(0.1)
        try:
            trials = optuna.load_study(study_name=name, storage=storage).trials
        except KeyError:
            continue   # the study does not exist yet
        mine = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
                and t.user_attrs.get("worker", {}).get("pid") == worker.pid]
        if not mine:
            continue
        worker.send_signal(signal.SIGSTOP)
        now = optuna.load_study(study_name=name, storage=storage).trials[mine[0].number]
        if now.state == TrialState.RUNNING:
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
            return now.number
        worker.send_signal(signal.SIGCONT)   # it finished in between: catch its next trial


def test_a_worker_killed_mid_trial_leaves_a_failed_trial_and_the_study_resumes(tmp_path, data_root):
    raw = _raw(tmp_path, n_trials=1, epochs_per_trial=40, enqueue_current=False)   # long enough to be caught running
    layout = _project(tmp_path, data_root, raw)
    worker = _cli(layout.root)
    storage = studies.open_storage(raw["tune"]["storage"], layout.root, 30)
    name = studies.study_name(layout.params, layout.read_manifest()["fingerprint"])
    number = kill_mid_trial(worker, storage, name, time.monotonic() + 180)

    tune(layout)   # the same study, resumed in this process
    study = optuna.load_study(study_name=name, storage=storage)
    killed = study.trials[number]
    assert killed.state == TrialState.FAIL
    assert f"worker process {worker.pid}" in killed.user_attrs["fail_reason"]
    assert "ended during the trial" in killed.user_attrs["fail_reason"]
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]   # failed, not lost
    run = _client(layout).get_run(killed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "killed" in run.data.tags["fail_reason"]


def test_two_workers_share_one_study_and_stop_at_its_total(tmp_path, data_root):
    raw = _raw(tmp_path, n_trials=4, epochs_per_trial=1, enqueue_current=False)
    layout = _project(tmp_path, data_root, raw)
    workers = [_cli(layout.root, "--worker", str(i)) for i in range(2)]
    logs = [w.communicate(timeout=400)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-2000:] for log in logs)
    study = _load(layout)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(study.trials) == 4
    pids = {t.user_attrs["worker"]["pid"] for t in finished}
    assert pids == {w.pid for w in workers}, "both workers ran trials of the one study"
    assert yaml.safe_load(layout.tuned_params_file.read_text())["best_trial"] == study.best_trial.number


def test_proposals_over_the_cost_cap_are_pruned_untrained_and_not_counted(tmp_path, data_root):
    from pipeline.model.architecture import forward_flops

    raw = _raw(tmp_path, n_trials=1, enqueue_current=True)   # trial 0 = params.yaml: base_filters 4
    cheap = params_from_dict(raw).model.model_copy(update={"base_filters": 2, "base_kernels": (5, 5)})
    raw["tune"]["max_gflop_per_image"] = forward_flops(cheap) / 1e9 * 1.01   # base_filters 2 at most
    layout = _layout(data_root, raw)
    result = tune(layout)
    study = _load(layout)
    trained = [t for t in study.trials if studies.OVER_BUDGET_ATTR not in t.user_attrs]
    over = [t for t in study.trials if studies.OVER_BUDGET_ATTR in t.user_attrs]
    assert len(trained) == 1 and all(t.state == TrialState.COMPLETE and t.params["base_filters"] == 2
                                     for t in trained)
    assert over and over[0].number == 0 and all(t.state == TrialState.PRUNED for t in over)
    assert result.counts["over_budget"] == len(over)
    assert json.loads((layout.metrics / "tune.json").read_text())["trials_over_budget"] == len(over)
    run = _client(layout).get_run(over[0].user_attrs["mlflow_run_id"])
    assert "tune.max_gflop_per_image" in run.data.tags["optuna.pruned"]
    assert not _client(layout).get_metric_history(run.info.run_id, "val_loss")   # never trained


def test_a_cost_cap_below_the_cheapest_model_is_a_load_error(tmp_path):
    with pytest.raises(ParamsError, match="even the cheapest model of the search space"):
        params_from_dict(_raw(tmp_path, max_gflop_per_image=1e-6), source="params.yaml")


def test_the_opt_in_timeout_is_reported_when_it_fires(tmp_path, data_root):
    layout = _layout(data_root, _raw(tmp_path, n_trials=3, timeout_minutes=0.001))
    result = tune(layout)
    assert result.counts["complete"] == 1   # one trial, then no time for another
    metrics = json.loads((layout.metrics / "tune.json").read_text())
    assert metrics["timeout_fired"] is True and metrics["n_trials"] == 3
    parent = _load(layout).user_attrs["mlflow_parent_run_id"]
    assert "tune.timeout_minutes 0.001 fired" in _client(layout).get_run(parent).data.tags["flexunet.time_guard"]


def test_study_name_ignores_base_values_the_search_overrides(tmp_path):
    raw = _raw(tmp_path)
    name = studies.study_name(params_from_dict(raw), "fp")
    raw["train"].update(learning_rate=3e-4, epochs=99)
    raw["model"]["base_filters"] = 16
    assert studies.study_name(params_from_dict(raw), "fp") == name
    raw["model"]["dropout_rate"] = 0.1      # not searched: a different objective
    assert studies.study_name(params_from_dict(raw), "fp") != name


def test_an_rdb_storage_works_unchanged_with_heartbeats(tmp_path, data_root):
    """sqlite:/// here stands for any SQLAlchemy URL (PostgreSQL for several machines)."""
    raw = _raw(tmp_path, n_trials=1, storage="sqlite:///optuna-rdb.db", heartbeat_seconds=1)
    raw["dataset"]["root"] = str(data_root / raw["dataset"]["root"])   # project root: tmp_path
    result = tune(Layout(tmp_path, params_from_dict(raw)))
    assert (tmp_path / "optuna-rdb.db").is_file()    # relative to the project root
    storage = studies.open_storage("sqlite:///optuna-rdb.db", tmp_path, 1)
    assert isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() == 1
    study = optuna.load_study(study_name=result.study_name, storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert (tmp_path / "tune" / "best_params.yaml").is_file()
