"""The one preparation of a slice for a model, shared by training and prediction.

A scan (NIfTI or DICOM volume) becomes model inputs in five steps; the kidney-nifti
import, `flexunet predict` and the evaluate stage all go through here, so a slice is cut,
scaled and placed the same way when the model learns from it and when it predicts it:

1. **Reorient** to the closest canonical RAS axes (nibabel's `io_orientation`, as
   `as_closest_canonical` does): a view of the scan's own array, never a resampling, so a
   scan a few degrees oblique is sliced along its own voxel axes (`ScanGeometry`).
2. **Normalise**: clip to the volume's intensity percentiles (the model card's, 0.5 and
   99.5 by default) and scale to 0..255. The percentiles are exact (NumPy's linear rule)
   and computed from slabs of the scan (`percentiles`), so a large volume is never held
   as floats.
3. **Slice** along the plane (coronal: the RAS anterior-posterior axis).
4. **Display orientation**, as radiologists read it: superior (or anterior) up, the
   patient's right on the image's left (`ScanGeometry.display`).
5. **Pad and resample** (whole-slice models): pad to a square with background (0), keeping
   the aspect, and resample to the model size, bilinear (`to_model_size`).

2-D images (PNG, TIFF slices, the real sample) are already 8-bit and displayed: they take
step 5 only. The way back (`Placement.restore`): probabilities, not labels, are resampled
to the padded square and cropped, then the argmax is taken on the input's own grid, as
nnU-Net does. Tiled models (histology) skip step 5: they are tiled at their training
resolution (serving.tiling).

Stdlib, NumPy and Pillow at import; nibabel (orientation arithmetic) is imported when a
scan is prepared (the `flexunet[volumes]` extra).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UserError

log = logging.getLogger(__name__)

PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}   # the RAS axis each slicing plane cuts
OBLIQUE_WARNING_DEG = 10.0    # beyond this a scan's axes are far enough from the body's to say so
SPACING_TOLERANCE = 0.10      # a model-input spacing this far outside the trained range is warned about
_HISTOGRAM_BINS = 4096


# ---------------------------------------------------------------------- step 5: pad and resample
@dataclass(frozen=True)
class Placement:
    """Where an (height, width) slice sits in the padded square that became the model input."""

    height: int
    width: int
    size: int          # the model input's side

    @property
    def side(self) -> int:
        return max(self.height, self.width)

    @property
    def top(self) -> int:
        return (self.side - self.height) // 2

    @property
    def left(self) -> int:
        return (self.side - self.width) // 2

    def restore(self, probs: np.ndarray) -> np.ndarray:
        """Model-size probabilities (size, size, K) -> float32 (height, width, K) on the
        slice's grid: each class resampled bilinearly to the padded square, then cropped."""
        square = resample_probs(probs, self.side, self.side)
        return np.ascontiguousarray(square[self.top: self.top + self.height, self.left: self.left + self.width])

    def spacing(self, row_mm: float, col_mm: float) -> tuple[float, float]:
        """(row, column) pixel spacing at the model input of a slice whose pixels measure
        (row_mm, col_mm): the square is resampled alike along both, so non-square pixels
        stay non-square."""
        return row_mm * self.side / self.size, col_mm * self.side / self.size


def resample_probs(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (height, width, K): each class of (h, w, K) probabilities resampled bilinearly
    (Pillow's, antialiased when shrinking); a copy as is when the size already matches."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape[:2] == (height, width):
        return probs.copy()
    out = np.empty((height, width, probs.shape[-1]), np.float32)
    for c in range(probs.shape[-1]):
        out[..., c] = Image.fromarray(np.ascontiguousarray(probs[..., c]), mode="F").resize((width, height),
                                                                                            Image.BILINEAR)
    return out


def to_model_size(image: np.ndarray, size: int) -> tuple[np.ndarray, Placement]:
    """(h, w) or (h, w, C) uint8 -> the same at (size, size[, C]): padded to a square with
    0 around the centred slice, resampled bilinearly (Pillow's, antialiased when shrinking)."""
    h, w = image.shape[:2]
    place = Placement(h, w, size)
    side = place.side
    padded = image
    if (h, w) != (side, side):
        padded = np.zeros((side, side) + image.shape[2:], image.dtype)
        padded[place.top: place.top + h, place.left: place.left + w] = image
    if side == size:
        return np.ascontiguousarray(padded), place
    plane = padded[..., 0] if padded.ndim == 3 and padded.shape[2] == 1 else padded
    small = np.asarray(Image.fromarray(np.ascontiguousarray(plane)).resize((size, size), Image.BILINEAR))
    return small.reshape((size, size) + image.shape[2:]), place


def labels_to_model_size(labels: np.ndarray, place: Placement) -> np.ndarray:
    """Class ids (h, w) placed as `to_model_size` placed their image, nearest neighbour."""
    side = place.side
    padded = np.zeros((side, side), np.uint8)
    padded[place.top: place.top + place.height, place.left: place.left + place.width] = labels
    if side == place.size:
        return padded
    return np.asarray(Image.fromarray(padded).resize((place.size, place.size), Image.NEAREST))


Forward = Callable[[np.ndarray], np.ndarray]   # float32 (N, s, s, C) -> probabilities (N, s, s, K)


def whole_slice_probs(forward: Forward, image: np.ndarray, size: int) -> np.ndarray:
    """float32 (h, w, K): a whole-slice model's probabilities on the (h, w[, C]) image's own
    grid: one forward pass at the model size, the probabilities restored (module doc)."""
    small, place = to_model_size(image, size)
    return place.restore(np.asarray(forward(small[None].astype(np.float32)))[0])


# ---------------------------------------------------------------------- step 2: normalise
Slabs = Callable[[], Iterable[np.ndarray]]   # a fresh pass over the volume's values, slab by slab


def percentiles(slabs: Slabs, q: tuple[float, float], source: Path | str) -> tuple[float, float]:
    """np.percentile(volume, q) (NumPy's linear rule, to the bit) from slabs, holding one slab
    and the distinct values near each wanted rank: a min/max pass, a histogram pass, then the
    distinct values (with their counts) of the histogram bins holding the wanted order
    statistics. Bad volumes (NaN or infinite voxels, constant) are a one-line UserError
    naming `source`."""
    n, lo, hi, bad = 0, math.inf, -math.inf, 0
    for slab in slabs():
        finite = np.isfinite(slab)
        bad += int(slab.size - np.count_nonzero(finite))
        if slab.size:
            n += slab.size
            lo, hi = min(lo, float(np.min(slab, initial=math.inf, where=finite))), \
                max(hi, float(np.max(slab, initial=-math.inf, where=finite)))
    if bad:
        raise UserError(f"{source}: {bad} voxels are NaN or infinite; clean the volume or mask them out")
    if n == 0:
        raise UserError(f"{source}: the volume is empty")
    if hi <= lo:
        raise UserError(f"{source}: the volume is constant ({lo:g}); not an image")
    ranks = []
    for pct in q:   # NumPy's virtual index and weight, as it computes them, so the result is its to the bit
        position = (n - 1) * (pct / 100.0)
        below = min(int(math.floor(position)), n - 1)
        ranks.append((below, min(below + 1, n - 1), position - math.floor(position)))

    def bins(values: np.ndarray) -> np.ndarray:
        return np.clip(((values - lo) * (_HISTOGRAM_BINS / (hi - lo))).astype(np.int64), 0, _HISTOGRAM_BINS - 1)

    counts = np.zeros(_HISTOGRAM_BINS, np.int64)
    for slab in slabs():
        counts += np.bincount(bins(slab.ravel()), minlength=_HISTOGRAM_BINS)
    before = np.concatenate([[0], np.cumsum(counts)])
    wanted = {r for lo_r, hi_r, _ in ranks for r in (lo_r, hi_r)}
    bin_of = {r: int(np.searchsorted(before, r, side="right")) - 1 for r in wanted}
    # Each wanted bin's distinct values and their counts, slab by slab: a bin holding a
    # scan's whole zero background is then one value and one count, not millions of floats.
    seen: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {b: [] for b in bin_of.values()}
    for slab in slabs():
        flat = slab.ravel()
        which = bins(flat)
        for b in seen:
            values = flat[which == b]
            if values.size:
                seen[b].append(np.unique(values, return_counts=True))
    value = {}
    for r in wanted:
        b = bin_of[r]
        distinct, inverse = np.unique(np.concatenate([u for u, _ in seen[b]]), return_inverse=True)
        cumulative = np.cumsum(np.bincount(inverse, weights=np.concatenate([c for _, c in seen[b]])))
        value[r] = float(distinct[int(np.searchsorted(cumulative, r - before[b], side="right"))])
    low, high = (_lerp(value[a], value[b], f) for a, b, f in ranks)
    if high <= low:
        raise UserError(f"{source}: intensity percentiles {tuple(q)} are equal ({low:g}); nearly constant volume")
    return low, high


def _lerp(a: float, b: float, t: float) -> float:
    """NumPy's own interpolation between two order statistics (np.percentile, 'linear'),
    so the percentiles equal NumPy's to the last bit."""
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def normalise(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high], scale to 0..255, round: uint8."""
    return np.round((np.clip(values, low, high) - low) * (255.0 / (high - low))).astype(np.uint8)


# ---------------------------------------------------------------------- steps 1, 3, 4: geometry
@dataclass(frozen=True)
class ScanGeometry:
    """A scan's voxel grid seen in RAS order and cut into display slices along a plane.

    `ras(array)` is a view of an array in the scan's own voxel order (flips and a
    transposition), so writing into the view writes the scan-order array: predictions go
    back onto the input's grid without a copy.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    plane: str

    @cached_property
    def ornt(self) -> np.ndarray:
        from nibabel.orientations import io_orientation

        return io_orientation(self.affine)

    @property
    def axis(self) -> int:
        """The RAS axis the slices are cut along."""
        return PLANE_AXIS[self.plane]

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel sizes in mm along the scan's own axes (from the affine, which places the voxels)."""
        return tuple(float(z) for z in np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0)))

    @property
    def voxel_ml(self) -> float:
        """A voxel's volume in ml: |det| of the affine (a sheared affine, e.g. a tilted
        gantry, has axes longer than the voxel is deep)."""
        return abs(float(np.linalg.det(np.asarray(self.affine)[:3, :3]))) / 1000.0

    @property
    def ras_zooms(self) -> tuple[float, float, float]:
        z = self.zooms
        return tuple(z[int(np.flatnonzero(self.ornt[:, 0] == k)[0])] for k in range(3))

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[int(np.flatnonzero(self.ornt[:, 0] == k)[0])] for k in range(3))

    @property
    def num_slices(self) -> int:
        return self.ras_shape[self.axis]

    def in_plane_spacing(self) -> tuple[float, float]:
        """(row, column) spacing in mm of a display slice."""
        first, second = [z for i, z in enumerate(self.ras_zooms) if i != self.axis]
        return second, first

    def obliquity_deg(self) -> float:
        """Largest angle between a voxel axis and the world axis it is taken for."""
        m = np.asarray(self.affine)[:3, :3]
        cosines = np.abs(m) / np.maximum(np.sqrt((m ** 2).sum(axis=0)), 1e-12)
        return float(np.degrees(np.arccos(np.clip(cosines.max(axis=0).min(), 0.0, 1.0))))

    def ras(self, array: np.ndarray) -> np.ndarray:
        """`array` (scan voxel order, with any trailing axes) as a RAS-ordered view."""
        from nibabel.orientations import apply_orientation

        return apply_orientation(array, self.ornt)

    def display(self, ras: np.ndarray, k: int) -> np.ndarray:
        """Slice k of a RAS-ordered array, displayed (superior or anterior up, the patient's
        right on the left); trailing axes (classes) are kept."""
        cut = np.take(ras, k, axis=self.axis)
        return np.flip(np.swapaxes(cut, 0, 1), axis=(0, 1))

    def put(self, ras: np.ndarray, k: int, displayed: np.ndarray) -> None:
        """Write a displayed slice back into slice k of a RAS-ordered array (the inverse of display)."""
        index = [slice(None)] * 3
        index[self.axis] = k
        ras[tuple(index)] = np.swapaxes(np.flip(displayed, axis=(0, 1)), 0, 1)

    def stack_to_ras(self, stack: np.ndarray) -> np.ndarray:
        """Display slices (n, h, w, ...) in slice order -> one RAS-ordered array."""
        shape = list(self.ras_shape) + list(stack.shape[3:])
        out = np.zeros(shape, stack.dtype)
        for k, displayed in enumerate(stack):
            self.put(out, k, displayed)
        return out


def display_geometry(num_slices: int, height: int, width: int,
                     spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0), plane: str = "coronal") -> ScanGeometry:
    """The geometry of a stack of display slices (slice, row, column) in slice order with
    (slice, row, column) spacing: what prepare writes (synthetic scans, the kidney-nifti
    import), so evaluate can put its slices back into RAS for the volume rules (which need
    the axes, not the spacing)."""
    axis = PLANE_AXIS[plane]
    rest = [a for a in range(3) if a != axis]
    ras_shape = [0, 0, 0]
    ras_shape[axis], ras_shape[rest[0]], ras_shape[rest[1]] = num_slices, width, height
    zooms = [0.0, 0.0, 0.0]
    zooms[axis], zooms[rest[0]], zooms[rest[1]] = spacing_mm[0], spacing_mm[2], spacing_mm[1]
    return ScanGeometry(tuple(ras_shape), np.diag([*zooms, 1.0]), plane)


# ---------------------------------------------------------------------- the whole preparation
@dataclass
class PreparedScan:
    """A scan normalised to uint8 on its own voxel grid, with the geometry to cut display
    slices and put predictions back."""

    geometry: ScanGeometry
    image: np.ndarray            # uint8, the scan's voxel order
    window: tuple[float, float]  # the intensity percentiles' values mapped to 0 and 255

    @property
    def num_slices(self) -> int:
        return self.geometry.num_slices

    def display(self, k: int) -> np.ndarray:
        """uint8 (h, w) display slice k."""
        return np.ascontiguousarray(self.geometry.display(self.geometry.ras(self.image), k))

    def model_slice(self, k: int, size: int) -> tuple[np.ndarray, Placement]:
        """Display slice k padded and resampled to the model size (step 5)."""
        return to_model_size(self.display(k), size)


def prepare_scan(slabs: Slabs, shape: tuple[int, int, int], affine: np.ndarray, *, plane: str,
                 intensity_percentiles: tuple[float, float], source: Path | str) -> PreparedScan:
    """Steps 1-4 for a scan read slab by slab (each slab (X, Y, k) along the scan's last
    axis, in order): exact percentiles, then the normalised uint8 volume, one slab at a time.
    Warns once when the scan is more than OBLIQUE_WARNING_DEG oblique."""
    if plane not in PLANE_AXIS:
        raise UserError(f"{source}: slicing plane {plane!r}; use one of {', '.join(PLANE_AXIS)}")
    geometry = ScanGeometry(tuple(int(s) for s in shape), np.asarray(affine, np.float64), plane)
    angle = geometry.obliquity_deg()
    if angle > OBLIQUE_WARNING_DEG:
        log.warning("%s: the scan's axes are %.1f degrees oblique to the body's; its slices are cut along the "
                    "closest canonical axes, as training slices were, and the outputs keep its exact affine",
                    source, angle)
    low, high = percentiles(slabs, intensity_percentiles, source)
    image = np.empty(geometry.shape, np.uint8)
    k0 = 0
    for slab in slabs():
        image[..., k0: k0 + slab.shape[2]] = normalise(slab, low, high)
        k0 += slab.shape[2]
    return PreparedScan(geometry, image, (low, high))


def in_memory(volume: np.ndarray, slab: int = 16) -> Slabs:
    """Slabs of an in-memory (X, Y, Z) volume, as a reader yields them."""
    def passes() -> Iterator[np.ndarray]:
        for k in range(0, volume.shape[2], slab):
            yield np.asarray(volume[..., k: k + slab], dtype=np.float64)
    return passes


# ---------------------------------------------------------------------- scale
def check_spacing(spacing: tuple[float, float] | None, card_range: tuple[float, float] | None, unit: str,
                  source: Path | str) -> None:
    """Warn when an input's (row, column) pixel spacing at the model input lies outside the
    range the training data covered (by more than SPACING_TOLERANCE), along either axis."""
    if spacing is None or card_range is None:
        return
    lo, hi = card_range
    outside = [s for s in spacing if s < lo * (1 - SPACING_TOLERANCE) or s > hi * (1 + SPACING_TOLERANCE)]
    if outside:
        shown = f"{spacing[0]:.3g}" if spacing[0] == spacing[1] else f"{spacing[0]:.3g} x {spacing[1]:.3g}"
        log.warning("%s: %s %s per pixel at the model input, outside the %.3g-%.3g %s/px the model was trained "
                    "on; its sizes will look wrong to the model (check --spacing or the file's header)",
                    source, shown, unit, lo, hi, unit)
