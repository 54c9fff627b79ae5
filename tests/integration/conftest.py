"""Session fixtures of the integration tests: the tiny DVC project that the end-to-end and
DVC-remote tests share (one `dvc repro`), one prepared tiny dataset, and (started on first
use, gone at the end) one throw-away PostgreSQL cluster and one MLflow tracking server on
it (tests/integration/servers.py).

`project` copies common/, pipeline/, serving/, dvc.yaml and the real sample into a temporary git + DVC
repository with tiny params, runs `dvc repro`, commits the result (tag `repro`), adds a
local directory as the default DVC remote and pushes to it. The end-to-end tests then
change the project in sequence; the remote test clones the `repro` tag elsewhere.

pytest-xdist runs a module per worker (--dist loadfile), so two modules using a session
fixture would each build one: the first worker to get here builds it next to every
worker's temp dir, under a file lock, and the others reuse it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.config.load import params_from_dict
from pipeline.layout import Layout
from pipeline.stages.prepare import prepare
from tests.conftest import tiny_dict
from tests.integration.servers import MlflowServer, Postgres

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY_TUNE = {"n_trials": 2, "epochs_per_trial": 1, "train_subset": 8, "timeout_minutes": None, "pruner": "none",
             "enqueue_current": False,   # random proposals: the tuned values differ from params.yaml's
             "search_space": {"base_filters": {"type": "categorical", "choices": [2, 4]},
                              "base_kernels": {"type": "int", "low": 3, "high": 5, "step": 2},
                              "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
REPRO_TAG = "repro"


def sh(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def remote_of(root: Path) -> Path:
    """The project's DVC remote: a local directory beside it (a shared disk, an S3 bucket...)."""
    return root.with_name(root.name + "-remote")


def build_project(root: Path) -> None:
    for name in ("common", "pipeline", "serving"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    (root / "data" / "raw").mkdir(parents=True)
    shutil.copy(REPO / "data" / "raw" / "README.md", root / "data" / "raw")   # prepare's (empty) raw-data dep
    sample = "data/real-sample/kidney-t2w"   # in git, as in the repository (evaluate's dep)
    for folder in (sample, "data/real-sample/glomeruli-pas"):   # both are evaluate_tiled's deps
        shutil.copytree(REPO / folder, root / folder)
    raw = tiny_dict()
    raw["evaluate"]["real_sample"] = sample
    raw["train"].update(epochs=1, use_tuned_params=True, epoch_change_infer=False)
    raw["mlflow"]["log_model"] = False
    raw["tune"] = dict(TINY_TUNE)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n__pycache__/\noptuna/\n")
    dvc = str(BIN / "dvc")
    sh(["git", "init", "-q"], root)
    sh([dvc, "init", "-q"], root)
    sh([dvc, "config", "core.analytics", "false"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "init"], root)
    sh([dvc, "repro"], root)
    sh([dvc, "remote", "add", "-d", "storage", str(remote_of(root))], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "first run"], root)
    sh(["git", "tag", REPRO_TAG], root)
    sh([dvc, "push", "-q"], root)


@pytest.fixture(scope="session")
def project(tmp_path_factory, worker_id) -> Path:
    if worker_id == "master":   # no xdist (-n 0): this process's own temp dir
        root = tmp_path_factory.mktemp("project")
        build_project(root)
        return root
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent   # one per pytest run, above every worker's
    root, built = shared / "project", shared / "project.built"
    with FileLock(str(shared / "project.lock")):
        if not built.exists():
            for path in (root, remote_of(root)):
                shutil.rmtree(path, ignore_errors=True)   # a worker that failed half-way
            root.mkdir()
            build_project(root)
            built.touch()
    return root


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One prepared tiny dataset; each test copies nothing, it points its layout here."""
    root = tmp_path_factory.mktemp("tune-data")
    prepare(Layout(root, params_from_dict(tiny_dict())))
    return root


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster on a free loopback port (skipped only without its binaries)."""
    pg = Postgres.start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres: Postgres, tmp_path_factory) -> Iterator[MlflowServer]:
    """`mlflow server` with its backend store in the PostgreSQL fixture, artifacts in a temp folder."""
    artifacts = tmp_path_factory.mktemp("mlflow-server") / "artifacts"
    artifacts.mkdir()
    server = MlflowServer.start(postgres.create_database("mlflow"), artifacts)
    try:
        yield server
    finally:
        server.stop()
