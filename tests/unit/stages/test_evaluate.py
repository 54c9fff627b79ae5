"""The evaluate stage says when a result is poor: training cut short, or Dice under the floor."""

from __future__ import annotations

from pipeline.stages.evaluate import quality_warnings


def test_quality_warnings_name_each_reason():
    good = {"mean_foreground_dice": 0.93}
    full = {"epochs_run": 30, "epochs_configured": 30, "time_guard_fired": False}
    assert quality_warnings(good, full, 0.85) == []
    assert quality_warnings(good, None, 0.85) == []   # no training summary (an imported model)
    cut = {"epochs_run": 4, "epochs_configured": 30, "time_guard_fired": True}
    assert quality_warnings(good, cut, 0.85) == ["training ran 4 of 30 epochs (train.max_minutes fired)"]
    early = {**cut, "time_guard_fired": False}
    assert quality_warnings(good, early, 0.85) == ["training ran 4 of 30 epochs (early stopping (train.patience))"]
    last = {"epochs_run": 30, "epochs_configured": 30, "time_guard_fired": True}
    assert quality_warnings(good, last, 0.85) == ["train.max_minutes fired"]
    poor = quality_warnings({"mean_foreground_dice": 0.389}, cut, 0.85)
    assert poor[1] == "test mean foreground Dice 0.3890 is below evaluate.min_dice 0.85" and len(poor) == 2
