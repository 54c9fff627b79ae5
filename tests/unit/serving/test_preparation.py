"""The one preparation: exact streamed percentiles, pad-and-resample and its way back, the
display geometry in any stored orientation, the oblique and spacing warnings."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from common.errors import UserError
from serving.preparation import (
    Placement, ScanGeometry, check_spacing, display_geometry, in_memory, labels_to_model_size, percentiles,
    prepare_scan, to_model_size,
)


@pytest.mark.parametrize("kind", ["int", "float", "ties", "zero background"])
def test_streamed_percentiles_are_numpys_linear_ones(kind):
    rng = np.random.default_rng(3)
    volume = {"int": rng.integers(-300, 3000, (23, 17, 11)).astype(np.float64),
              "float": rng.standard_normal((23, 17, 11)) * 1e3,
              "ties": np.repeat(rng.integers(0, 4, (23, 17, 1)), 11, axis=2).astype(np.float64),
              "zero background": np.where(rng.random((23, 17, 11)) < 0.6, 0.0, rng.random((23, 17, 11)) * 900)}[kind]
    for q in ((0.5, 99.5), (0.0, 100.0), (2.0, 98.0)):
        assert percentiles(in_memory(volume, slab=3), q, "v") == tuple(np.percentile(volume, q))   # to the bit


@pytest.mark.parametrize(("values", "message"), [
    (np.full((4, 4, 4), 7.0), "v: the volume is constant (7); not an image"),
    (np.where(np.arange(64).reshape(4, 4, 4) == 5, np.nan, 1.0), "v: 1 voxels are NaN or infinite"),
    (np.where(np.arange(1000).reshape(10, 10, 10) < 999, 1.0, 9.0), "v: intensity percentiles (0.5, 99.5) are equal"),
])
def test_bad_volumes_are_one_line(values, message):
    with pytest.raises(UserError, match=re.escape(message)):
        percentiles(in_memory(values), (0.5, 99.5), "v")


def test_pad_and_resample_centres_the_slice_and_restores_probabilities_onto_it():
    image = np.zeros((30, 20), np.uint8)
    image[:, :] = 200
    small, place = to_model_size(image, 15)
    assert small.shape == (15, 15) and (place.side, place.top, place.left) == (30, 0, 5)
    assert small[:, 0].max() < 100 < small[:, 7].min()          # padding (0) left and right, the slice between
    probs = np.zeros((15, 15, 2), np.float32)
    probs[..., 0] = 1.0
    back = place.restore(probs)
    assert back.shape == (30, 20, 2) and np.allclose(back[..., 0], 1.0)
    ids = np.zeros((30, 20), np.uint8)
    ids[:, -1] = 2
    placed = labels_to_model_size(ids, place)
    assert placed.shape == (15, 15) and set(np.unique(placed)) <= {0, 2}
    same, unchanged = to_model_size(image[:, :, None], 30)
    assert same.shape == (30, 30, 1) and unchanged.restore(np.ones((30, 30, 3)))[..., 0].shape == (30, 20)
    assert Placement(30, 20, 15).spacing(1.0, 0.5) == pytest.approx((2.0, 1.0))


def _stored(ras: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """A RAS array and 1.5 x 5 x 2 mm affine re-stored in the axis order `codes`."""
    affine = np.diag([1.5, 5.0, 2.0, 1.0])
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(codes)))
    return apply_orientation(ras, transform), affine @ inv_ornt_aff(transform, ras.shape)


def test_display_slices_are_the_same_in_every_stored_orientation():
    ras = np.arange(6 * 4 * 5).reshape(6, 4, 5)
    reference = None
    for codes in ("RAS", "LPS", "ASL", "SIP"):
        data, affine = _stored(ras, codes)
        g = ScanGeometry(data.shape, affine, "coronal")
        view = g.ras(data)
        assert np.shares_memory(view, data) and g.num_slices == 4
        shown = [g.display(view, k) for k in range(g.num_slices)]
        if reference is None:
            reference = shown
            # superior up, the patient's right (high RAS x) on the left
            assert shown[0][0, 0] == ras[5, 0, 4] and shown[0][-1, -1] == ras[0, 0, 0]
            assert g.in_plane_spacing() == pytest.approx((2.0, 1.5)) and g.ras_zooms == pytest.approx((1.5, 5.0, 2.0))
        assert all(np.array_equal(a, b) for a, b in zip(shown, reference)), codes
        out = np.zeros(data.shape, np.int64)
        for k in range(g.num_slices):      # put is display's inverse, through the view into scan order
            g.put(g.ras(out), k, shown[k])
        assert np.array_equal(out, data)


def test_a_stack_of_display_slices_goes_back_to_ras():
    ras = np.arange(6 * 4 * 5).reshape(6, 4, 5)
    g = ScanGeometry(ras.shape, np.eye(4), "axial")
    stack = np.stack([g.display(ras, k) for k in range(g.num_slices)])
    h, w = stack.shape[1:]
    assert np.array_equal(display_geometry(len(stack), h, w, plane="axial").stack_to_ras(stack), ras)


def test_prepare_scan_normalises_and_warns_when_oblique(caplog):
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 1000, (8, 6, 7)).astype(np.float32)
    angle = np.radians(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.0, 2.0, 4.0])
    with caplog.at_level(logging.WARNING):
        scan = prepare_scan(in_memory(volume, 2), volume.shape, affine, plane="coronal",
                            intensity_percentiles=(1.0, 99.0), source="s.nii")
    low, high = np.percentile(volume, (1.0, 99.0))
    expected = np.round((np.clip(volume, low, high) - low) * (255.0 / (high - low))).astype(np.uint8)
    assert np.array_equal(scan.image, expected) and scan.geometry.obliquity_deg() == pytest.approx(20.0)
    assert "s.nii: the scan's axes are 20.0 degrees oblique" in caplog.text
    caplog.clear()
    straight = prepare_scan(in_memory(volume), volume.shape, np.diag([2.0, 2.0, 4.0, 1.0]), plane="coronal",
                            intensity_percentiles=(1.0, 99.0), source="s.nii")
    assert straight.geometry.obliquity_deg() == pytest.approx(0.0) and "oblique" not in caplog.text


def test_a_spacing_outside_the_trained_range_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        check_spacing((3.0, 3.0), (2.6, 3.5), "mm", "a.png")
        check_spacing(None, (2.6, 3.5), "mm", "b.png")
        check_spacing((1.0, 1.0), None, "mm", "c.png")
        assert caplog.text == ""
        check_spacing((1.0, 1.0), (2.6, 3.5), "mm", "d.png")
        check_spacing((3.0, 6.0), (2.6, 3.5), "mm", "e.png")   # non-square pixels: one axis out
    assert "d.png: 1 mm per pixel at the model input, outside the 2.6-3.5 mm/px" in caplog.text
    assert "e.png: 3 x 6 mm per pixel" in caplog.text
