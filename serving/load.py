"""Where a model comes from: a .onnx file, a folder holding one, or an MLflow model URI.

    predictor = load_predictor("models:/flexunet-kidney-t2w@champion")   # the [mlflow] extra
    predictor = load_predictor("models/model.onnx", overlap=0.5)

MLflow URIs are downloaded through serving.pyfunc (the one serving module that imports
mlflow); without the [mlflow] extra they are a one-line error naming it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.reachable import require_reachable
from serving.predictor import TiledPredictor
from serving.settings import TilingSettings

URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "file:/")


def load_predictor(model: str | Path, settings: TilingSettings | None = None, **changes: Any) -> TiledPredictor:
    """A .onnx file, a folder holding one (rglob), or an MLflow URI (`models:/name@alias`,
    `models:/name/3`, `runs:/<run id>/<path>`): its artifacts are downloaded to a temp
    folder and the single *.onnx found there is loaded. settings, changes: as
    TiledPredictor.from_onnx."""
    settings = (settings or TilingSettings()).replace(**changes)  # a bad value fails before any download
    with local_model(model) as path:
        predictor = TiledPredictor.from_onnx(path, settings)
    if str(model).startswith(URI_SCHEMES):
        predictor.source = str(model)  # the session holds the model in memory: the temp copy can go
    return predictor


@contextmanager
def local_model(model: str | Path) -> Iterator[Path]:
    """The .onnx file `model` names (see load_predictor), on local disk while the context
    lasts: an MLflow URI's download is deleted on exit."""
    text = str(model)
    if text.startswith(URI_SCHEMES):
        # Before mlflow loads (seconds): a dead tracking server is one line, not minutes of retries.
        require_reachable(os.environ.get("MLFLOW_TRACKING_URI", ""), f"{text} is downloaded from there: start "
                          f"the server, or set MLFLOW_TRACKING_URI to a reachable one")
        download = _mlflow_download(text)
        with tempfile.TemporaryDirectory(prefix="flexunet-model-") as tmp:
            yield _find_onnx(download(text, Path(tmp)), text)
        return
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"{path}: model not found; pass a .onnx file, a folder holding one, "
                        f"or an MLflow URI such as models:/<name>@champion")
    yield _find_onnx(path, text) if path.is_dir() else path


def _mlflow_download(uri: str):
    """serving.pyfunc.download (the one serving module that imports mlflow), or a one-line
    UserError when the [mlflow] extra is not installed."""
    try:
        from serving.pyfunc import download
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "mlflow":
            raise
        raise UserError(f"{uri}: MLflow URIs need the mlflow extra: pip install 'flexunet[mlflow]'; "
                        f"or pass the .onnx file itself") from None
    return download


def _find_onnx(folder: Path, what: str) -> Path:
    """The single *.onnx under `folder`; with several, model.onnx (fp32) wins."""
    found = sorted(p for p in folder.rglob("*.onnx") if p.is_file())
    if len(found) > 1:
        found = [p for p in found if p.name == "model.onnx"] or found
    if len(found) != 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found) or "none"
        raise UserError(f"{what}: expected exactly one .onnx model in it, found {names}; "
                        f"pass the .onnx file itself")
    return found[0]
