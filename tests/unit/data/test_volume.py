"""`flexunet synthesize --volume`: one synthetic subject as a NIfTI scan, in any stored
orientation, whose display slices are the generator's slices."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from common.errors import UserError
from pipeline.cli import main
from pipeline.data.synthetic import kidney_t2w
from pipeline.data.synthetic.volume import LEFT_KIDNEY, RIGHT_KIDNEY, synthetic_volume
from serving.preparation import ScanGeometry


def test_the_scan_holds_the_generators_slices_both_kidneys_whole_in_any_orientation():
    spec = kidney_t2w.SubjectSpec("sub-004", "healthy", 1)
    rendered = kidney_t2w.render_scan(spec, 0, 64, 16, 137)
    reference = None
    for codes in ("RAS", "LPS", "SAR"):
        volume = synthetic_volume(4, "healthy", spacing_mm=6.0, slices=16, orientation=codes)
        assert nib.aff2axcodes(volume.affine) == tuple(codes)
        g = ScanGeometry(volume.image.shape, volume.affine, "coronal")
        image, mask = g.ras(volume.image), g.ras(volume.mask)
        # RAS slice 0 is the most posterior: the generator's last (anterior -> posterior) slice
        for k in range(16):
            assert np.array_equal(g.display(image, k), rendered.image[15 - k].astype(np.int16) * 8)
            assert np.array_equal(g.display(mask, k) > 0, rendered.kidney[15 - k])
        assert not mask[:, 0].any() and not mask[:, -1].any()          # the kidneys end inside the scan
        right = mask == RIGHT_KIDNEY
        assert (np.nonzero(right)[0].mean() > image.shape[0] / 2) and (mask == LEFT_KIDNEY).any()
        if reference is None:
            reference = volume.true_ml
        assert volume.true_ml == reference and volume.voxel_ml == pytest.approx(6.0 * 6.0 * 5.0 / 1000)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"orientation": "RAR"}, "orientation 'RAR': three axis codes"),
    ({"orientation": "RA"}, "orientation 'RA': three axis codes"),
    ({"group": "diabetic"}, "group 'diabetic': use one of CKD, healthy"),
    ({"spacing_mm": 0.1}, "spacing 0.1 mm"),
])
def test_bad_requests_are_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        synthetic_volume(**kwargs)


def test_the_command_writes_the_scan_and_its_mask(tmp_path, capsys):
    out, mask = tmp_path / "scans" / "s.nii.gz", tmp_path / "truth" / "s.nii.gz"
    assert main(["synthesize", "--volume", str(out), "--mask", str(mask), "--spacing", "6", "--slices", "14",
                 "--orientation", "LPS", "--subject", "2"]) == 0
    image, truth = nib.load(str(out)), nib.load(str(mask))
    assert image.shape == truth.shape == (64, 14, 64) and nib.aff2axcodes(image.affine) == ("L", "P", "S")
    assert np.allclose(image.affine, truth.affine) and int(image.header["sform_code"]) == 1
    assert set(np.unique(np.asarray(truth.dataobj))) == {0, 1, 2}
    line = capsys.readouterr().out
    assert line.startswith(f"{out}: 64x14x64 voxels (LPS) at 6 x 6 x 5 mm, sub-002 (CKD); true TKV")
    assert main(["synthesize", "--volume", str(tmp_path / "x.png")]) == 2
