"""The training loop's fixed choices: the learning-rate schedule and the precision (pipeline/model/fit.py)."""

from __future__ import annotations

import pytest

from pipeline.config.schema import TrainParams
from pipeline.model.fit import learning_rate, resolve_precision


def test_cosine_schedule_decays_to_the_floor():
    t = TrainParams(lr_schedule="cosine", learning_rate_reducer=False, learning_rate=1e-3, epochs=10,
                    min_lr_fraction=0.02, warmup_epochs=0)
    schedule = learning_rate(t, steps_per_epoch=5)
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(25)) == pytest.approx(0.5 * (1e-3 + 2e-5), rel=1e-4)
    assert float(schedule(50)) == pytest.approx(2e-5, rel=1e-4)
    assert learning_rate(TrainParams(learning_rate=3e-4, lr_schedule="constant"), 5) == pytest.approx(3e-4)


def test_precision_auto_follows_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: fpu avx2 avx512f avx512_bf16\n")
    assert resolve_precision("auto", cpuinfo) == "mixed_bfloat16"
    cpuinfo.write_text("flags\t: fpu avx2 avx512f\n")
    assert resolve_precision("auto", cpuinfo) == "float32"
    assert resolve_precision("auto", tmp_path / "missing") == "float32"
    assert resolve_precision("mixed_bfloat16", cpuinfo) == "mixed_bfloat16"
