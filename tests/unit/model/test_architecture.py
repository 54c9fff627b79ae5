"""pipeline.model.architecture: the per-level kernel and dilation schedules."""

from __future__ import annotations

from pipeline.model.architecture import dilation_schedule, kernel_schedule


def test_kernel_and_dilation_schedules():
    assert kernel_schedule((11, 11), 8) == [(11, 11), (9, 9), (7, 7), (5, 5), (3, 3), (3, 3), (3, 3), (3, 3)]
    assert kernel_schedule((7, 5), 3) == [(7, 5), (5, 3), (3, 3)]
    assert dilation_schedule((3, 3), 5) == [(3, 3), (2, 2), (1, 1), (1, 1), (1, 1)]
