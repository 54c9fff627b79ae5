"""The volume rules and kidney volumes on hand-made RAS masks: sides, one kidney per side,
small components, holes, the diagnosis."""

from __future__ import annotations

import numpy as np
import pytest

from serving.kidneys import BODY_LEVEL, LEFT, RIGHT, apply_rules, body_midline, components, diagnose, kidney_volumes


def _mask() -> np.ndarray:
    """(X, Y, Z) = (20, 4, 10): a right kidney (high x) of 3x4x6, a left one of 3x4x5, a
    1-voxel speck on the right and a 2x2x2 blob on the left, apart from both."""
    m = np.zeros((20, 4, 10), bool)
    m[14:17, :, 2:8] = True      # right: 72 voxels
    m[3:6, :, 2:7] = True        # left: 60
    m[18, 0, 9] = True           # right speck: 1
    m[0:2, 0:2, 8:10] = True     # left blob: 8
    return m


def test_components_and_their_sides_follow_ras_x():
    _, _, sizes, sides = components(_mask())
    assert sorted(zip(sizes.tolist(), sides.tolist())) == [(1, RIGHT), (8, LEFT), (60, LEFT), (72, RIGHT)]
    volumes = kidney_volumes(_mask(), 0.5)
    assert (volumes.tkv_ml, volumes.right_ml, volumes.left_ml) == pytest.approx((141 * 0.5, 73 * 0.5, 68 * 0.5))


def test_the_sides_split_at_the_bodys_midline_not_the_field_of_views_middle():
    """A field of view off-centre towards the patient's left (the body in x 8..19 of 20):
    both kidneys lie right of the array's middle (9.5), but on either side of the body's."""
    m = np.zeros((20, 4, 10), bool)
    m[16:19, :, 2:8] = True      # the right kidney
    m[10:13, :, 2:7] = True      # the left kidney, x 10-12: past the array's middle
    image = np.zeros(m.shape, np.uint8)
    image[8:20] = BODY_LEVEL + 50
    midline = body_midline(image)
    assert midline == pytest.approx(13.5)
    assert kidney_volumes(m, 1.0, midline).left_ml == 60 and kidney_volumes(m, 1.0).left_ml == 0
    assert apply_rules(m, 1.0, plane_axis=1, min_component_ml=0.0, midline=midline).sum() == 72 + 60
    assert apply_rules(m, 1.0, plane_axis=1, min_component_ml=0.0).sum() == 72    # one "side": one kept
    assert body_midline(np.zeros(m.shape, np.uint8)) is None and body_midline(None) is None
    assert kidney_volumes(np.zeros(m.shape, bool), 1.0).tkv_ml == 0


def test_rules_keep_the_largest_component_per_side_above_the_minimum():
    kept = apply_rules(_mask(), 0.5, plane_axis=1, min_component_ml=0.0)
    assert kept.sum() == 72 + 60 and not kept[18, 0, 9] and not kept[0, 0, 8]
    # a minimum above the left kidney's 30 ml leaves the right one only
    only_right = apply_rules(_mask(), 0.5, plane_axis=1, min_component_ml=31.0)
    assert only_right.sum() == 72 and only_right[15, 0, 3]
    assert not apply_rules(_mask(), 0.5, plane_axis=1, min_component_ml=100.0).any()


def test_holes_are_filled_in_the_slicing_plane_only():
    tube = np.zeros((12, 5, 12), bool)
    tube[7:12, :, 2:9] = True
    tube[9, :, 5] = False         # a channel through every coronal slice: a hole in each
    kept = apply_rules(tube, 1.0, plane_axis=1, min_component_ml=0.0)
    assert kept[9, :, 5].all()
    along_x = apply_rules(tube, 1.0, plane_axis=0, min_component_ml=0.0)   # sagittal slices: the channel is open
    assert not along_x[9, 2, 5]


def test_diagnosis_is_the_largest_summed_probability_and_its_share():
    assert diagnose(np.array([30.0, 10.0])) == (1, pytest.approx(0.75))
    assert diagnose(np.array([1.0, 3.0])) == (2, pytest.approx(0.75))
    assert diagnose(np.zeros(2)) == (None, None)
