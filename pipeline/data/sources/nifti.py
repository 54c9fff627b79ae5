"""The real kidney-t2w set (T2-weighted Kidney MRI Segmentation, Daniel et al. 2021,
Zenodo 10.5281/zenodo.5153568): NIfTI image and kidney-mask volumes plus a subject CSV,
read with nibabel.

Per volume: check the mask against the image (same shape and affine, integer labels
listed in dataset.nifti.mask_labels, some kidney); the slices are then cut by
serving.preparation, the preparation `flexunet predict` applies to a scan (reorient,
normalise, slice, display, pad and resample), in pipeline/data/sources/ingest.py.
File naming: pipeline/config/schema.py. Every problem is an error naming the file.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError
from pipeline.config.schema import NiftiParams
from serving.volumes import nifti_stem

@dataclass(frozen=True)
class ScanFiles:
    subject: str
    scan: int
    image: Path
    mask: Path


@dataclass(frozen=True)
class Volume:
    image: np.ndarray                 # float32 (X, Y, Z) in the file's voxel order
    mask: np.ndarray                  # uint8 0/1, same shape
    affine: np.ndarray                # voxel -> world (mm), the image's


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
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise DataError(f"{path}: not a readable NIfTI volume ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return img, data


def load_scan(files: ScanFiles, cfg: NiftiParams) -> Volume:
    """Image and mask of one scan, the mask checked against the image (the image's own
    checks, NaN or constant voxels, are serving.preparation's)."""
    image_img, image = _load(files.image)
    mask_img, mask = _load(files.mask)
    if image.shape != mask.shape:
        raise DataError(f"{files.mask}: mask shape {mask.shape} differs from its image {files.image.name} {image.shape}")
    if not np.allclose(image_img.affine, mask_img.affine, atol=1e-3):
        raise DataError(f"{files.mask}: mask affine differs from its image {files.image.name}: the mask is not "
                        f"in the image's space (max difference {np.abs(image_img.affine - mask_img.affine).max():.3g})")
    if not np.isfinite(mask).all() or not np.array_equal(mask, np.round(mask)):
        raise DataError(f"{files.mask}: mask values must be integers")
    values, counts = np.unique(mask.astype(np.int64), return_counts=True)
    bad = [(int(v), int(n)) for v, n in zip(values, counts) if int(v) not in cfg.mask_labels]
    if bad:
        raise DataError(f"{files.mask}: label(s) outside dataset.nifti.mask_labels {cfg.mask_labels}: "
                        + ", ".join(f"{v} x {n} voxels" for v, n in bad))
    if not mask.any():
        raise DataError(f"{files.mask}: no kidney voxels (all zero); not a kidney mask")
    return Volume(image, (mask != 0).astype(np.uint8), np.asarray(image_img.affine, np.float64))
