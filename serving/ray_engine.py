"""Batch prediction on Ray Data: `flexunet predict --engine ray` (the [ray] extra).

The one module that imports ray. RayEngine is an engine for serving.batch.run_batch: the
driver resolves the inputs, keeps predictions.csv and the summary exactly as for the local
engine; the images go through Ray Data's streaming `map_batches`, one image per task
(batch_size=1), on a fixed pool of `workers` actors. Each actor holds one TiledPredictor
(one onnxruntime session) built from the model's bytes and the run's TilingSettings, and
calls serving.batch.predict_image, the function the local engine calls, so the masks are
byte-identical, the rows the same, resume and error rows behave alike.

    engine = RayEngine("models/model.onnx", TilingSettings(overlap=0.5), workers=2)
    run_batch(engine, resolve_inputs("scans/"), Path("out"))

- address: None starts a local Ray instance (or joins RAY_ADDRESS's cluster); "auto" joins
  the cluster on this machine; "ray://host:10001" a remote one through Ray Client. On a
  cluster the serving and common packages are shipped to the workers (runtime_env
  py_modules), and the inputs and output folder must be on a filesystem every node sees.
- The model is read once by the driver (an MLflow URI is downloaded there) and its bytes
  go to the actors through Ray's object store: the nodes need no copy of it.
- CPUs: each actor reserves `threads` CPUs when set, else the cluster's CPUs / workers
  (at least 1), and runs onnxruntime with that many intra-op threads, so N workers do
  not oversubscribe the cores.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data

import common
import serving
from common.errors import UserError
from serving.batch import RESUME_KEYS, ImageOptions, Job, predict_image
from serving.load import local_model
from serving.predictor import TiledPredictor
from serving.settings import TilingSettings


class RayEngine:
    """Ray Data actors predicting one image per task (see the module doc)."""

    def __init__(self, model: str | Path, settings: TilingSettings | None = None, *, workers: int = 1,
                 address: str | None = None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise UserError(f"--workers {workers!r}: must be a positive integer (Ray actors, one model each)")
        with local_model(model) as path:   # the model's checks run here, once, before any actor starts
            predictor = TiledPredictor.from_onnx(path, settings)
            self.model_bytes = path.read_bytes()
        self.card, self.settings, self.source = predictor.card, predictor.settings, str(model)
        self.workers, self.address = workers, address

    def rows(self, jobs: list[Job], options: ImageOptions) -> Iterator[dict[str, Any]]:
        if not jobs:
            return
        connect(self.address)
        cpus = self.settings.threads or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.workers)
        items = [{"file": str(path), "previous": json.dumps({k: (prev or {}).get(k, "") for k in RESUME_KEYS})}
                 for path, prev in jobs]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(   # a block, a task per image
            _ImageWorker, batch_size=1, batch_format="numpy", num_cpus=cpus,
            compute=ray.data.ActorPoolStrategy(size=min(self.workers, len(items))),   # no idle actors
            fn_constructor_kwargs={"model": self.model_bytes, "settings": self.settings.replace(threads=cpus),
                                   "options": options, "source": self.source})
        for item in ds.iter_rows():
            yield json.loads(item["row"])


class _ImageWorker:
    """One actor: one TiledPredictor; each call predicts the batch's images (one per task)."""

    def __init__(self, model: bytes, settings: TilingSettings, options: ImageOptions, source: str):
        with tempfile.TemporaryDirectory(prefix="flexunet-model-") as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(model)
            self.predictor = TiledPredictor.from_onnx(path, settings)   # the session keeps it in memory
        self.predictor.source = source
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [predict_image(self.predictor, Path(str(file)), self.options, json.loads(str(previous)))
                for file, previous in zip(batch["file"], batch["previous"])]
        return {"row": np.array([json.dumps(row) for row in rows], dtype=object)}


def connect(address: str | None = None) -> None:
    """Join Ray unless this process already has: a new local instance when address is None
    and RAY_ADDRESS unset; otherwise that cluster, with serving/ and common/ shipped."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)   # its per-run INFO lines; our tqdm shows progress
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)   # "progress bars disabled"
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False)
        return
    modules = [str(Path(p.__file__).parent) for p in (serving, common)]
    ray.init(address=address, runtime_env={"py_modules": modules})
