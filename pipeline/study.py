"""Where an Optuna study lives, what it is called, and how dead workers' trials are closed.

Storage (`tune.storage`):
- a file path (default `optuna/flexunet.journal`, relative to the project root): Optuna's
  JournalStorage with a file backend, safe for several processes on one machine. It has
  no heartbeat, so each trial records its worker's host and process id (plus the
  process start time); a worker starting on the same host fails the RUNNING trials
  whose process is gone.
- an RDB URL (`sqlite:///optuna.db`, `postgresql+psycopg://...`): RDBStorage with
  `heartbeat_interval`, so Optuna itself fails a trial whose worker stopped beating, on
  any machine. A relative sqlite path is taken from the project root.

The study lock (`study_lock`) serialises what must not race between workers: creating or
adopting the study's MLflow parent run, and counting the trials then asking for a new one
(so the study stops at exactly `tune.n_trials`). Where it lives follows the storage:
- journal file, sqlite file: an flock on `<file>.setup.lock` (one machine; SQLite's own
  locking guards single writes, not a count-then-ask);
- PostgreSQL: a transaction-level advisory lock, `pg_advisory_xact_lock(key)`, key = 64
  bits of the study name's hash, on a connection of its own held for the section. The
  database releases it when that transaction ends, or when a killed worker's connection
  drops, so a dead worker never leaves it held. Creating Optuna's tables the first time
  is serialised the same way (two workers starting on an empty database would collide);
- other databases (MySQL...): no lock; workers on several machines may overshoot
  n_trials by one trial each (a warning says so).

The storage sits outside the tune stage's DVC outputs (DVC deletes those before a
stage runs), and it is resolved against the real repository even inside a DVC temp
experiment, so `dvc exp run` continues the same study.

Study name: `<tune.study_name>-<hash>` where the hash covers everything that defines
what a trial's value means (dataset fingerprint, search space, epochs and subset per
trial, the base model/train/mask settings), not the budget (`n_trials`, `timeout`) or
storage. More trials continue the study; a different objective starts a new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from common.errors import FlexUNetError
from pipeline.liveness import is_alive
from pipeline.config.schema import Params
from pipeline.config.search_space import TUNABLE

log = logging.getLogger(__name__)

WORKER_ATTR = "worker"               # trial user attr: {"host", "pid", "started"}
MLFLOW_RUN_ATTR = "mlflow_run_id"    # trial user attr: its nested MLflow run
FAIL_REASON_ATTR = "fail_reason"
OVER_BUDGET_ATTR = "over_budget_gflop"  # trial user attr: pruned untrained, its model costs too much
_BUDGET_KEYS = {"n_trials", "timeout_minutes", "storage", "heartbeat_seconds", "study_name", "max_gflop_per_image"}
# train keys of the full training run that a trial overrides or never uses
_FULL_RUN_KEYS = ("epochs", "max_minutes", "use_tuned_params", "epoch_change_infer",
                  "epoch_change_tiled_infer", "num_infer_images", "keep_weights", "resume", "cache")


def is_rdb_url(storage: str) -> bool:
    return "://" in storage


def storage_location(storage: str, project_root: Path) -> str:
    """The storage string with relative paths anchored at the project root."""
    if not is_rdb_url(storage):
        path = Path(storage)
        return str(path if path.is_absolute() else (project_root / path).resolve())
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        return f"sqlite:///{(project_root / storage.removeprefix('sqlite:///')).resolve()}"
    return storage


def shown(storage: str) -> str:
    """The storage for logs and files: a database URL's password as ***."""
    if not is_rdb_url(storage):
        return storage
    try:
        return sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return storage


def open_storage(storage: str, project_root: Path, heartbeat_seconds: int,
                 on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None
                 ) -> optuna.storages.BaseStorage:
    """on_stale: called for each trial Optuna's heartbeat check fails (RDB storages)."""
    location = storage_location(storage, project_root)
    if is_rdb_url(location):
        # Optuna creates its tables on first use: serialised, or two workers starting on an
        # empty database both try (a duplicate-table or version-row error for one of them).
        # The lock's connection is the first contact, with a timeout where the driver has one.
        url = sqlalchemy.engine.make_url(location)
        connect = {"connect_timeout": 10} if url.get_backend_name() == "postgresql" else {}
        try:
            setup = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect)
        except ModuleNotFoundError as exc:
            raise FlexUNetError(f"tune.storage {shown(storage)!r}: its database driver {exc.name} is not "
                                f"installed; for PostgreSQL write postgresql+psycopg://... (psycopg 3 comes "
                                f"with the pipeline extra)") from None
        try:
            with _database_lock(setup, location, "optuna-schema"):
                return optuna.storages.RDBStorage(location, heartbeat_interval=heartbeat_seconds,
                                                  grace_period=2 * heartbeat_seconds,
                                                  heartbeat_stale_trial_callback=on_stale)
        except sqlalchemy.exc.OperationalError as exc:   # a database that does not answer: one line
            first = str(exc.orig or exc).strip().splitlines()[0]
            raise FlexUNetError(f"tune.storage {shown(storage)!r}: cannot connect ({first})") from None
        finally:
            setup.dispose()
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(location).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(location))


def study_name(params: Params, fingerprint: str | None) -> str:
    """`<study_name>-<8 hex>` of what a trial's value depends on (see module docstring)."""
    tune = {k: v for k, v in params.tune.model_dump(mode="json").items() if k not in _BUDGET_KEYS}
    sections = {"model": params.model.model_dump(mode="json"), "train": params.train.model_dump(mode="json")}
    for key in _FULL_RUN_KEYS:
        sections["train"].pop(key, None)
    for name in params.tune.search_space:   # every trial sets these: their base values do not matter
        sections[TUNABLE[name]].pop(name, None)
    key = {"fingerprint": fingerprint, "tune": tune, **sections,
           "mask": {"rgb_map": sorted(map(str, params.mask.rgb_map.items()))}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"{params.tune.study_name}-{digest}"


# --------------------------------------------------------------------------- liveness
def fail_dead_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[optuna.trial.FrozenTrial]:
    """Mark FAILED the RUNNING trials whose worker died on this host (journal storage has no
    heartbeat); RDB storages let Optuna's heartbeat do it. Returns the trials closed, as
    they were (their user attrs name the MLflow run to close as well)."""
    if isinstance(storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
        return []
    host, closed = socket.gethostname(), []
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR) or {}
        if worker.get("host") != host or is_alive(worker):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        reason = f"worker process {worker.get('pid')} on {host} ended during the trial (killed or crashed)"
        try:
            storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason)
            if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                log.warning("trial %d: %s; recorded as failed", trial.number, reason)
                closed.append(trial)
        except UpdateFinishedTrialError:
            pass   # another worker (on another machine's lock) closed it first
    return closed


@contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial, storage: optuna.storages.BaseStorage) -> Iterator[None]:
    """While a trial runs, beat its heartbeat (RDB storages with heartbeat_interval), as
    Study.optimize does; journal storages rely on the pid check instead."""
    interval = storage.get_heartbeat_interval() if isinstance(storage, optuna.storages.RDBStorage) else None
    if not interval:
        yield
        return
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), trial.number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def lock_key(name: str) -> int:
    """The signed 64-bit advisory-lock key of a name (PostgreSQL's bigint)."""
    return int.from_bytes(hashlib.sha256(f"flexunet:{name}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def study_lock(storage: optuna.storages.BaseStorage, location: str, name: str) -> Iterator[None]:
    """Hold the study's lock (module docstring): an flock next to a journal or sqlite
    file, a PostgreSQL advisory lock keyed by the study name. location: storage_location()."""
    if isinstance(storage, optuna.storages.RDBStorage):
        with _database_lock(storage.engine, location, name):
            yield
        return
    with _file_lock(Path(location)):
        yield


_warned: set[str] = set()


@contextmanager
def _database_lock(engine: sqlalchemy.engine.Engine, location: str, name: str) -> Iterator[None]:
    dialect = engine.dialect.name
    if dialect == "sqlite":
        database = sqlalchemy.engine.make_url(location).database
        if not database or database == ":memory:":
            yield   # one process sees an in-memory database
            return
        with _file_lock(Path(database)):
            yield
        return
    if dialect != "postgresql":
        if dialect not in _warned:
            _warned.add(dialect)
            log.warning("no cross-machine study lock for %s storages: workers on several machines may "
                        "overshoot tune.n_trials by one trial each (PostgreSQL has one)", dialect)
        yield
        return
    # A connection of its own, in a transaction held for the section: the xact lock ends
    # with it (the pool rolls back on return; a killed worker's connection just drops).
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(name)})
        yield


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    lock = Path(f"{path}.setup.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state; `pruned` counts trained trials only, `over_budget` the proposals
    pruned untrained for exceeding tune.max_gflop_per_image (they cost nothing, and do not
    count towards n_trials)."""
    out = {s.name.lower(): 0 for s in TrialState} | {"over_budget": 0}
    for trial in study.get_trials(deepcopy=False):
        over = trial.state == TrialState.PRUNED and OVER_BUDGET_ATTR in trial.user_attrs
        out["over_budget" if over else trial.state.name.lower()] += 1
    return out
