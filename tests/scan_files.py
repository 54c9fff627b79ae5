"""Scans the tests write: NIfTI files and DICOM series (pydicom), from arrays and affines.

`oracle_scan` turns a synthetic subject (pipeline.data.synthetic.volume) into a scan whose
kidney is its brightest tissue, which tests.onnx_models.make_kidney_onnx segments
exactly at the model size: what is left to test is the geometry (orientation, spacing,
resampling) and the volume arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.data.synthetic.volume import SyntheticVolume, synthetic_volume


def oracle_scan(subject: int = 3, **kwargs) -> SyntheticVolume:
    """The subject's scan with kidney 1000, the rest of the body 400 and air 0 (int16)."""
    volume = synthetic_volume(subject, **kwargs)
    body = volume.image > 40
    image = np.where(volume.mask > 0, 1000, np.where(body, 400, 0)).astype(np.int16)
    return SyntheticVolume(image, volume.mask, volume.affine, volume.voxel_ml)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, qform_code: int = 1, sform_code: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    nib.save(image, str(path))
    return path


def write_dicom_series(folder: Path, data: np.ndarray, affine: np.ndarray, *, series_uid: str | None = None,
                       start: int = 0, skip: tuple[int, ...] = (), names: str = "IM{:04d}") -> Path:
    """One MR series: slice k of `data` (columns, rows, slices) placed by the RAS `affine`
    (DICOM's LPS geometry derived from it), one file per slice in a shuffled order; slices
    in `skip` are left out (a gap)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    col_mm, row_mm = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = [*(lps[:3, 0] / col_mm), *(lps[:3, 1] / row_mm)]
    series_uid = series_uid or generate_uid()
    order = np.random.default_rng(0).permutation(data.shape[2])     # files in no particular order
    for n, k in enumerate(order):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "MR", series_uid, int(k) + 1
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.PixelSpacing = [float(row_mm), float(col_mm)]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 2, -10
        ds.PixelData = ((data[:, :, k].T.astype(np.int32) + 10) // 2).astype(np.int16).tobytes()
        ds.save_as(folder / names.format(start + n), enforce_file_format=True)
    return folder
