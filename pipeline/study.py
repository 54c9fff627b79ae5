"""Where an Optuna study lives, what it is called, and how dead workers' trials are closed.

Storage (`tune.storage`):
- a file path (default `optuna/flexunet.journal`, relative to the project root): Optuna's
  JournalStorage with a file backend, safe for several processes on one machine. It has
  no heartbeat, so each trial records its worker's host and process id (plus the
  process start time); a worker starting on the same host fails the RUNNING trials
  whose process is gone.
- an RDB URL (`sqlite:///optuna.db`, `postgresql://...`, `mysql://...`): RDBStorage with
  `heartbeat_interval`, so Optuna itself fails a trial whose worker stopped beating, on
  any machine. A relative sqlite path is taken from the project root.

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
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

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


def open_storage(storage: str, project_root: Path, heartbeat_seconds: int,
                 on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None
                 ) -> optuna.storages.BaseStorage:
    """on_stale: called for each trial Optuna's heartbeat check fails (RDB storages)."""
    location = storage_location(storage, project_root)
    if is_rdb_url(location):
        return optuna.storages.RDBStorage(location, heartbeat_interval=heartbeat_seconds,
                                          grace_period=2 * heartbeat_seconds,
                                          heartbeat_stale_trial_callback=on_stale)
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


@contextmanager
def setup_lock(storage: str, project_root: Path) -> Iterator[None]:
    """Serialise a study's one-time set-up (its MLflow parent run, the enqueued first trial)
    between worker processes on this machine: an flock next to a journal file. RDB
    storages span machines, where a file lock cannot reach; there, start further
    workers once the first one is running (its set-up takes a second)."""
    location = storage_location(storage, project_root)
    if is_rdb_url(location):
        yield
        return
    lock = Path(location + ".setup.lock")
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
