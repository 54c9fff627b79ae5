"""MLflow store resolution (DVC temp copies!) and run status on failure."""

from __future__ import annotations


import pytest

from common.errors import FlexUNetError
from pipeline.config.schema import MlflowParams
from pipeline.tracking import find_project_root, resolve_tracking_uri, run_status, start_run


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


def test_failed_block_marks_run_failed_and_success_finished(tmp_path):
    cfg = MlflowParams(experiment_name="t")
    with pytest.raises(RuntimeError):
        with start_run(cfg, tmp_path, tags={"k": "v"}) as run:
            failed = run
            run.log_metrics({"loss": 1.0}, step=1)
            raise RuntimeError("boom")
    assert run_status(failed.tracking_uri, failed.run_id) == "FAILED"
    with start_run(cfg, tmp_path) as run:
        run.log_metrics({"loss": 0.5, "nan": float("nan")}, step=1)
    assert run_status(run.tracking_uri, run.run_id) == "FINISHED"
    assert (tmp_path / "mlflow.db").is_file()


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
