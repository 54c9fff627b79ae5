"""An edit of params.yaml that the study's values hide is said, in one line, by train."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from pipeline.cli import _layout
from tests.conftest import REPO

BEST = {"params": {"base_filters": 6, "base_kernels": 3, "learning_rate": 0.0023}}


def _project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "best_params.yaml").write_text(yaml.safe_dump(BEST))
    return tmp_path / "params.yaml"


def _args(params: Path, *sets: str) -> argparse.Namespace:
    return argparse.Namespace(params=str(params), set=list(sets), root=None)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_override_the_tuned_values_hide_is_said_in_one_line(tmp_path, caplog):
    params = _project(tmp_path)
    # the README's example: the study's 0.0023 wins over it
    layout = _layout(_args(params, "train.learning_rate=3e-3", "model.base_filters=16"), tracking=False,
                     say_hidden=True)
    assert layout.params.train.learning_rate == 0.0023 and layout.params.model.base_filters == 6
    [line] = _warnings(caplog)
    assert line.startswith("train.use_tuned_params: the study's values (best_params.yaml) replace params.yaml's: ")
    assert "model.base_filters 16 -> 6" in line and "train.learning_rate 0.003 -> 0.0023" in line
    assert "base_kernels" not in line   # 3 in both: nothing hidden
    assert line.endswith("set train.use_tuned_params: false to train with params.yaml's")


def test_nothing_is_said_when_nothing_is_hidden_or_not_asked(tmp_path, caplog):
    params = _project(tmp_path)
    _layout(_args(params, "train.learning_rate=0.0023", "model.base_filters=6"), tracking=False, say_hidden=True)
    _layout(_args(params, "train.learning_rate=3e-3"), tracking=False)   # the other stages stay quiet
    layout = _layout(_args(params, "train.learning_rate=3e-3", "train.use_tuned_params=false"), tracking=False,
                     say_hidden=True)
    assert layout.params.train.learning_rate == 0.003
    assert _warnings(caplog) == []
