"""The real kidney-t2w set (T2-weighted Kidney MRI Segmentation, Daniel et al. 2021,
Zenodo 10.5281/zenodo.5153568): NIfTI image and kidney-mask volumes plus a subject CSV,
read with nibabel, into 2-D slices at the model size.

Per volume: reorient to RAS (nibabel's closest canonical, so every scan is sliced the
same way whatever its stored orientation), check the mask against the image (same shape
and affine), normalise intensities (percentile clip -> 0..255), cut slices along the
configured plane, pad each slice to a square (background) and resize it to the model
size (image bilinear, mask nearest). The pixel area at the model size and the slice
thickness give each scan's voxel volume, which the evaluate stage needs for TKV.
File naming: pipeline/config/schema.py. Every problem is an error naming the file.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import DataError
from pipeline.config.schema import NiftiParams

SUFFIXES = (".nii.gz", ".nii")
# Canonical (RAS) array axis of each slicing plane.
PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


@dataclass(frozen=True)
class ScanFiles:
    subject: str
    scan: int
    image: Path
    mask: Path


@dataclass(frozen=True)
class Volume:
    image: np.ndarray                 # float32 (X, Y, Z) in RAS order
    mask: np.ndarray                  # uint8, same shape
    zooms: tuple[float, float, float]  # mm per voxel along X, Y, Z


def nifti_stem(path: Path) -> str | None:
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _volumes_in(folder: Path, strip: str = "") -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        stem = nifti_stem(path)
        if stem is None:
            continue
        if strip and stem.endswith(strip):
            stem = stem[: -len(strip)]
        if stem in found:
            raise DataError(f"{path}: duplicate stem {stem!r} (also {found[stem].name}); keep one file per scan")
        found[stem] = path
    return found


def discover(raw: Path, cfg: NiftiParams) -> list[ScanFiles]:
    """Image/mask volume pairs of `raw`, matched by stem, with subject and scan parsed."""
    images_dir, masks_dir = raw / cfg.images_dir, raw / cfg.masks_dir
    images = _volumes_in(images_dir)
    if not images:
        raise DataError(f"{images_dir}: no .nii/.nii.gz image volumes; put the T2W scans there and their "
                        f"kidney masks in {masks_dir} (see docs/data.md, 'Real data'), then `dvc add {raw}`")
    masks = _volumes_in(masks_dir, cfg.mask_suffix)
    for stem in sorted(images.keys() - masks.keys()):
        raise DataError(f"{images[stem]}: mask missing (expected {masks_dir}/{stem}{cfg.mask_suffix}.nii.gz)")
    for stem in sorted(masks.keys() - images.keys()):
        raise DataError(f"{masks[stem]}: image missing (expected {images_dir}/{stem}.nii.gz)")
    pattern = re.compile(cfg.scan_pattern)
    scans = []
    for stem, path in images.items():
        match = pattern.match(stem)
        if not match:
            raise DataError(f"{path}: file name does not match dataset.nifti.scan_pattern {cfg.scan_pattern!r}")
        scan = match.groupdict().get("scan")
        scans.append(ScanFiles(match.group("subject"), int(scan) if scan else 1, path, masks[stem]))
    seen: dict[tuple[str, int], Path] = {}
    for s in scans:
        if (s.subject, s.scan) in seen:
            raise DataError(f"{s.image}: subject {s.subject} scan {s.scan} again (also {seen[s.subject, s.scan].name})")
        seen[s.subject, s.scan] = s.image
    return sorted(scans, key=lambda s: (s.subject, s.scan))


def read_subjects(path: Path, cfg: NiftiParams, class_names: list[str]) -> dict[str, str]:
    """Subject id -> class name (the group's colour), from the subject CSV."""
    if not path.is_file():
        raise DataError(f"{path}: subject CSV not found; it lists each subject's group "
                        f"(columns {cfg.id_column!r}, {cfg.group_column!r})")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in (cfg.id_column, cfg.group_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: column(s) {missing} missing (has {reader.fieldnames}); set "
                            f"dataset.nifti.id_column / group_column")
        groups: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            subject, text = (row[cfg.id_column] or "").strip(), (row[cfg.group_column] or "").strip()
            name = cfg.groups.get(text.lower())
            if name is None or name not in class_names[1:]:
                raise DataError(f"{path}, line {line}: subject {subject!r} has unknown group {text!r}; known: "
                                f"{sorted(cfg.groups)} (dataset.nifti.groups maps them to {class_names[1:]})")
            if groups.get(subject, name) != name:
                raise DataError(f"{path}, line {line}: subject {subject!r} listed with two groups")
            groups[subject] = name
    return groups


def _load(path: Path):
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise DataError(f"{path}: not a readable NIfTI volume ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return img, data


def load_scan(files: ScanFiles, cfg: NiftiParams) -> Volume:
    image_img, image = _load(files.image)
    mask_img, mask = _load(files.mask)
    if image.shape != mask.shape:
        raise DataError(f"{files.mask}: mask shape {mask.shape} differs from its image {files.image.name} {image.shape}")
    if not np.allclose(image_img.affine, mask_img.affine, atol=1e-3):
        raise DataError(f"{files.mask}: mask affine differs from its image {files.image.name}: the mask is not "
                        f"in the image's space (max difference {np.abs(image_img.affine - mask_img.affine).max():.3g})")
    if not np.isfinite(image).all():
        raise DataError(f"{files.image}: {int((~np.isfinite(image)).sum())} voxels are NaN or infinite")
    if float(image.max()) == float(image.min()):
        raise DataError(f"{files.image}: the volume is constant ({float(image.min())}); not an image")
    if not np.isfinite(mask).all() or not np.array_equal(mask, np.round(mask)):
        raise DataError(f"{files.mask}: mask values must be integers")
    values, counts = np.unique(mask.astype(np.int64), return_counts=True)
    bad = [(int(v), int(n)) for v, n in zip(values, counts) if int(v) not in cfg.mask_labels]
    if bad:
        raise DataError(f"{files.mask}: label(s) outside dataset.nifti.mask_labels {cfg.mask_labels}: "
                        + ", ".join(f"{v} x {n} voxels" for v, n in bad))
    if not mask.any():
        raise DataError(f"{files.mask}: no kidney voxels (all zero); not a kidney mask")
    # Voxel sizes from the affine, not the header's pixdim (they can disagree; the affine
    # is what places the voxels).
    zooms = tuple(float(z) for z in nib_voxel_sizes(image_img.affine))
    return Volume(image, (mask != 0).astype(np.uint8), zooms)  # type: ignore[arg-type]


def nib_voxel_sizes(affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return nib.affines.voxel_sizes(affine)[:3]


def normalise(volume: np.ndarray, percentiles: tuple[float, float], source: Path) -> np.ndarray:
    low, high = np.percentile(volume, percentiles)
    if high <= low:
        raise DataError(f"{source}: intensity percentiles {percentiles} are equal ({low}); nearly constant volume")
    return np.round((np.clip(volume, low, high) - low) / (high - low) * 255).astype(np.uint8)


def plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice, displayed as radiologists do: superior (or anterior) up, patient's right
    on the image's left (RAS arrays: flip both in-plane axes after transposing)."""
    return np.flip(np.take(volume, index, axis=axis).T, axis=(0, 1))


def in_plane_spacing(zooms: tuple[float, float, float], axis: int) -> tuple[float, float]:
    """(row, column) spacing in mm of a slice from `plane`."""
    first, second = [z for i, z in enumerate(zooms) if i != axis]
    return second, first


def to_model_size(image: np.ndarray, mask: np.ndarray, size: int, spacing: tuple[float, float]
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Pad to a square (background) keeping the aspect, resize to size x size; also the
    pixel area in mm^2 at that size."""
    h, w = image.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = np.zeros((side, side), np.uint8)
    padded_mask = np.zeros((side, side), np.uint8)
    padded[top: top + h, left: left + w] = image
    padded_mask[top: top + h, left: left + w] = mask
    small = np.asarray(Image.fromarray(padded).resize((size, size), Image.BILINEAR))
    small_mask = np.asarray(Image.fromarray(padded_mask).resize((size, size), Image.NEAREST))
    area = (spacing[0] * side / size) * (spacing[1] * side / size)
    return small, small_mask, area
