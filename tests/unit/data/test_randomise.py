"""Domain-randomised kidney-t2w slices: deterministic, masks follow the deformation, the
contrast varies between draws, the realistic rendering is unchanged."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from pipeline.config.schema import RandomiseParams
from pipeline.data.synthetic import randomise
from pipeline.data.synthetic.kidney_t2w import Tissue, make_subjects, render_scan

SEED = 137
STILL = RandomiseParams(realistic_fraction=1.0, rotation_deg=0, scaling=0, shear=0, elastic_mm=0)


def _subject(group: str = "healthy"):
    return next(s for s in make_subjects(8, 0.0, 2, SEED) if s.group == group)


def test_realistic_rendering_bytes_are_pinned():
    """The realistic bytes feed the dataset fingerprint (and the test split of every run):
    a change to them must be a deliberate change of the anatomy, made here with a new hash
    and a new `dvc repro`, never a side effect (of the label painting, a NumPy upgrade...)."""
    h = hashlib.sha256()
    for subject in make_subjects(4, 0.25, 2, SEED)[:2]:
        scan = render_scan(subject, 0, 64, 3, SEED)
        h.update(scan.image.tobytes())
        h.update(scan.kidney.tobytes())
        assert scan.labels is None
    assert h.hexdigest() == "f5d51113c6253964828160b39ab3dbeb4b3f48e383bf5178c110f7d66ae02d0d"


def test_randomised_bytes_are_pinned():
    """The randomised train and valid slices feed the fingerprint too: their images, masks
    and label maps change only with a deliberate change of the draws (new hash, `dvc repro`)."""
    h = hashlib.sha256()
    for subject in make_subjects(4, 0.25, 2, SEED)[:2]:
        scan = render_scan(subject, 0, 64, 3, SEED, "randomised")
        for part in (scan.image, scan.kidney, scan.labels):
            h.update(part.tobytes())
    assert h.hexdigest() == "10bbdb2062e5aa9e927a912ea533eced88dda7a62203795935dc2827add2387a"


def test_randomised_is_deterministic_and_differs_per_scan_and_seed():
    subject = _subject()
    a = render_scan(subject, 0, 48, 3, SEED, "randomised")
    b = render_scan(subject, 0, 48, 3, SEED, "randomised")
    assert a.image.tobytes() == b.image.tobytes() and a.labels.tobytes() == b.labels.tobytes()
    assert (a.kidney == b.kidney).all()
    assert a.image.tobytes() != render_scan(subject, 1, 48, 3, SEED, "randomised").image.tobytes()
    assert a.image.tobytes() != render_scan(subject, 0, 48, 3, SEED + 1, "randomised").image.tobytes()


def test_without_deformation_a_realistic_draw_is_the_realistic_rendering():
    subject = _subject()
    real = render_scan(subject, 0, 64, 3, SEED)
    still = render_scan(subject, 0, 64, 3, SEED, "randomised", STILL)
    # still.kidney is read off the label map: the labels hold the painter's kidney.
    assert (still.image == real.image).all() and (still.kidney == real.kidney).all()


def test_mask_follows_the_deformation():
    subject = _subject()
    real = render_scan(subject, 0, 64, 4, SEED)
    moved = render_scan(subject, 0, 64, 4, SEED, "randomised",
                        RandomiseParams(rotation_deg=20, scaling=0.2, elastic_mm=8))
    assert (moved.kidney != real.kidney).any()     # the anatomy did move
    # ... but stays a comparable kidney: deformation scales areas by at most ~(1.2)^2.
    ratio = moved.kidney.sum() / real.kidney.sum()
    assert 0.6 < ratio < 1.6
    # Image and mask moved together: in realistic draws (the T2w-like contrast, warped) the
    # pixels under the moved mask have the kidney's signal, not that of what surrounds it.
    warped = render_scan(subject, 0, 64, 4, SEED, "randomised",
                         RandomiseParams(realistic_fraction=1.0, rotation_deg=20, scaling=0.2, elastic_mm=8))
    assert (warped.kidney != real.kidney).any()
    inner = np.stack([ndimage.binary_erosion(m, iterations=1) for m in warped.kidney])
    kidney_signal = float(real.image[real.kidney].mean())
    assert abs(float(warped.image[inner].mean()) - kidney_signal) < 0.1 * kidney_signal
    # The bright renal fluid (pelvis urine, cysts) beside the kidney lands under its own label.
    fluid = warped.labels == Tissue.RENAL_FLUID
    assert fluid.sum() >= 10 and float(warped.image[fluid].mean()) > kidney_signal + 40


def test_intensities_vary_between_draws_and_kidney_contrast_is_relative():
    subject = _subject()
    ranges = RandomiseParams(realistic_fraction=0.0, rotation_deg=0, scaling=0, shear=0, elastic_mm=0,
                              bias_std=0, resolution_max=1.0, noise_max=0, gamma_std=0, std_max=0)
    scan = render_scan(subject, 0, 64, 4, SEED, "randomised", ranges)
    # A new tissue contrast in every slice: the liver / abdomen / wall ordering changes.
    means = np.array([[scan.image[z][scan.labels[z] == t].mean() for t in (Tissue.ABDOMEN, Tissue.WALL_MUSCLE)]
                      for z in range(4)])
    assert np.ptp(means[:, 0]) > 10 and np.ptp(means[:, 1]) > 10
    # Within a kidney the medulla sits its own `contrast` away from the cortex, whatever the draw.
    kidneys = [randomise.KidneyTissue(int(Tissue.CORTEX_R), int(Tissue.MEDULLA_R), 0.35, 0.05),
               randomise.KidneyTissue(int(Tissue.CORTEX_L), int(Tissue.MEDULLA_L), 0.1, 0.05)]
    cortices = set()
    for seed in range(6):
        mean, std = randomise._means(np.random.default_rng(seed), len(Tissue), kidneys, RandomiseParams())
        c = mean[Tissue.CORTEX_R]
        assert mean[Tissue.CORTEX_L] == c and std[Tissue.MEDULLA_L] == std[Tissue.CORTEX_R]
        assert abs(mean[Tissue.MEDULLA_R] - c) == pytest.approx(0.35 * c, rel=1e-5)
        assert abs(mean[Tissue.MEDULLA_L] - c) == pytest.approx(0.1 * c, rel=1e-5)
        cortices.add(float(c))
    assert len(cortices) == 6


def test_ranges_are_deterministic_per_generator():
    a = randomise.deformation(np.random.default_rng(3), 32, 3.0, RandomiseParams())
    b = randomise.deformation(np.random.default_rng(3), 32, 3.0, RandomiseParams())
    assert a.tobytes() == b.tobytes()
    field = randomise.smooth_field(np.random.default_rng(1), 5, 40)
    assert field.shape == (40, 40) and field.dtype == np.float32 and field.std() > 0.1
    k = randomise._gaussian_kernel(0.8)
    assert k.sum() == pytest.approx(1.0) and (k == k[::-1]).all()


def test_renal_fluid_is_bright_and_outside_the_kidney_mask():
    """The renal pelvis and cysts are urine-like fluid: bright in the T2w rendering, a label
    of their own, and not kidney in the mask (the real masks leave them out too)."""
    seen = {"CKD": 0, "healthy": 0}
    for subject in make_subjects(16, 0.0, 2, SEED):
        scan = render_scan(subject, 0, 96, 4, SEED, "randomised", STILL)
        fluid = scan.labels == Tissue.RENAL_FLUID
        # Against the painter's mask (STILL draws are pixel-aligned with the realistic
        # rendering): scan.kidney is read off the labels and could not overlap them.
        assert not (fluid & render_scan(subject, 0, 96, 4, SEED).kidney).any()
        if fluid.sum() >= 5:
            assert scan.image[fluid].mean() > scan.image[scan.kidney].mean() + 30
        seen[subject.group] += int(fluid.sum())
    assert seen["CKD"] > 0 and seen["healthy"] > 0
