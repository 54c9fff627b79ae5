"""The pipeline's one module that talks to MLflow (in serving/, only pyfunc.py does: the [mlflow] extra).

Where runs go: $MLFLOW_TRACKING_URI, else `mlflow.tracking_uri` from params, else
`sqlite:///<project root>/mlflow.db`. A relative sqlite path is resolved against the
project root, never the working directory, because `dvc exp run --temp/--queue` runs
stages in a throw-away copy under `.dvc/tmp/exps/`: runs logged there must land in the
real project's store. Artifacts of local stores go to `<project root>/mlartifacts`
for the same reason.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import FlexUNetError
from common.reachable import require_reachable
from pipeline.liveness import is_alive, this_process
from pipeline.config.schema import MlflowParams

log = logging.getLogger(__name__)

_FIX = "start it, or set MLFLOW_TRACKING_URI (or mlflow.tracking_uri in params.yaml) to a reachable store"
_EXPS_MARKER = (".dvc", "tmp", "exps")

# The name the train stage logs its Keras model under: what a models:/ URI resolves to
# (the registered version is the ONNX pyfunc; its run also holds this Keras model).
KERAS_MODEL_NAME = "model"


def find_project_root(start: Path) -> Path:
    """`start`, or the real repo when `start` lies inside a DVC temp experiment copy."""
    start = start.resolve()
    parts = start.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == _EXPS_MARKER:
            return Path(*parts[:i])
    return start


def resolve_tracking_uri(cfg: MlflowParams, project_root: Path, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    uri = env.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if not uri:
        return f"sqlite:///{(project_root / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(project_root / uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:  # a bare path: treat as a sqlite file
        path = Path(uri)
        return f"sqlite:///{(path if path.is_absolute() else project_root / path).resolve()}"
    return uri


def require_tracking(uri: str) -> str:
    """`uri` once its server answered (checked once per process, 5 s at most): a dead
    tracking server is a one-line error naming it, not minutes of MLflow's retries."""
    require_reachable(uri, _FIX)
    return uri


def reachable_tracking_uri(cfg: MlflowParams, project_root: Path) -> str:
    """resolve_tracking_uri, checked up front (the CLI does this before a stage starts)."""
    return require_tracking(resolve_tracking_uri(cfg, project_root))


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(require_tracking(uri))


def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def metric_number(value: object) -> float | None:
    """A summary or JSON value as a metric: a float for a number, None for anything else
    (a bool is not a number here, though Python counts it as an int)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class RunLogger:
    """Thin handle on one active MLflow run; stages log through it, never via mlflow.*."""

    run_id: str
    tracking_uri: str

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params({k: _param_value(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_numbers(self, summary: dict[str, Any], prefix: str = "", step: int | None = None) -> None:
        """The number-valued entries of a summary (a stage's JSON report) as metrics."""
        self.log_metrics({f"{prefix}{k}": n for k, v in summary.items() if (n := metric_number(v)) is not None}, step)

    def log_image(self, image: np.ndarray, key: str, step: int | None = None) -> None:
        import mlflow

        mlflow.log_image(np.asarray(image, dtype=np.uint8), key=key, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags({k: v for k, v in tags.items() if v is not None})

    def log_dataset(self, rows: list[dict[str, Any]], *, name: str, source: str, digest: str, context: str,
                    tags: dict[str, str] | None = None) -> None:
        """One split as a run input (the run page's *Datasets*): a table of its samples
        (`rows`, one dict per image), so the UI shows its schema and row count; `source`
        is the split's project-relative path, `digest` the dataset fingerprint."""
        import warnings

        import mlflow
        import mlflow.data
        import pandas as pd

        with warnings.catch_warnings():   # "the source can be interpreted in multiple ways": a local path
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=source, name=name, digest=digest)
        mlflow.log_input(dataset, context=context, tags=tags)

    def log_keras_model(self, model: Any, input_example: np.ndarray, name: str = KERAS_MODEL_NAME) -> None:
        import mlflow
        import mlflow.keras

        from mlflow.models import infer_signature

        # Explicit requirements and signature: MLflow's inference would reload the model in
        # a subprocess, and its input_example path fails for Keras 3 models (mlflow 3.17).
        signature = infer_signature(input_example, model.predict(input_example, verbose=0))
        mlflow.keras.log_model(model, name=name, pip_requirements=_pip_requirements(), signature=signature)

    def log_onnx_model(self, onnx_path: Path, input_example: np.ndarray, name: str = "onnx") -> str:
        """The ONNX file with the mlflow.onnx flavour; returns its model URI."""
        import mlflow.onnx
        import onnx

        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name=name, signature=onnx_signature(onnx_path),
                                     input_example=input_example, save_as_external_data=False,
                                     onnx_execution_providers=["CPUExecutionProvider"],
                                     pip_requirements=_requirements("onnx", "onnxruntime", "numpy"))
        return info.model_uri

    def log_pyfunc_model(self, python_model: Any, *, name: str, artifacts: dict[str, str], code_paths: list[str],
                         signature: Any, input_example: Any, model_config: dict[str, Any]) -> str:
        """A custom pyfunc model (serving/pyfunc.py); returns its model URI.

        Explicit requirements: inferring them would reload the model in a subprocess.
        """
        import mlflow.pyfunc

        info = mlflow.pyfunc.log_model(
            name=name, python_model=python_model, artifacts=artifacts, code_paths=code_paths,
            signature=signature, input_example=input_example, model_config=model_config,
            pip_requirements=_requirements("mlflow", "onnxruntime", "numpy", "pillow", "pandas"))
        return info.model_uri


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _pip_requirements() -> list[str]:
    return _requirements("tensorflow", "keras", "numpy", "pillow")


def _requirements(*packages: str) -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in packages]


def onnx_signature(onnx_path: Path) -> Any:
    """Tensor signature from the ONNX graph itself: names, float32, dynamic dims as -1."""
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def spec(value) -> TensorSpec:
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
        return TensorSpec(np.dtype(np.float32), dims, value.name)

    return ModelSignature(inputs=Schema([spec(v) for v in graph.input]),
                          outputs=Schema([spec(v) for v in graph.output]))


# --------------------------------------------------------------------------- fine-tuning sources
MLFLOW_SCHEMES = ("models:/", "runs:/")


def is_mlflow_uri(value: str) -> bool:
    return value.startswith(MLFLOW_SCHEMES) or "://" in value


def _registered_run(client: Any, uri: str) -> str | None:
    """The training run of models:/<name>@<alias> or models:/<name>/<version>; None for
    any other URI (runs:/..., models:/m-<id>), which MLflow downloads as it is."""
    if not uri.startswith("models:/"):
        return None
    ref = uri.removeprefix("models:/").strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, number = ref.rsplit("/", 1)
        version = client.get_model_version(name, number)
    else:
        return None
    if not version.run_id:
        raise FlexUNetError(f"train.init_from {uri}: version {version.version} of {version.name} names no "
                            f"training run (registered from a path); give runs:/<run id>/{KERAS_MODEL_NAME} or a "
                            f".keras file")
    return version.run_id


def download_keras_model(uri: str, cfg: MlflowParams, project_root: Path, dest: Path) -> tuple[Path, str]:
    """The .keras file behind an MLflow URI, downloaded into `dest`, and the URI it came from.

    models:/<name>@<alias> and models:/<name>/<version> resolve to the registered version's
    training run, whose Keras model (logged by the train stage as `model`, with
    mlflow.log_model true) is downloaded: the registered model itself is ONNX, which
    cannot be trained. runs:/... and other artifact URIs are downloaded as they are."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    store = reachable_tracking_uri(cfg, project_root)
    try:
        run_id = _registered_run(_client(store), uri)
        source = f"runs:/{run_id}/{KERAS_MODEL_NAME}" if run_id else uri
        with use_store(store):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest),
                                                             tracking_uri=store))
    except MlflowException as exc:
        why = str(exc.message if hasattr(exc, "message") else exc).splitlines()[0]
        raise FlexUNetError(f"train.init_from {uri}: not found in the tracking store {store} ({why}); give a "
                            f"registered model (models:/<name>@<alias>), runs:/<run id>/{KERAS_MODEL_NAME} or a "
                            f".keras file") from None
    found = [local] if local.suffix == ".keras" else sorted(local.rglob("*.keras"))
    if len(found) != 1:
        what = "no .keras file" if not found else f"{len(found)} .keras files"
        hint = " (was it trained with mlflow.log_model: false?)" if run_id else ""
        raise FlexUNetError(f"train.init_from {uri}: {source} holds {what}{hint}; point it at one Keras model "
                            f"(runs:/<run id>/{KERAS_MODEL_NAME}) or a .keras file")
    return found[0], source


# MLflow 3 classifies an experiment as GenAI or model training by this tag (values from the
# UI's own list: "genai_development", "custom_model_development"); untagged, the UI asks.
# MLflow 3.17's sidebar also follows a per-browser switch: docs/tracking.md.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _ensure_experiment(name: str, tracking_uri: str, project_root: Path) -> str:
    """The experiment's id, creating it if needed; tagged as model training (an experiment
    created before the tag existed gets it here, one kind set by hand is left alone)."""
    import mlflow

    key, kind = EXPERIMENT_KIND
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        if key not in existing.tags:
            mlflow.MlflowClient(tracking_uri).set_experiment_tag(existing.experiment_id, key, kind)
        return existing.experiment_id
    local = tracking_uri.startswith("sqlite:")
    location = (project_root / "mlartifacts" / _safe(name)).resolve().as_uri() if local else None
    return mlflow.create_experiment(name, artifact_location=location, tags={key: kind})


def portable_uri(uri: str, project_root: Path) -> str | None:
    """What an output may record of the store `uri`: None for a sqlite file inside the
    project (each clone resolves its own at run time), else `uri` itself (a server, or a
    file named by an absolute path). Outputs travel through a DVC remote to other machines:
    an absolute path of the first clone would point the others at a store they lack."""
    if not uri.startswith("sqlite:///"):
        return uri
    root = find_project_root(project_root)
    path = Path(uri.removeprefix("sqlite:///"))
    path = (path if path.is_absolute() else root / path).resolve()
    return None if path.is_relative_to(root) else uri


def store_record(uri: str, project_root: Path) -> dict[str, str]:
    """`{"tracking_uri": uri}` for an output file, or {} when the store is the project's own."""
    portable = portable_uri(uri, project_root)
    return {} if portable is None else {"tracking_uri": portable}


@contextmanager
def use_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri` for one block.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which resolve_tracking_uri
    reads first: left behind, it would send the next stage called in the same process
    (tests, tuning) to this store instead of its own project's.
    """
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@contextmanager
def start_run(cfg: MlflowParams, project_root: Path, *, run_name: str | None = None,
              tags: dict[str, str] | None = None, run_id: str | None = None,
              parent_run_id: str | None = None, system_metrics: bool = False) -> Iterator[RunLogger]:
    """Start a new run (or reopen `run_id`), nested under `parent_run_id` if given (the
    parent need not be active in this process); an exception marks it FAILED and re-raises.
    `system_metrics`: a new run samples CPU, memory, disk and network (psutil) every
    $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10 by default) as `system/*` metrics."""
    uri = reachable_tracking_uri(cfg, project_root)
    with use_store(uri), _active_run(cfg, project_root, uri, run_name, run_id, parent_run_id,
                                     system_metrics) as handle:
        if tags:
            handle.set_tags(tags)
        yield handle


@contextmanager
def _active_run(cfg: MlflowParams, project_root: Path, uri: str, run_name: str | None,
                run_id: str | None, parent_run_id: str | None = None,
                system_metrics: bool = False) -> Iterator[RunLogger]:
    import mlflow

    if run_id is None:
        experiment_id = _ensure_experiment(cfg.experiment_name, uri, project_root)
        close_orphaned_runs(uri, experiment_id)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id,
                               nested=parent_run_id is not None, log_system_metrics=system_metrics)
    else:
        _require_run(run_id, uri)
        close_orphaned_runs(uri, _experiment_of(uri, run_id))
        run = mlflow.start_run(run_id=run_id)
    process = this_process()
    mlflow.set_tags({PROCESS_TAGS[0]: process["host"], PROCESS_TAGS[1]: str(process["pid"]),
                     PROCESS_TAGS[2]: str(process["started"] or "")})
    try:
        yield RunLogger(run.info.run_id, uri)
    except BaseException:
        mlflow.end_run(status="KILLED" if _interrupted() else "FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


# Which process has a run open: a later start on the same host closes the runs of dead ones.
PROCESS_TAGS = ("flexunet.host", "flexunet.pid", "flexunet.pid_started")


def _experiment_of(uri: str, run_id: str) -> str:
    return _client(uri).get_run(run_id).info.experiment_id


def close_orphaned_runs(uri: str, experiment_id: str) -> list[str]:
    """Mark FAILED, with the reason, the RUNNING runs of the experiment whose process (on
    this host) has ended: a SIGKILL or the OOM killer leaves no chance to close them.
    Returns their ids. Runs of other hosts are left alone (their liveness is unknowable)."""
    host = socket.gethostname()
    runs = _client(uri).search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAGS[0]}` = '{host}'")
    closed = []
    for run in runs:
        tags = run.data.tags
        process = {"host": host, "pid": tags.get(PROCESS_TAGS[1]), "started": tags.get(PROCESS_TAGS[2]) or None}
        if is_alive(process):
            continue
        stage = tags.get("flexunet.stage", "a stage")
        reason = (f"process {process['pid']} on {host} ({stage}) ended while the run was open "
                  f"(killed or crashed); closed when the next run started")
        mark_failed(uri, run.info.run_id, reason)
        log.warning("MLflow run %s: %s", run.info.run_id, reason)
        closed.append(run.info.run_id)
    return closed


def _require_run(run_id: str, uri: str) -> None:
    """Reopening a run the store lacks fails in one line: DVC's run-cache or `dvc pull` can
    restore models/train_run.json next to another store."""
    if not run_exists(uri, run_id):
        raise FlexUNetError(
            f"MLflow run {run_id} is missing or deleted in the tracking store {uri}; if "
            f"models/train_run.json names it, set MLFLOW_TRACKING_URI (or mlflow.tracking_uri) to the "
            f"store it was trained in, or retrain with `dvc repro -f train`")


def _interrupted() -> bool:
    import sys

    return isinstance(sys.exc_info()[1], KeyboardInterrupt)


def standard_tags(project_root: Path, fingerprint: str | None, stage: str) -> dict[str, str]:
    tags = {"flexunet.stage": stage, "mlflow.source.git.commit": git_commit(Path.cwd()),
            "dataset.fingerprint": fingerprint, "dvc.exp_name": os.environ.get("DVC_EXP_NAME")}
    return {k: v for k, v in tags.items() if v}


def run_status(tracking_uri: str, run_id: str) -> str:
    return _client(tracking_uri).get_run(run_id).info.status


def run_exists(tracking_uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def mark_failed(tracking_uri: str, run_id: str, reason: str) -> None:
    """Close a run its dead process left RUNNING: FAILED, with the reason as a tag."""
    client = _client(tracking_uri)
    client.set_tag(run_id, "fail_reason", reason[:5000])
    client.set_terminated(run_id, status="FAILED")


def set_run_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Tag a run this process does not hold open (its status is left alone)."""
    client = _client(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def run_tags(tracking_uri: str, run_id: str) -> dict[str, str]:
    return dict(_client(tracking_uri).get_run(run_id).data.tags)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class VersionInfo:
    """One registered model version, as plain data (stages never handle MLflow entities)."""

    name: str
    version: str
    tags: dict[str, str]
    aliases: list[str]
    description: str = ""


@dataclass
class Registry:
    """Thin handle on the MLflow Model Registry of one tracking store."""

    tracking_uri: str

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(require_tracking(self.tracking_uri), registry_uri=self.tracking_uri)

    @staticmethod
    def _info(mv) -> VersionInfo:
        return VersionInfo(mv.name, str(mv.version), dict(mv.tags or {}), sorted(getattr(mv, "aliases", []) or []),
                           mv.description or "")

    def versions(self, name: str) -> list[VersionInfo]:
        query = f"name = '{name}'" if "'" not in name else f'name = "{name}"'
        found = self._client().search_model_versions(query)
        # search results may omit aliases: fetch each version for the full record
        return sorted((self.version(name, mv.version) for mv in found), key=lambda v: int(v.version))

    def version(self, name: str, version: str) -> VersionInfo:
        return self._info(self._client().get_model_version(name, str(version)))

    def find_version(self, name: str, tag: str, value: str) -> VersionInfo | None:
        """The newest version whose `tag` equals `value` (tags are few: filtered here, not in SQL)."""
        matches = [v for v in self.versions(name) if v.tags.get(tag) == value]
        return matches[-1] if matches else None

    def by_alias(self, name: str, alias: str) -> VersionInfo | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._info(self._client().get_model_version_by_alias(name, alias))
        except MlflowException:  # no such model or alias
            return None

    def create_version(self, name: str, model_uri: str, tags: dict[str, str], description: str = "") -> VersionInfo:
        """A new version; `description` (Markdown) is what the UI shows on the version's page."""
        import mlflow

        with use_store(self.tracking_uri):
            mv = mlflow.register_model(model_uri, name, tags={k: v for k, v in tags.items() if v is not None})
        if description:
            self._client().update_model_version(name, str(mv.version), description=description)
        return self.version(name, mv.version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._client().set_registered_model_alias(name, alias, str(version))
