"""Scans in and out: NIfTI files and DICOM series read slab by slab, NIfTI labels written
back in the scan's own space.

Reading (`open_scan`):
- `.nii` / `.nii.gz`: a 3-D volume, or 4-D with one volume; read through nibabel's array
  proxy a slab of slices at a time (the file kept open, so a .nii.gz is decompressed once
  per pass, never held decoded).
- a DICOM series folder (pydicom): every file of the folder that is DICOM, one series
  only, ordered by position along the slice normal; two series, a slice missing (a gap in
  the positions), two slices at one position or slices of differing orientation are
  refused in one line. The affine is built from ImagePositionPatient,
  ImageOrientationPatient and PixelSpacing (DICOM's LPS turned into NIfTI's RAS), so the
  outputs are NIfTI files that overlay the series in any viewer.

Writing (`write_like`): a uint8 volume on the input's grid with the input's affine and
header, qform and sform (and their codes) kept, so ITK-SNAP, 3D Slicer and FSLeyes
overlay it on the scan; a DICOM input gets a NIfTI header of its own (codes: scanner).
`write_label_table`: ITK-SNAP's label description file (id, colour, name).

nibabel and pydicom come with the `flexunet[volumes]` extra; without it a volume input
is one line naming the extra (`require`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from common.atomic import atomic_path, write_text
from common.errors import UserError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SLAB = 8                                  # slices per read: a few slices in memory, never the volume
GAP_TOLERANCE = 0.1                       # relative deviation of a slice step from the median that is a gap


def require(module: str) -> ModuleType:
    """Import a volume dependency, or say in one line which extra brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise UserError(f"scan (NIfTI / DICOM) input needs {module.split('.')[0]}, which is not installed: "
                        f"pip install 'flexunet[volumes]'") from None


def nifti_stem(path: Path) -> str | None:
    """`scan.nii.gz` -> `scan`; None when `path` is not named as a NIfTI file."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def is_dicom_file(path: Path) -> bool:
    """A file holding DICOM's preamble magic ('DICM' at byte 128), whatever its name (scanners
    write IM0001, 1.2.840....dcm or no suffix at all); a DICOMDIR index is not one."""
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR" or not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_series(path: Path) -> bool:
    """A folder directly holding DICOM files."""
    return path.is_dir() and any(is_dicom_file(p) for p in path.iterdir())


def is_scan(path: Path) -> bool:
    return nifti_stem(path) is not None or is_dicom_series(path)


@dataclass
class ScanSource:
    """A scan opened for reading slab by slab along its last voxel axis."""

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray
    kind: str                              # "nifti" | "dicom"
    image: Any = None                      # the nibabel image (NIfTI input): its header is the outputs'
    _files: list[Path] = field(default_factory=list)          # DICOM: the slices in order
    _rescale: list[tuple[float, float]] = field(default_factory=list)

    def slabs(self) -> Iterator[np.ndarray]:
        """One pass over the voxels: float64 slabs (X, Y, k) of at most SLAB slices, in order."""
        if self.kind == "nifti":
            proxy = self.image.dataobj
            four_d = len(proxy.shape) == 4
            for k in range(0, self.shape[2], SLAB):
                index = (slice(None), slice(None), slice(k, k + SLAB)) + ((0,) if four_d else ())
                try:
                    yield np.asarray(proxy[index], dtype=np.float64)
                except Exception as exc:  # noqa: BLE001 - gzip, zlib and nibabel raise many types
                    raise UserError(f"{self.path}: its voxels cannot be read from slice {k} on ({type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:120]}); the file is truncated or damaged: "
                                    f"copy or export it again") from None
            return
        pydicom = require("pydicom")
        for k in range(0, len(self._files), SLAB):
            planes = []
            for path, (slope, intercept) in zip(self._files[k: k + SLAB], self._rescale[k: k + SLAB]):
                try:
                    pixels = pydicom.dcmread(path).pixel_array
                except Exception as exc:  # noqa: BLE001 - pydicom's decoders raise many types
                    raise UserError(f"{path}: pixel data cannot be decoded ({' '.join(str(exc).split())[:200]}); "
                                    f"compressed series may need pip install pylibjpeg pylibjpeg-libjpeg") from None
                if pixels.shape != (self.shape[1], self.shape[0]):
                    raise UserError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels, the series' other slices "
                                    f"{self.shape[0]}x{self.shape[1]}; one series has one size")
                planes.append(pixels.T.astype(np.float64) * slope + intercept)
            yield np.stack(planes, axis=2)

    @property
    def zooms(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def open_scan(path: Path) -> ScanSource:
    """A NIfTI file or a DICOM series folder, checked and ready to read (module doc)."""
    path = Path(path)
    if path.is_dir():
        return _open_dicom(path)
    return _open_nifti(path)


def _open_nifti(path: Path) -> ScanSource:
    nib = require("nibabel")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        image = nib.load(str(path), keep_file_open=True)
        shape = tuple(int(s) for s in image.shape)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise UserError(f"{path}: not a readable NIfTI volume ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]})") from None
    if len(shape) == 4 and shape[3] != 1:
        raise UserError(f"{path}: holds {shape[3]} volumes (4-D, shape {shape}); give one volume, e.g. split it "
                        f"with fslsplit or nibabel's four_to_three")
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise UserError(f"{path}: a {len(shape)}-D image of shape {shape}; a scan is a 3-D volume "
                        f"(or 4-D with one volume)")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UserError(f"{path}: its affine is singular or not finite; the header does not place the voxels")
    return ScanSource(path, shape[:3], affine, "nifti", image=image)  # type: ignore[arg-type]


def _dicom_headers(folder: Path) -> list[tuple[Path, Any]]:
    pydicom = require("pydicom")
    headers = []
    for path in sorted(p for p in folder.iterdir() if is_dicom_file(p)):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{path}: not a readable DICOM file ({' '.join(str(exc).split())[:200]})") from None
        if hasattr(ds, "Rows") and hasattr(ds, "Columns"):   # an image; not a report or a presentation state
            headers.append((path, ds))
    if not headers:
        raise UserError(f"{folder}: no DICOM images in this folder")
    return headers


def _open_dicom(folder: Path) -> ScanSource:
    headers = _dicom_headers(folder)
    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in headers})
    if len(series) > 1:
        raise UserError(f"{folder}: holds {len(series)} DICOM series ({', '.join(s[-12:] for s in series)}); "
                        f"put each series in a folder of its own")
    missing = [p.name for p, ds in headers
               if not all(hasattr(ds, k) for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"))]
    if missing:
        raise UserError(f"{folder}: {missing[0]} has no ImagePositionPatient / ImageOrientationPatient / PixelSpacing; "
                        f"the slices cannot be placed in space")
    orientation = np.array([float(v) for v in headers[0][1].ImageOrientationPatient])
    for p, ds in headers:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orientation, atol=1e-4):
            raise UserError(f"{folder}: {p.name} is oriented differently from {headers[0][0].name}; "
                            f"one series, one orientation")
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    position = {p: np.array([float(v) for v in ds.ImagePositionPatient]) for p, ds in headers}
    ordered = sorted(headers, key=lambda h: float(position[h[0]] @ normal))
    along = np.array([float(position[p] @ normal) for p, _ in ordered])
    if len(ordered) < 2:
        raise UserError(f"{folder}: a DICOM series of one slice; a scan needs at least two")
    steps = np.diff(along)
    if (steps < 1e-3).any():
        i = int(np.argmax(steps < 1e-3))
        raise UserError(f"{folder}: {ordered[i][0].name} and {ordered[i + 1][0].name} lie at the same position; "
                        f"a folder with several echoes or phases holds several volumes: split it")
    median = float(np.median(steps))
    if (np.abs(steps - median) > GAP_TOLERANCE * median).any():
        i = int(np.argmax(np.abs(steps - median) > GAP_TOLERANCE * median))
        raise UserError(f"{folder}: a gap in the slice positions between {ordered[i][0].name} and "
                        f"{ordered[i + 1][0].name} ({steps[i]:.3g} mm, the others {median:.3g} mm); a slice is missing")
    first = ordered[0][1]
    rows, cols = int(first.Rows), int(first.Columns)
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)   # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * col_mm, col * row_mm
    lps[:3, 2] = (position[ordered[-1][0]] - position[ordered[0][0]]) / (len(ordered) - 1)
    lps[:3, 3] = position[ordered[0][0]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    rescale = [(float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0))
               for _, ds in ordered]
    return ScanSource(folder, (cols, rows, len(ordered)), affine, "dicom", _files=[p for p, _ in ordered],
                      _rescale=rescale)


# ---------------------------------------------------------------------- writing
def write_like(path: Path, data: np.ndarray, source: ScanSource, description: str) -> None:
    """uint8 `data` (the scan's voxel order) as NIfTI on the source's grid, atomically."""
    nib = require("nibabel")
    data = np.asarray(data, dtype=np.uint8)
    if source.image is not None:
        template = source.image
        data = data.reshape(template.shape)        # a 4-D input of one volume keeps its 4th axis
        header = template.header.copy()
        header.set_data_dtype(np.uint8)
        out = type(template)(data, None, header)
        out.set_qform(*template.get_qform(coded=True))
        out.set_sform(*template.get_sform(coded=True))
    else:
        out = nib.Nifti1Image(data, source.affine)
        out.set_qform(source.affine, code=1)
        out.set_sform(source.affine, code=1)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"], out.header["cal_max"] = 0, 0    # the scan's display window is not the labels'
    out.header["descrip"] = description[:79].encode()
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(out, str(tmp))


def write_label_table(path: Path, class_names: list[str], colours: list[tuple[int, int, int]]) -> None:
    """ITK-SNAP's label description file: id, RGB, alpha, visibility, mesh, name."""
    lines = ["################################################", "# ITK-SnAP Label Description File",
             "# written by flexunet predict", "# IDX  -R-  -G-  -B-  -A--  VIS MSH  LABEL",
             "################################################"]
    for k, (name, (r, g, b)) in enumerate(zip(class_names, colours)):
        alpha, shown = (0, 0) if k == 0 else (1, 1)
        lines.append(f'{k:5d} {r:4d} {g:4d} {b:4d} {alpha:8d} {shown:2d} {shown:2d}    "{name}"')
    write_text(path, "\n".join(lines) + "\n")
