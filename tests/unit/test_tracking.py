"""MLflow store resolution (DVC temp copies!), run status on failure, what outputs record of
the store, the experiment's kind, system metrics."""

from __future__ import annotations


import pytest

from common.errors import FlexUNetError
from pipeline.config.schema import MlflowParams
from pipeline.tracking import (
    EXPERIMENT_KIND, find_project_root, portable_uri, resolve_tracking_uri, run_status, start_run, store_record,
)


def test_project_root_escapes_dvc_temp_experiment(tmp_path):
    repo = tmp_path / "repo"
    temp = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    temp.mkdir(parents=True)
    assert find_project_root(temp) == repo.resolve()
    assert find_project_root(repo) == repo.resolve()


def test_tracking_uri_is_absolute_and_overridable(tmp_path):
    cfg = MlflowParams()
    assert resolve_tracking_uri(cfg, tmp_path, env={}) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    rel = MlflowParams(tracking_uri="sqlite:///stores/m.db")
    assert resolve_tracking_uri(rel, tmp_path, env={}) == f"sqlite:///{tmp_path.resolve()}/stores/m.db"
    assert resolve_tracking_uri(MlflowParams(tracking_uri="sqlite:////abs/m.db"), tmp_path, env={}) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri(cfg, tmp_path, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}) == "http://127.0.0.1:5000"


def test_outputs_record_no_path_of_this_clone(tmp_path):
    """models/train_run.json and registered.json travel to other clones (DVC remote, git):
    the project's own store is resolved again there, so only other stores are recorded."""
    root = tmp_path.resolve()
    for cfg in (MlflowParams(), MlflowParams(tracking_uri="sqlite:///stores/m.db"), MlflowParams(tracking_uri="m.db")):
        assert portable_uri(resolve_tracking_uri(cfg, root, env={}), root) is None
    assert store_record(f"sqlite:///{root}/mlflow.db", root) == {}
    assert portable_uri("sqlite:////elsewhere/m.db", root) == "sqlite:////elsewhere/m.db"
    assert store_record("http://host:5000", root) == {"tracking_uri": "http://host:5000"}
    temp = root / ".dvc" / "tmp" / "exps" / "tmpab12cd"   # `dvc exp run --temp`: the real project's store
    assert portable_uri(f"sqlite:///{root}/mlflow.db", temp) is None


def test_failed_block_marks_run_failed_and_success_finished(tmp_path, monkeypatch):
    """Also (one store for all, its creation is most of the time): the experiment is tagged
    as model training, as MLflow 3's UI reads it, even one created before the tag; a run
    with system_metrics logs system/* metrics (psutil) every sampling interval."""
    import time

    from mlflow.tracking import MlflowClient

    cfg = MlflowParams(experiment_name="t")
    with pytest.raises(RuntimeError):
        with start_run(cfg, tmp_path, tags={"k": "v"}) as run:
            failed = run
            run.log_metrics({"loss": 1.0}, step=1)
            raise RuntimeError("boom")
    assert run_status(failed.tracking_uri, failed.run_id) == "FAILED"
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    with start_run(cfg, tmp_path, system_metrics=True) as run:
        run.log_metrics({"loss": 0.5, "nan": float("nan")}, step=1)
        time.sleep(1.2)   # many intervals: a loaded machine still publishes some
    assert run_status(run.tracking_uri, run.run_id) == "FINISHED"
    assert (tmp_path / "mlflow.db").is_file()

    client = MlflowClient(run.tracking_uri)
    experiment = client.get_experiment_by_name("t")
    assert experiment.tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    metrics = client.get_run(run.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert not [k for k in client.get_run(failed.run_id).data.metrics if k.startswith("system/")]
    client.delete_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND[0])   # an experiment made before
    with start_run(cfg, tmp_path):
        pass
    assert client.get_experiment_by_name("t").tags[EXPERIMENT_KIND[0]] == "custom_model_development"


def test_reopening_a_run_the_store_lacks_is_one_clear_error(tmp_path):
    cfg = MlflowParams(experiment_name="t")
    with start_run(cfg, tmp_path) as run:  # creates the store, with one run
        pass
    with start_run(cfg, tmp_path, run_id=run.run_id):  # the same store: reopens fine
        pass
    with pytest.raises(FlexUNetError, match=r"MLflow run 0+ is missing or deleted in the tracking store "
                                            r"sqlite:///.*mlflow.db; if models/train_run.json .* `dvc repro -f train`"):
        with start_run(cfg, tmp_path, run_id="0" * 32):
            pass
    from mlflow.tracking import MlflowClient

    MlflowClient(run.tracking_uri).delete_run(run.run_id)
    with pytest.raises(FlexUNetError, match=f"MLflow run {run.run_id} is missing or deleted"):
        with start_run(cfg, tmp_path, run_id=run.run_id):
            pass


def test_init_from_values_that_are_mlflow_uris():
    from pipeline.tracking import is_mlflow_uri

    assert all(is_mlflow_uri(v) for v in ("models:/flexunet-kidney-t2w@champion", "models:/m/3", "runs:/abc/model",
                                          "mlflow-artifacts://host/x"))
    assert not any(is_mlflow_uri(v) for v in ("models/model.keras", "/abs/model.keras"))
