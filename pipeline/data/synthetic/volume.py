"""One synthetic kidney-t2w subject as a NIfTI scan (`flexunet synthesize --volume`), with
its true kidney mask: a volume for the tests, the docs and the TKV benchmark to run
`flexunet predict` on.

The subject is pipeline.data.synthetic.kidney_t2w's (the same anatomy, in millimetres),
rendered with enough coronal slices to hold both kidneys whole, at the chosen in-plane
spacing (the field of view stays kidney_t2w.FOV_MM) and slice thickness, and stored in
any axis order and direction (`orientation`: nibabel axis codes such as RAS, LPS or
ASL). The display slices go into RAS through serving.preparation's own geometry (the
inverse of how `flexunet predict` cuts them), so predicting the file gives back the
rendered slices.

The image is int16 (the rendered 0..255 grey x 8, as scanners store magnitudes); the
mask is uint8: 1 the patient's right kidney, 2 the left one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic import atomic_path
from common.errors import UserError
from pipeline.config.schema import RandomiseParams
from pipeline.data.synthetic import kidney_t2w
from serving.preparation import display_geometry

RIGHT_KIDNEY, LEFT_KIDNEY = 1, 2
DEFAULT_SLICES = 18          # 90 mm of coronal slices at 5 mm: both kidneys whole, with margin


@dataclass(frozen=True)
class SyntheticVolume:
    image: np.ndarray            # int16, the stored voxel order
    mask: np.ndarray             # uint8: 1 right kidney, 2 left kidney
    affine: np.ndarray
    voxel_ml: float

    @property
    def true_ml(self) -> dict[str, float]:
        right = float((self.mask == RIGHT_KIDNEY).sum()) * self.voxel_ml
        left = float((self.mask == LEFT_KIDNEY).sum()) * self.voxel_ml
        return {"tkv_ml": right + left, "right_kidney_ml": right, "left_kidney_ml": left}


def synthetic_volume(subject: int = 1, group: str = "CKD", *, seed: int = 137, spacing_mm: float = 1.5,
                     slice_mm: float = kidney_t2w.SLICE_MM, slices: int = DEFAULT_SLICES,
                     orientation: str = "RAS", appearance: kidney_t2w.Appearance = "realistic") -> SyntheticVolume:
    """Render subject `sub-<subject>` of `group` as a scan (module doc)."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    if group not in kidney_t2w.GROUPS:
        raise UserError(f"group {group!r}: use one of {', '.join(kidney_t2w.GROUPS)}")
    if not 0.3 <= spacing_mm <= 12 or not 0.5 <= slice_mm <= 20 or slices < 1:
        raise UserError(f"spacing {spacing_mm} mm, slice {slice_mm} mm, {slices} slices: use 0.3-12 mm in plane, "
                        f"0.5-20 mm slices and at least one slice")
    try:
        target = axcodes2ornt(tuple(orientation.upper()))
        if len(orientation) != 3 or np.isnan(target).any() or sorted(target[:, 0]) != [0, 1, 2]:
            raise ValueError
    except ValueError:
        raise UserError(f"orientation {orientation!r}: three axis codes, one of R/L, A/P and S/I each "
                        f"(e.g. RAS, LPS, ASL)") from None
    size = int(round(kidney_t2w.FOV_MM / spacing_mm))
    spec = kidney_t2w.SubjectSpec(f"sub-{subject:03d}", group, 1)
    scan = kidney_t2w.render_scan(spec, 0, size, slices, seed, appearance, RandomiseParams(), slice_mm=slice_mm)
    px = kidney_t2w.FOV_MM / size
    # Display stack (anterior -> posterior, rows superior -> inferior, columns the patient's
    # right -> left); RAS slice 0 is the most posterior, so the stack goes in reversed.
    side = np.zeros(scan.kidney.shape, np.uint8)
    side[..., : size // 2] = RIGHT_KIDNEY
    side[..., size // 2:] = LEFT_KIDNEY
    geometry = display_geometry(slices, size, size, (slice_mm, px, px))
    ras_image = geometry.stack_to_ras(scan.image[::-1].astype(np.int16) * 8)
    ras_mask = geometry.stack_to_ras((scan.kidney * side)[::-1])
    shape = np.array(ras_image.shape)
    ras_affine = np.diag([px, slice_mm, px, 1.0])
    ras_affine[:3, 3] = -(shape - 1) / 2 * np.array([px, slice_mm, px])
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), target)
    affine = ras_affine @ inv_ornt_aff(transform, ras_image.shape)
    assert nib.aff2axcodes(affine) == tuple(orientation.upper())
    return SyntheticVolume(np.ascontiguousarray(apply_orientation(ras_image, transform)),
                           np.ascontiguousarray(apply_orientation(ras_mask, transform)), affine,
                           px * px * slice_mm / 1000.0)


def write_volume(path: Path, volume: SyntheticVolume, mask_path: Path | None = None) -> None:
    """The image (and the mask) as NIfTI-1, atomically; qform and sform codes 1 (scanner)."""
    import nibabel as nib

    for target, data in ((path, volume.image), (mask_path, volume.mask)):
        if target is None:
            continue
        if not str(target).endswith((".nii", ".nii.gz")):
            raise UserError(f"{target}: name the file .nii.gz (or .nii)")
        image = nib.Nifti1Image(data, volume.affine)
        image.set_qform(volume.affine, code=1)
        image.set_sform(volume.affine, code=1)
        with atomic_path(target, suffix=".nii.gz" if str(target).endswith(".gz") else ".nii") as tmp:
            nib.save(image, str(tmp))
