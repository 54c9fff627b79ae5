"""The evaluate stage says when a result is poor: training cut short, or a Dice under its floor."""

from __future__ import annotations

from pipeline.config.schema import EvaluateParams
from pipeline.stages.evaluate import quality_warnings

FLOORS = EvaluateParams(min_dice=0.85, min_real_dice=0.6)


def test_quality_warnings_name_each_reason():
    good = {"mean_foreground_dice": 0.93}
    full = {"epochs_run": 30, "epochs_configured": 30, "time_guard_fired": False}
    assert quality_warnings(good, full, FLOORS) == []
    assert quality_warnings(good, None, FLOORS) == []   # no training summary (an imported model)
    cut = {"epochs_run": 4, "epochs_configured": 30, "time_guard_fired": True}
    assert quality_warnings(good, cut, FLOORS) == ["training ran 4 of 30 epochs (train.max_minutes fired)"]
    early = {**cut, "time_guard_fired": False}
    assert quality_warnings(good, early, FLOORS) == ["training ran 4 of 30 epochs (early stopping (train.patience))"]
    last = {"epochs_run": 30, "epochs_configured": 30, "time_guard_fired": True}
    assert quality_warnings(good, last, FLOORS) == ["train.max_minutes fired"]
    poor = quality_warnings({"mean_foreground_dice": 0.389}, cut, FLOORS)
    assert poor[1] == "test mean foreground Dice 0.3890 is below evaluate.min_dice 0.85" and len(poor) == 2


def test_the_real_sample_has_its_own_floor():
    good = {"mean_foreground_dice": 0.93}
    assert quality_warnings(good, None, FLOORS, real=0.6) == []      # at the floor is not under it
    assert quality_warnings(good, None, FLOORS, real=0.17) == [
        "real-sample kidney Dice 0.1700 is below evaluate.min_real_dice 0.6"]
    both = quality_warnings({"mean_foreground_dice": 0.5}, None, FLOORS, real=0.5)
    assert both == ["test mean foreground Dice 0.5000 is below evaluate.min_dice 0.85 "
                    "(the real sample, not this floor, decides the champion)",
                    "real-sample kidney Dice 0.5000 is below evaluate.min_real_dice 0.6"]
