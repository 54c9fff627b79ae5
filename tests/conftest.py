"""Shared fixtures: tiny params (32 px, 3 levels) so the whole suite runs on 2 CPU cores.

tests/unit/ mirrors the packages (one file per module); tests/integration/ runs stages,
subprocesses and real trainings, and is marked `slow`.

The suite runs on one pytest-xdist worker per core, a whole module per worker
(pyproject's addopts). The slowest modules are handed out first, so the others fill in
around them. Expensive fixtures are session-scoped.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

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

REPO = Path(__file__).resolve().parents[1]


# xdist gives out modules in collection order, one per worker and then a second each
# before any finishes: on 2 workers the longest (end to end) pairs with a short one and
# the next two long ones share the other worker.
_SLOW_FIRST = ("test_pipeline_e2e", "test_tune", "test_export", "test_train_resume", "test_prepare_sources",
               "test_register")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:   # tests/integration/: stages, subprocesses, real training; `-m "not slow"` skips them
        if "integration" in item.nodeid.split("/"):
            item.add_marker(pytest.mark.slow)

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
    raw["evaluate"].update(num_panels=2, min_dice=0.0)
    raw["mlflow"]["experiment_name"] = "tests"
    if name == "glomeruli":
        raw["dataset"]["name"] = "glomeruli"
        raw["mask"] = {"rgb_map": {"(0,0,0)": 0, "(255,0,0)": 1}, "class_names": ["background", "glomerulus"]}
        raw["model"]["num_classes"] = 2
    return raw


@pytest.fixture
def raw_params() -> dict[str, Any]:
    return copy.deepcopy(tiny_dict())


@pytest.fixture
def tiny_params() -> Params:
    return params_from_dict(tiny_dict())


@pytest.fixture
def layout(tmp_path: Path, tiny_params: Params) -> Layout:
    return Layout(root=tmp_path, params=tiny_params)
