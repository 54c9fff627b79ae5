"""Rules that need the whole volume, and kidney volumes: one module for `flexunet predict`
on scans and for the evaluate stage's Total Kidney Volume (TKV).

Every function takes RAS-ordered arrays (serving.preparation.ScanGeometry.ras): axis 0
runs from the patient's left to the patient's right. A body has one kidney per side, and
no slice-by-slice rule can see that a blob in the back muscles is a second "kidney".

The rules (`apply_rules`), in this order:
1. 3-D connected components of the predicted kidney (26-connected: thick slices touch
   diagonally);
2. each component is on the patient's right or left by its centroid along the RAS x
   axis, against the body's midline: the centroid of the voxels brighter than BODY_LEVEL
   of the normalised scan (`body_midline`; the middle of the field of view without an
   image), so an off-centre field of view does not put both kidneys on one side;
3. components under `min_component_ml` (a model card setting) are dropped, and on each
   side only the largest is kept;
4. holes are filled in each slice of the slicing plane (vessels and sinus fat a model
   leaves inside a kidney's outline; a cyst a slice encloses is filled too, though the
   true masks leave cysts out);
5. one diagnosis per volume (`diagnose`): the foreground class with the largest summed
   probability over the kept voxels, its share of that sum as its probability.

TKV (`kidney_volumes`): kidney voxels x the voxel's volume, split into right and left
kidney by each component's side. Predicted and true masks go through the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RIGHT, LEFT = 1, -1
CONNECTIVITY = 3    # scipy.ndimage.generate_binary_structure(3, 3): 26-connected
BODY_LEVEL = 25     # of 0..255 (a normalised scan or slice): brighter is body, darker air and noise


@dataclass(frozen=True)
class KidneyVolumes:
    tkv_ml: float
    right_ml: float
    left_ml: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}tkv_ml": round(self.tkv_ml, 3), f"{prefix}right_kidney_ml": round(self.right_ml, 3),
                f"{prefix}left_kidney_ml": round(self.left_ml, 3)}


def _ndimage():
    from serving.volumes import require

    return require("scipy.ndimage")


def body_midline(image: np.ndarray | None) -> float | None:
    """The body's midline along RAS x (a voxel index): the x-centroid of the voxels of the
    normalised RAS-ordered image brighter than BODY_LEVEL; None without an image or body."""
    if image is None:
        return None
    counts = np.array([np.count_nonzero(image[x] > BODY_LEVEL) for x in range(image.shape[0])], np.float64)
    return float((np.arange(len(counts)) * counts).sum() / counts.sum()) if counts.any() else None


def components(kidney: np.ndarray, midline: float | None = None
               ) -> tuple[np.ndarray, tuple[slice, ...], np.ndarray, np.ndarray]:
    """(labelled box, its place in the volume, voxels per component, side per component) for
    components 1..n, labelled inside the kidney's bounding box only (a scan's component
    labels are int32: the box keeps them small)."""
    ndimage = _ndimage()
    kidney = np.asarray(kidney, bool)
    if not kidney.any():
        return np.zeros((0, 0, 0), np.int32), (slice(0, 0),) * 3, np.zeros(0, np.int64), np.zeros(0, np.int8)
    box = tuple(slice(int(np.argmax(a)), len(a) - int(np.argmax(a[::-1]))) if a.any() else slice(0, 0)
                for a in (kidney.any(axis=tuple(i for i in range(3) if i != k)) for k in range(3)))
    labelled, n = ndimage.label(kidney[box], structure=ndimage.generate_binary_structure(3, CONNECTIVITY))
    middle = (kidney.shape[0] - 1) / 2.0 if midline is None else midline
    sizes, sides = _sizes_and_sides(labelled, n, box[0].start, middle)
    return labelled, box, sizes, sides


def _sizes_and_sides(labelled: np.ndarray, n: int, x0: int, midline: float) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and side of components 1..n: RIGHT when the centroid along RAS x (increasing
    towards the patient's right) lies beyond the midline, one x plane at a time."""
    weighted, counts = np.zeros(n + 1), np.zeros(n + 1)
    for x in range(labelled.shape[0]):
        c = np.bincount(labelled[x].ravel(), minlength=n + 1)
        weighted += (x0 + x) * c
        counts += c
    centroid = weighted[1:] / np.maximum(counts[1:], 1)
    return counts[1:].astype(np.int64), np.where(centroid > midline, RIGHT, LEFT).astype(np.int8)


def kidney_volumes(kidney: np.ndarray, voxel_ml: float, midline: float | None = None) -> KidneyVolumes:
    """TKV and the right and left kidney volumes (ml) of a RAS-ordered kidney mask."""
    _, _, sizes, sides = components(kidney, midline)
    right = float(sizes[sides == RIGHT].sum()) * voxel_ml
    left = float(sizes[sides == LEFT].sum()) * voxel_ml
    return KidneyVolumes(right + left, right, left)


def apply_rules(kidney: np.ndarray, voxel_ml: float, *, plane_axis: int, min_component_ml: float,
                midline: float | None = None) -> np.ndarray:
    """The kept kidney (bool, RAS order) after rules 1-4 of the module doc."""
    labelled, box, sizes, sides = components(kidney, midline)
    keep = []
    for side in (RIGHT, LEFT):
        candidates = [i for i in range(len(sizes)) if sides[i] == side and sizes[i] * voxel_ml >= min_component_ml]
        if candidates:
            keep.append(1 + max(candidates, key=lambda i: (sizes[i], -i)))   # the largest; ties: the first
    kept = np.zeros(np.shape(kidney), bool)
    kept[box] = np.isin(labelled, keep)
    fill = _ndimage().binary_fill_holes
    slices = np.moveaxis(kept, plane_axis, 0)   # a view: filling it fills `kept`
    for k in range(slices.shape[0]):
        if slices[k].any():
            slices[k] = fill(slices[k])
    return kept


def diagnose(mass: np.ndarray) -> tuple[int | None, float | None]:
    """(class id, probability) from the summed probability of each foreground class (ids
    1..K-1) over the kept kidney; (None, None) when there is no kidney."""
    mass = np.asarray(mass, dtype=np.float64)
    total = float(mass.sum())
    if mass.size == 0 or total <= 0:
        return None, None
    best = int(np.argmax(mass))
    return best + 1, float(mass[best] / total)
