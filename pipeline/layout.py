"""Where each stage reads and writes, derived from one project root.

dvc.yaml lists the same paths; tests build a Layout on a temp dir.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import DataError
from pipeline.config.schema import Params

SPLITS = ("train", "valid", "test")
# Slices of test scans that the split leaves out (kidney-free ones beyond
# kidney_free_fraction): not evaluated for Dice, but predicted for TKV, so a false
# kidney on them still counts against the scan's volume.
TKV_EXTRA = "tkv_extra"


class _Under:
    """A fixed path under the project root, read as an attribute: layout.model_file."""

    def __init__(self, relative: str, doc: str = ""):
        self.relative, self.__doc__ = Path(relative), doc or relative

    def __get__(self, layout: Layout | None, owner: type) -> Any:
        return self if layout is None else layout.root / self.relative


@dataclass(frozen=True)
class Layout:
    root: Path
    params: Params

    models = _Under("models")
    model_file = _Under("models/model.keras")
    onnx_file = _Under("models/model.onnx")
    registered_file = _Under("models/registered.json", "What the register stage did: name, version, aliases.")
    run_file = _Under("models/train_run.json", "Hand-off from train to later stages: the MLflow run id.")
    tuned_params_file = _Under("tune/best_params.yaml", "The tune stage's best values (train.use_tuned_params).")
    train_overrides_file = _Under("tune/train_overrides.yaml", "What train depends on in dvc.yaml: the best "
                                  "values if train.use_tuned_params, else empty (new trials retrain only then).")
    metrics = _Under("metrics")
    # The metrics files a later stage reads (the others are written for people and DVC only).
    train_metrics_file = _Under("metrics/train.json", "Training summary: epochs run, time guard; evaluate's warnings read it.")
    eval_metrics_file = _Under("metrics/eval.json", "Test-split metrics and warnings; register tags versions with them.")
    real_sample_file = _Under("metrics/real_sample.json", "Real-sample scores; register's champion rule reads them.")
    real_sample_predict_file = _Under("metrics/real_sample_predict.json", "The real sample through `flexunet "
                                      "predict` (evaluate_tiled); register's champion rule reads glomeruli's.")
    plots = _Under("plots")
    dvclive = _Under("dvclive")
    predictions = _Under("outputs/mini_test_predictions")
    tiled_predictions = _Under("outputs/tiled_predictions")

    @property
    def data_dir(self) -> Path:
        return self.root / self.params.dataset.path

    @property
    def manifest(self) -> Path:
        return self.data_dir / "manifest.json"

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest.is_file():
            raise DataError(f"{self.manifest}: not found; run the prepare stage first (dvc repro prepare)")
        return json.loads(self.manifest.read_text(encoding="utf-8"))

    def read_run(self) -> dict[str, Any]:
        if not self.run_file.is_file():
            raise DataError(f"{self.run_file}: not found; run the train stage first (dvc repro train)")
        return json.loads(self.run_file.read_text(encoding="utf-8"))
