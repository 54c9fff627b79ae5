"""Session fixtures of the integration tests: one prepared tiny dataset, and (started on
first use, gone at the end) one throw-away PostgreSQL cluster and one MLflow tracking
server on it (tests/integration/servers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config.load import params_from_dict
from pipeline.layout import Layout
from pipeline.stages.prepare import prepare
from tests.conftest import tiny_dict
from tests.integration.servers import MlflowServer, Postgres


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
