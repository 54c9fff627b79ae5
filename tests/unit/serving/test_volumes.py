"""Scans in and out: NIfTI read slab by slab, DICOM series ordered and placed, refused in one
line when they are not one volume; labels written back with the input's affine and header."""

from __future__ import annotations

import builtins

import nibabel as nib
import numpy as np
import pytest

from common.errors import UserError
from serving import volumes
from serving.outputs import output_stem
from serving.volumes import is_dicom_series, open_scan, require, write_label_table, write_like
from tests.scan_files import save_nifti, write_dicom_series

# A coronal stack (LIP): columns to the patient's left, rows downwards, slices backwards,
# as a scanner's coronal series runs (DICOM's slice normal, row x column, points posterior).
AFFINE = np.array([[-1.5, 0, 0, 90], [0, 0, -5.0, 40], [0, -1.5, 0, 120], [0, 0, 0, 1]])


def _volume(shape=(12, 10, 9)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape) % 251


def _all(source) -> np.ndarray:
    return np.concatenate(list(source.slabs()), axis=2)


def test_nifti_is_read_slab_by_slab_with_its_affine(tmp_path, monkeypatch):
    data = _volume()
    path = save_nifti(tmp_path / "a.nii.gz", data, AFFINE)
    monkeypatch.setattr(volumes, "SLAB", 4)
    source = open_scan(path)
    slabs = list(source.slabs())
    assert [s.shape[2] for s in slabs] == [4, 4, 1] and source.shape == data.shape
    assert np.array_equal(np.concatenate(slabs, axis=2), data) and np.allclose(source.affine, AFFINE)
    assert source.zooms == pytest.approx((1.5, 1.5, 5.0)) and output_stem(path) == "a"
    four = save_nifti(tmp_path / "b.nii", data[..., None], AFFINE)   # 4-D with one volume
    assert np.array_equal(_all(open_scan(four)), data)


@pytest.mark.parametrize(("shape", "message"), [
    ((12, 10), "a 2-D image of shape (12, 10); a scan is a 3-D volume (or 4-D with one volume)"),
    ((4, 3, 2, 2, 2), "a 5-D image of shape (4, 3, 2, 2, 2)"),
    ((4, 3, 2, 3), "holds 3 volumes (4-D, shape (4, 3, 2, 3)); give one volume"),
])
def test_nifti_that_is_not_one_volume_is_one_line(tmp_path, shape, message):
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))
    with pytest.raises(UserError, match=r"x\.nii\.gz: " + message.replace("(", r"\(").replace(")", r"\)")):
        open_scan(path)
    (tmp_path / "bad.nii.gz").write_bytes(b"not nifti")
    with pytest.raises(UserError, match="bad.nii.gz: not a readable NIfTI volume"):
        open_scan(tmp_path / "bad.nii.gz")


def test_dicom_series_is_ordered_by_position_and_placed_like_the_nifti(tmp_path):
    data = _volume((12, 10, 9)) * 2
    folder = write_dicom_series(tmp_path / "series", data, AFFINE)
    (folder / "notes.txt").write_text("not DICOM")            # other files in the folder are ignored
    (folder / "DICOMDIR").write_bytes((folder / "IM0000").read_bytes())   # and a DICOMDIR index
    assert is_dicom_series(folder) and not is_dicom_series(tmp_path)
    source = open_scan(folder)
    assert source.kind == "dicom" and source.shape == (12, 10, 9)
    assert np.allclose(source.affine, AFFINE, atol=1e-5)
    assert np.array_equal(_all(source), data) and output_stem(folder) == "series"
    # slices stored against the normal: read in the normal's order, every voxel in its place
    flipped = AFFINE @ np.diag([1, 1, -1, 1])
    flipped[:3, 3] = AFFINE[:3, 3] + 8 * AFFINE[:3, 2]
    source = open_scan(write_dicom_series(tmp_path / "backwards", data[..., ::-1], flipped))
    assert np.allclose(source.affine, AFFINE, atol=1e-5) and np.array_equal(_all(source), data)


@pytest.mark.parametrize("how", ["two-series", "gap", "same-position", "one-slice"])
def test_a_folder_that_is_not_one_series_is_refused_in_one_line(tmp_path, how):
    data = _volume((6, 5, 5)) * 2
    folder = tmp_path / "s"
    if how == "two-series":
        write_dicom_series(folder, data, AFFINE)
        write_dicom_series(folder, data, AFFINE, start=100)
        message = "holds 2 DICOM series"
    elif how == "gap":
        write_dicom_series(folder, data, AFFINE, skip=(2,))
        message = r"a gap in the slice positions between IM\d+ and IM\d+ \(10 mm, the others 5 mm\); a slice is missing"
    elif how == "same-position":
        uid = "1.2.3.4"
        write_dicom_series(folder, data, AFFINE, series_uid=uid)
        write_dicom_series(folder, data[..., :1], AFFINE, series_uid=uid, start=100)
        message = r"IM\d+ and IM\d+ lie at the same position; a folder with several echoes"
    else:
        write_dicom_series(folder, data[..., :1], AFFINE)
        message = "a DICOM series of one slice"
    with pytest.raises(UserError, match=f"{folder}: {message}"):
        open_scan(folder)


def test_outputs_keep_the_inputs_affine_header_and_codes(tmp_path):
    data = _volume().astype(np.float32)
    qform = AFFINE.copy()
    sform = AFFINE.copy()
    sform[:3, 3] += 0.25                                   # qform and sform may differ: both are kept
    image = nib.Nifti1Image(data, None)
    image.set_qform(qform, code=1)
    image.set_sform(sform, code=2)
    image.header.set_slope_inter(2.0, 3.0)                 # the input's scaling is not the labels'
    nib.save(image, str(tmp_path / "in.nii.gz"))
    source = open_scan(tmp_path / "in.nii.gz")
    labels = (np.arange(data.size).reshape(data.shape) % 3).astype(np.uint8)
    write_like(tmp_path / "out.nii.gz", labels, source, "labels")
    back = nib.load(str(tmp_path / "out.nii.gz"))
    assert back.shape == data.shape and back.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(back.dataobj), labels)
    assert np.allclose(back.affine, image.affine) and np.allclose(back.get_qform(), qform)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 2
    four = open_scan(save_nifti(tmp_path / "four.nii.gz", data[..., None], AFFINE))   # 4-D, one volume
    write_like(tmp_path / "four_seg.nii.gz", labels, four, "labels")
    back = nib.load(str(tmp_path / "four_seg.nii.gz"))
    assert back.shape == data.shape + (1,) and np.array_equal(np.asarray(back.dataobj)[..., 0], labels)
    dicom = open_scan(write_dicom_series(tmp_path / "series", (_volume() * 2), AFFINE))
    write_like(tmp_path / "d.nii.gz", labels, dicom, "labels")
    back = nib.load(str(tmp_path / "d.nii.gz"))
    assert np.allclose(back.affine, AFFINE, atol=1e-5) and int(back.header["sform_code"]) == 1


def test_a_truncated_nifti_is_one_line(tmp_path):
    path = save_nifti(tmp_path / "cut.nii.gz", np.random.default_rng(0).normal(size=(40, 40, 30)), AFFINE)
    path.write_bytes(path.read_bytes()[:-4000])
    source = open_scan(path)                  # the header reads
    with pytest.raises(UserError, match=r"cut\.nii\.gz: its voxels cannot be read from slice \d+ on .*truncated"):
        _all(source)


def test_label_table_is_itksnaps(tmp_path):
    write_label_table(tmp_path / "t.txt", ["background", "CKD", "healthy"], [(0, 0, 0), (255, 0, 0), (0, 255, 0)])
    rows = [line.split() for line in (tmp_path / "t.txt").read_text().splitlines() if not line.startswith("#")]
    assert rows == [["0", "0", "0", "0", "0", "0", "0", '"background"'], ["1", "255", "0", "0", "1", "1", "1", '"CKD"'],
                    ["2", "0", "255", "0", "1", "1", "1", '"healthy"']]


def test_a_missing_volume_library_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def without_pydicom(name, *args, **kwargs):
        if name.startswith("pydicom"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_pydicom)
    monkeypatch.delitem(__import__("sys").modules, "pydicom", raising=False)
    with pytest.raises(UserError, match=r"needs pydicom, which is not installed: pip install 'flexunet\[volumes\]'"):
        require("pydicom")
