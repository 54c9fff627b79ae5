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


@dataclass(frozen=True)
class Layout:
    root: Path
    params: Params

    @property
    def data_dir(self) -> Path:
        return self.root / self.params.dataset.path

    @property
    def manifest(self) -> Path:
        return self.data_dir / "manifest.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def model_file(self) -> Path:
        return self.models / "model.keras"

    @property
    def onnx_file(self) -> Path:
        return self.models / "model.onnx"

    @property
    def registered_file(self) -> Path:
        """What the register stage did: model name, version, aliases (not run-cached)."""
        return self.models / "registered.json"

    @property
    def run_file(self) -> Path:
        """Hand-off from train to later stages: MLflow run id and tracking URI."""
        return self.models / "train_run.json"

    @property
    def tuned_params_file(self) -> Path:
        """The tune stage's best values; train uses them if train.use_tuned_params."""
        return self.root / "tune" / "best_params.yaml"

    @property
    def train_overrides_file(self) -> Path:
        """What train depends on in dvc.yaml: the best values if train.use_tuned_params,
        else empty -- so new trials retrain only when training uses them."""
        return self.root / "tune" / "train_overrides.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def dvclive(self) -> Path:
        return self.root / "dvclive"

    @property
    def predictions(self) -> Path:
        return self.root / "outputs" / "mini_test_predictions"

    @property
    def tiled_predictions(self) -> Path:
        return self.root / "outputs" / "tiled_predictions"

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest.is_file():
            raise DataError(f"{self.manifest}: not found; run the prepare stage first (dvc repro prepare)")
        return json.loads(self.manifest.read_text(encoding="utf-8"))

    def read_run(self) -> dict[str, Any]:
        if not self.run_file.is_file():
            raise DataError(f"{self.run_file}: not found; run the train stage first (dvc repro train)")
        return json.loads(self.run_file.read_text(encoding="utf-8"))
