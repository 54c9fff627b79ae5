"""Shared fixtures: tiny params (32 px, 3 levels) so the whole suite runs on 2 CPU cores.

tests/unit/ mirrors the packages (one file per module); tests/integration/ runs stages,
real trainings, SIGKILL drills and a whole `dvc repro`, and is marked `slow`.

The suite runs on one pytest-xdist worker per core, a whole module per worker
(pyproject's addopts). The slowest modules are handed out first, so the others fill in
around them. Expensive fixtures are session-scoped.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow reads this once, at import: the kernels train.onednn (false) asks for, as the
# CLI's subprocesses get them, so in-process and subprocess trainings compute alike.
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests never write to a developer's store

from pipeline.layout import Layout  # noqa: E402
from pipeline.config.schema import Params  # noqa: E402
from pipeline.config.load import params_from_dict  # noqa: E402

if TYPE_CHECKING:
    import keras

REPO = Path(__file__).resolve().parents[1]


# xdist gives out modules in collection order, one per worker and then a second each
# before any finishes: on 2 workers the longest (end to end) pairs with a short one and
# the next two long ones share the other worker.
_SLOW_FIRST = ("test_pipeline_e2e", "test_tune", "test_servers", "test_export", "test_train_resume", "test_prepare_sources",
               "test_register")


_SERVER_MODULES = ("test_servers.py", "test_ray_engine.py")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:   # tests/integration/: stages, real trainings, drills; `-m "not slow"` skips them
        if "integration" in item.nodeid.split("/"):
            item.add_marker(pytest.mark.slow)
        if any(name in item.nodeid for name in _SERVER_MODULES):   # `-m "not servers"` skips them
            item.add_marker(pytest.mark.servers)

    def rank(item) -> int:
        module = item.module.__name__.rsplit(".", 1)[-1]
        return _SLOW_FIRST.index(module) if module in _SLOW_FIRST else len(_SLOW_FIRST)

    items.sort(key=rank)   # stable: the tests of a module keep their order


def tiny_dict(name: str = "kidney-t2w") -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["dataset"].update(image_size=32, num_subjects=8, slices_per_scan=6, num_large_images=6, num_mini_test=2)
    # No BatchNorm: it doubles the graph Keras traces for every fit, which is most of a tiny
    # training's time; the tests that need it (resume, end to end, export) switch it on.
    raw["model"].update(image_width=32, image_height=32, base_filters=4, base_kernels=[5, 5], num_layers=3,
                        normalization=False)
    raw["train"].update(epochs=2, batch_size=4, num_infer_images=2, max_minutes=None, use_tuned_params=False,
                        warmup_epochs=0)
    # The repository's real sample by its absolute path: a test's project root is a temp dir.
    raw["evaluate"].update(num_panels=2, min_dice=0.0, min_real_dice=0.0, real_sample=str(REPO / raw["evaluate"]["real_sample"]))
    raw["mlflow"]["experiment_name"] = "tests"
    if name == "glomeruli":
        raw["dataset"]["name"] = "glomeruli"
        raw["mask"] = {"rgb_map": {"(0,0,0)": 0, "(255,0,0)": 1}, "class_names": ["background", "glomerulus"]}
        raw["model"]["num_classes"] = 2
        # 8 um/px: a 64 px image is 512 um, a real 1024 px tile's field, with glomeruli of 12-25 px
        raw["dataset"]["mpp"] = 8.0
        # as the glomeruli presets: the real PAS tiles at 0.5 um/px
        raw["evaluate"].update(object_metrics="detection", real_sample=str(REPO / "data/real-sample/glomeruli-pas"),
                               real_sample_spacing=0.5)
    return raw


def class_probs(classes: np.ndarray, confidence: np.ndarray | float = 0.8, k: int = 3) -> np.ndarray:
    """Probabilities whose argmax is `classes`, the winner holding `confidence`."""
    conf = np.broadcast_to(np.asarray(confidence, dtype=np.float32), classes.shape)
    p = np.repeat(((1 - conf) / (k - 1))[..., None], k, axis=-1).astype(np.float32)
    np.put_along_axis(p, classes[..., None].astype(np.int64), conf[..., None], axis=-1)
    return p


def randomised(model: keras.Model, seed: int) -> keras.Model:
    """Random weights of He scale (so logits stay moderate and a small error shows in the
    probabilities), BatchNorm statistics included (variance kept positive)."""
    rng = np.random.default_rng(seed)
    weights = []
    for w, v in zip(model.get_weights(), model.weights):
        fan_in = int(np.prod(w.shape[:-1])) if w.ndim > 1 else 1
        weights.append(rng.uniform(0.5, 1.5, w.shape) if "variance" in v.path
                       else rng.normal(0, (2 / fan_in) ** 0.5 if w.ndim > 1 else 0.1, w.shape))
    model.set_weights([w.astype(np.float32) for w in weights])
    return model


@pytest.fixture
def raw_params() -> dict[str, Any]:
    return copy.deepcopy(tiny_dict())


@pytest.fixture
def tiny_params() -> Params:
    return params_from_dict(tiny_dict())


@pytest.fixture
def layout(tmp_path: Path, tiny_params: Params) -> Layout:
    return Layout(root=tmp_path, params=tiny_params)
