"""Tune stage: an Optuna study over `tune.search_space`, one nested MLflow run per trial.

Each trial trains through pipeline.model.fit.fit -- the train stage's own loop -- for
`tune.epochs_per_trial` epochs on a seeded `tune.train_subset` of the train split, and
its value is the best validation mean foreground Dice over the epochs validated: every
epoch when a pruner is set (the per-epoch value feeds it), else the last epoch only.
Several `flexunet tune` processes on the same storage cooperate: each starts a trial
only while complete + pruned + running trials are fewer than `tune.n_trials`, so
together they stop at the study's total. Storage, naming and the handling of dead
workers: pipeline.study.

Outputs (all or nothing): tune/best_params.yaml (the study's best values),
tune/train_overrides.yaml (what train depends on: those values if
train.use_tuned_params, else empty), metrics/tune.json, plots/tune_history.png and
plots/tune_importance.png (also logged to the study's parent MLflow run).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import optuna
import yaml
from optuna.trial import TrialState
from tqdm import tqdm

from pipeline import study as studies
from common.errors import FlexUNetError
from pipeline.layout import Layout
from pipeline.liveness import this_process
from pipeline.model.architecture import forward_flops
from pipeline.config.schema import Params
from pipeline.config.load import params_from_dict
from pipeline.config.search_space import Categorical, FloatRange, IntRange, apply_values, current_values, in_space
from pipeline.tracking import (
    find_project_root, mark_failed, resolve_tracking_uri, run_exists, set_run_tags, standard_tags, start_run,
)
from pipeline.model.fit import fit, load_training_data
from common.atomic import remove_on_failure, write_json, write_text

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"   # study user attr: the study's MLflow parent run
MAX_OVER_BUDGET = 50                   # proposals over the cost cap in a row before a worker gives up


class TuneError(FlexUNetError):
    pass


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    counts: dict[str, int]


class OptunaPruning(keras.callbacks.Callback):
    """Reports the epoch's validation mean foreground Dice to the trial; prunes on request."""

    def __init__(self, trial: optuna.Trial, keys: list[str]):
        super().__init__()
        self.trial, self.keys = trial, keys

    def on_epoch_end(self, epoch, logs=None):
        if not all(k in (logs or {}) for k in self.keys):
            return   # not a validation epoch
        value = objective_value([{k: logs[k] for k in self.keys}])
        self.trial.report(value, step=epoch + 1)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"validation Dice {value:.4f} after epoch {epoch + 1}")


def objective_value(epochs: list[dict[str, float]]) -> float:
    """Best over epochs of the mean of the per-class validation Dice values given."""
    means = [float(np.mean(list(e.values()))) for e in epochs]
    finite = [m for m in means if np.isfinite(m)]
    return max(finite) if finite else float("nan")


def suggest(trial: optuna.Trial, name: str, dim: Any) -> Any:
    if isinstance(dim, Categorical):
        return trial.suggest_categorical(name, dim.choices)
    if isinstance(dim, IntRange):
        return trial.suggest_int(name, dim.low, dim.high, step=dim.step, log=dim.log)
    if isinstance(dim, FloatRange):
        return trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    raise TypeError(f"unknown search-space entry {dim!r}")


def trial_params(params: Params, values: dict[str, Any]) -> Params:
    """params.yaml with the trial's values and the trial's epoch budget (validated): the
    full run's schedule over epochs_per_trial epochs, the warm-up included."""
    raw = apply_values(params.model_dump(mode="python"), values)
    raw["train"].update(epochs=params.tune.epochs_per_trial, max_minutes=None, epoch_change_infer=False,
                        epoch_change_tiled_infer=False, use_tuned_params=False)
    return params_from_dict(raw, source=f"trial values {values}")


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    t = params.tune
    if t.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=t.pruner_startup_trials,
                                           n_warmup_steps=t.pruner_warmup_epochs)
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, t.pruner_warmup_epochs),
                                              max_resource=t.epochs_per_trial)
    return optuna.pruners.NopPruner()


class Objective:
    """One trial: sample, train via pipeline.model.fit.fit inside a nested MLflow run, score.

    Returns the value, or raises optuna.TrialPruned; any other failure is raised after
    its reason is written to the trial (user attr fail_reason) and to its MLflow run."""

    def __init__(self, layout: Layout, project_root: Path, parent_run_id: str):
        self.layout, self.root, self.parent = layout, project_root, parent_run_id
        self.data = None
        names = layout.params.mask.class_names[1:]
        self.keys = [f"val_dice_{n}" for n in names]

    def __call__(self, trial: optuna.Trial) -> float:
        p = self.layout.params
        trial.set_user_attr(studies.WORKER_ATTR, this_process())
        tags = {"optuna.study": trial.study.study_name, "optuna.trial_number": str(trial.number),
                "flexunet.stage": "tune-trial"}
        outcome: BaseException | None = None
        with start_run(p.mlflow, self.root, run_name=f"trial {trial.number}", tags=tags,
                       parent_run_id=self.parent) as run:
            trial.set_user_attr(studies.MLFLOW_RUN_ATTR, run.run_id)
            try:
                values = {name: suggest(trial, name, dim) for name, dim in p.tune.search_space.items()}
                run.log_params({**values, "epochs_per_trial": p.tune.epochs_per_trial,
                                "train_subset": p.tune.train_subset})
                layout = Layout(self.layout.root, trial_params(p, values))
                gflop = forward_flops(layout.params.model) / 1e9
                run.log_metrics({"forward_gflop_per_image": gflop})
                cap = p.tune.max_gflop_per_image
                if cap is not None and gflop > cap:
                    trial.set_user_attr(studies.OVER_BUDGET_ATTR, round(gflop, 4))
                    raise optuna.TrialPruned(f"not trained: {gflop:.3f} GFLOP per image > "
                                             f"tune.max_gflop_per_image {cap}")
                if self.data is None:   # every trial trains on the same images: decode them once
                    self.data = load_training_data(layout, p.tune.train_subset)
                # Without a pruner only the last epoch's validation counts: skip the others'.
                every = 1 if p.tune.pruner != "none" else p.tune.epochs_per_trial
                result = fit(layout, run, extra_callbacks=[OptunaPruning(trial, self.keys)], data=self.data,
                             validation_freq=every)
                validated = len(result.history[self.keys[0]])
                history = [{k: result.history[k][i] for k in self.keys} for i in range(validated)]
                value = objective_value(history)
                if not np.isfinite(value):
                    raise TuneError(f"trial {trial.number}: validation Dice is not finite (diverged?)")
                run.log_metrics({"objective": value, "trial_seconds": result.seconds})
                run.set_tags({"optuna.state": "COMPLETE"})
            except optuna.TrialPruned as exc:
                run.set_tags({"optuna.state": "PRUNED", "optuna.pruned": str(exc)})
                outcome = exc   # a pruned trial is a finished run, not a failed one
            except BaseException as exc:
                reason = ("interrupted (KeyboardInterrupt)" if isinstance(exc, KeyboardInterrupt)
                          else f"{type(exc).__name__}: {exc}")[:2000]
                trial.set_user_attr(studies.FAIL_REASON_ATTR, reason)
                run.set_tags({"optuna.state": "FAIL", "fail_reason": reason})
                raise
            finally:
                keras.backend.clear_session()   # each trial builds a new graph: free the last one
                gc.collect()
        if outcome is not None:
            raise outcome
        return value


def tune(layout: Layout, worker: int = 0) -> TuneResult | None:
    """Run this worker's share of the study. Worker 0 (the DVC stage) then waits for other
    workers' running trials and writes the stage outputs from the whole study; workers
    1, 2, ... only run trials (returns None)."""
    p, t = layout.params, layout.params.tune
    project_root = find_project_root(layout.root)
    fingerprint = layout.read_manifest().get("fingerprint")
    storage = studies.open_storage(t.storage, project_root, t.heartbeat_seconds,
                                   on_stale=_mlflow_closer(layout, project_root))
    name = studies.study_name(p, fingerprint)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=make_pruner(p))
    # Seeded, but never the same stream twice: a resumed study or a second worker with the
    # same seed would otherwise propose the very trials already run.
    study.sampler = optuna.samplers.TPESampler(
        seed=int(np.random.SeedSequence([t.seed, worker, len(study.trials)]).generate_state(1)[0]),
        n_startup_trials=t.startup_trials)
    location = studies.storage_location(t.storage, project_root)
    log.info("study %s at %s: %s", name, studies.shown(location), studies.counts(study))
    outputs = [layout.tuned_params_file, layout.train_overrides_file, layout.metrics / "tune.json",
               layout.plots / "tune_history.png", layout.plots / "tune_importance.png"] if worker == 0 else []
    with remove_on_failure(outputs):
        with studies.study_lock(storage, location, name):   # one parent run, however many workers start
            parent = _parent_run(study, layout, project_root, fingerprint)
            if t.enqueue_current and not study.trials:
                current = current_values(p.model, p.train, list(t.search_space))
                inside = {k: v for k, v in current.items() if in_space(t.search_space[k], v)}
                if inside:
                    study.enqueue_trial(inside, skip_if_exists=True)
        objective = Objective(layout, project_root, parent)
        guard = {"flexunet.time_guard": f"tune.timeout_minutes {t.timeout_minutes} fired (worker {worker})"}
        if worker != 0:
            # The parent run is worker 0's: opened here, a second process would stamp its own
            # pid on it, and a later run on this host would close it as orphaned when this
            # worker ends. The trials name their parent themselves.
            uri = resolve_tracking_uri(p.mlflow, project_root)
            if _run_trials(study, objective, p, storage, location, uri) == "timeout":
                set_run_tags(uri, parent, guard)
            return None
        with start_run(p.mlflow, project_root, run_id=parent) as run:
            while True:
                stop = _run_trials(study, objective, p, storage, location, run.tracking_uri)
                if stop == "timeout":
                    run.set_tags(guard)
                _wait_for_others(study, storage, location, run.tracking_uri)
                # A worker that died mid-trial (its trial now FAIL) left the study short: the
                # stage's outputs describe a study of n_trials, so worker 0 makes up for it.
                c = studies.counts(study)
                if stop != "full" or c["complete"] + c["pruned"] >= t.n_trials:
                    return _report(study, layout, run, stop == "timeout")


def _mlflow_closer(layout: Layout, project_root: Path):
    """Optuna's heartbeat callback (RDB storages): close the stale trial's MLflow run too."""
    def close(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get(studies.MLFLOW_RUN_ATTR)
        uri = resolve_tracking_uri(layout.params.mlflow, project_root)
        if run_id and run_exists(uri, run_id):
            mark_failed(uri, run_id, "worker stopped sending heartbeats during the trial (killed or crashed)")
    return close


def _parent_run(study: optuna.Study, layout: Layout, project_root: Path, fingerprint: str | None) -> str:
    """The study's MLflow parent run: created by its first worker, found by the others."""
    p = layout.params
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent and run_exists(resolve_tracking_uri(p.mlflow, project_root), parent):
        return parent
    tags = {**standard_tags(project_root, fingerprint, "tune"), "optuna.study": study.study_name}
    with start_run(p.mlflow, project_root, run_name=f"tune {study.study_name}", tags=tags) as run:
        run.log_params({k: v for k, v in p.flat().items() if k.startswith("tune.") and "search_space" not in k})
        run.log_params({"tune.search_space": str(p.tune.model_dump(mode="json")["search_space"])})
        parent = run.run_id
    study.set_user_attr(PARENT_ATTR, parent)
    return parent


def _close_dead(study: optuna.Study, storage: Any, tracking_uri: str) -> None:
    for trial in studies.fail_dead_trials(study, storage):
        run_id = trial.user_attrs.get(studies.MLFLOW_RUN_ATTR)
        if run_id and run_exists(tracking_uri, run_id):
            mark_failed(tracking_uri, run_id, "worker process ended during the trial (killed or crashed)")


def _run_trials(study: optuna.Study, objective: Objective, params: Params, storage: Any,
                location: str, tracking_uri: str) -> str:
    """Start trials while the study's complete + pruned + running trials are fewer than
    n_trials. The count and the new trial are taken under the study's lock
    (studies.study_lock: a file lock on one machine, an advisory lock in PostgreSQL
    across machines), so workers never overshoot; ask/tell instead of optimize() for that
    reason (the heartbeat optimize() would run is kept by studies.heartbeat). Returns why
    this worker stopped: "full" (the study has its trials, some maybe still running),
    "timeout" (the opt-in tune.timeout_minutes), "failures" or "over_budget"."""
    t = params.tune
    deadline = time.monotonic() + 60 * t.timeout_minutes if t.timeout_minutes else None
    optuna.logging.set_verbosity(optuna.logging.WARNING)   # our own line per trial instead
    failures, over_budget, durations = 0, 0, []
    with tqdm(total=t.n_trials, desc=f"study {study.study_name}", unit="trial") as bar:
        while True:
            # A trial is not started unless one of average length still fits the timeout,
            # so the timeout bounds the stage, not just the start of its last trial.
            expected = float(np.mean(durations)) if durations else 0.0
            if deadline is not None and time.monotonic() + expected >= deadline:
                log.warning("tune.timeout_minutes (%s) fired: no time left for another trial (~%.0f s); "
                            "the study is incomplete", t.timeout_minutes, expected)
                return "timeout"
            if failures >= 3:
                log.warning("stopping this worker: its last %d trials failed (see their fail_reason)", failures)
                return "failures"
            if over_budget >= MAX_OVER_BUDGET:
                log.warning("stopping this worker: its last %d proposals exceeded tune.max_gflop_per_image; "
                            "narrow tune.search_space or raise the cap", over_budget)
                return "over_budget"
            with studies.study_lock(storage, location, study.study_name):
                _close_dead(study, storage, tracking_uri)
                c = studies.counts(study)
                bar.n = min(c["complete"] + c["pruned"], t.n_trials)
                bar.set_postfix(failed=c["fail"], running=c["running"])
                bar.refresh()
                if c["complete"] + c["pruned"] + c["running"] >= t.n_trials:
                    return "full"
                trial = study.ask()
            started = time.monotonic()
            state = _run_one(study, trial, objective, storage)
            frozen = study.trials[trial.number]
            if studies.OVER_BUDGET_ATTR in frozen.user_attrs:
                over_budget += 1
            else:
                over_budget = 0
                durations.append(time.monotonic() - started)
            failures = failures + 1 if state == TrialState.FAIL else 0
            _log_trial(frozen)


def _run_one(study: optuna.Study, trial: optuna.Trial, objective: Objective, storage: Any) -> TrialState:
    with studies.heartbeat(study, trial, storage):
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            return TrialState.PRUNED
        except Exception:
            log.debug("trial %d failed", trial.number, exc_info=True)
            study.tell(trial, state=TrialState.FAIL)
            return TrialState.FAIL
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)   # Ctrl-C: the trial is failed, not left running
            raise
    study.tell(trial, value)
    return TrialState.COMPLETE


def _wait_for_others(study: optuna.Study, storage: Any, location: str, tracking_uri: str,
                     poll_seconds: float = 2.0) -> None:
    """The stage's outputs describe the whole study: wait for other workers' running trials
    (trials of dead workers are failed meanwhile, so this ends)."""
    waited = False
    while True:
        with studies.study_lock(storage, location, study.study_name):
            _close_dead(study, storage, tracking_uri)
        running = studies.counts(study)["running"]
        if not running:
            return
        if not waited:
            log.info("waiting for %d trial(s) of other workers to finish", running)
            waited = True
        time.sleep(poll_seconds)


def _log_trial(tr: optuna.trial.FrozenTrial) -> None:
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in tr.params.items())
    if tr.state == TrialState.COMPLETE:
        detail = f"{tr.value:.4f}"
    elif tr.state == TrialState.FAIL:
        detail = tr.user_attrs.get(studies.FAIL_REASON_ATTR, "")
    elif studies.OVER_BUDGET_ATTR in tr.user_attrs:
        detail = f"not trained: {tr.user_attrs[studies.OVER_BUDGET_ATTR]} GFLOP per image > tune.max_gflop_per_image"
    else:
        detail = f"best so far {max(tr.intermediate_values.values()):.4f}" if tr.intermediate_values else "no value"
    log.info("trial %d %s (%s): %s", tr.number, tr.state.name, shown, detail)


def _report(study: optuna.Study, layout: Layout, run, timed_out: bool = False) -> TuneResult:
    from pipeline.plots import tune_plots

    p, c = layout.params, studies.counts(study)
    complete = [tr for tr in study.get_trials(deepcopy=False) if tr.state == TrialState.COMPLETE]
    if not complete:
        raise TuneError(f"study {study.study_name}: no trial completed ({c}); see the failed trials' "
                        f"fail_reason in MLflow, or raise tune.timeout_minutes / tune.n_trials")
    best = study.best_trial
    # Only what identifies the best trial: more trials that do not beat it leave this file
    # (train's dependency) unchanged, so DVC does not retrain. Counts go to metrics/tune.json.
    doc = {"study": study.study_name, "storage": studies.shown(p.tune.storage), "best_trial": best.number,
           "best_value": round(float(best.value), 6), "metric": "validation mean foreground Dice after "
           f"{p.tune.epochs_per_trial} epochs on {p.tune.train_subset or 'all'} train images (best validated epoch)",
           "params": best.params}
    header = ("# Written by the tune stage (flexunet tune): the best trial of the Optuna study.\n"
              "# train uses `params` over params.yaml when train.use_tuned_params is true.\n")
    write_text(layout.tuned_params_file, header + yaml.safe_dump(doc, sort_keys=False))
    used = {"params": best.params} if p.train.use_tuned_params else {}
    write_text(layout.train_overrides_file, "# train's DVC dependency: the tuned values when train.use_tuned_params, "
               "else nothing\n" + yaml.safe_dump(used, sort_keys=False))
    metrics = {"best_value": float(best.value), "best_trial": best.number, "study": study.study_name,
               "n_trials": p.tune.n_trials, "timeout_fired": timed_out,
               **{f"trials_{k}": v for k, v in c.items() if k in ("complete", "pruned", "fail", "over_budget")}}
    write_json(layout.metrics / "tune.json", metrics)
    history, importance = layout.plots / "tune_history.png", layout.plots / "tune_importance.png"
    tune_plots(study, history, importance)
    run.log_metrics({"best_value": float(best.value), "trials_complete": c["complete"],
                     "trials_pruned": c["pruned"], "trials_failed": c["fail"], "trials_over_budget": c["over_budget"]})
    run.set_tags({"best_trial": str(best.number), **{f"best.{k}": str(v) for k, v in best.params.items()}})
    for path in (history, importance):
        run.log_artifact(path, "plots")
    run.log_artifact(layout.tuned_params_file, "tune")
    log.info("best trial %d: %.4f %s -> %s", best.number, best.value, best.params, layout.tuned_params_file)
    return TuneResult(study.study_name, best.number, float(best.value), dict(best.params), c)
