"""Rules that need the whole volume, and kidney volumes: one module for `flexunet predict`
on scans and for the evaluate stage's Total Kidney Volume (TKV).

Every function takes RAS-ordered arrays (serving.preparation.ScanGeometry.ras): axis 0
runs from the patient's left to the patient's right. A body has one kidney per side, and
no slice-by-slice rule can see that a blob in the back muscles is a second "kidney".

The rules (`apply_rules`), in this order:
1. 3-D connected components of the predicted kidney (26-connected: thick slices touch
   diagonally);
2. each component is on the patient's right or left by its centroid along the RAS x
   axis, against the middle of the field of view (`side_of`);
3. components under `min_component_ml` (a model card setting) are dropped, and on each
   side only the largest is kept;
4. holes are filled in each slice of the slicing plane (vessels and sinus fat a model
   leaves inside a kidney's outline);
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


def components(kidney: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labelled volume, voxels per component, side per component) for components 1..n."""
    ndimage = _ndimage()
    labelled, n = ndimage.label(kidney, structure=ndimage.generate_binary_structure(3, CONNECTIVITY))
    sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    return labelled, sizes, side_of(labelled, n)


def side_of(labelled: np.ndarray, n: int) -> np.ndarray:
    """RIGHT or LEFT for components 1..n: the side of the field of view's middle (along the
    RAS x axis, increasing towards the patient's right) holding the component's centroid."""
    if n == 0:
        return np.zeros(0, np.int8)
    weighted, counts = np.zeros(n + 1), np.zeros(n + 1)
    for x in range(labelled.shape[0]):   # one plane at a time: no volume-sized index array
        c = np.bincount(labelled[x].ravel(), minlength=n + 1)
        weighted += x * c
        counts += c
    centroid = weighted[1:] / np.maximum(counts[1:], 1)
    return np.where(centroid > (labelled.shape[0] - 1) / 2.0, RIGHT, LEFT).astype(np.int8)


def kidney_volumes(kidney: np.ndarray, voxel_ml: float) -> KidneyVolumes:
    """TKV and the right and left kidney volumes (ml) of a RAS-ordered kidney mask."""
    labelled, sizes, sides = components(np.asarray(kidney, bool))
    right = float(sizes[sides == RIGHT].sum()) * voxel_ml
    left = float(sizes[sides == LEFT].sum()) * voxel_ml
    return KidneyVolumes(right + left, right, left)


def apply_rules(kidney: np.ndarray, voxel_ml: float, *, plane_axis: int, min_component_ml: float) -> np.ndarray:
    """The kept kidney (bool, RAS order) after rules 1-4 of the module doc."""
    labelled, sizes, sides = components(np.asarray(kidney, bool))
    keep = []
    for side in (RIGHT, LEFT):
        candidates = [i for i in range(len(sizes)) if sides[i] == side and sizes[i] * voxel_ml >= min_component_ml]
        if candidates:
            keep.append(1 + max(candidates, key=lambda i: (sizes[i], -i)))   # the largest; ties: the first
    kept = np.isin(labelled, keep)
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
