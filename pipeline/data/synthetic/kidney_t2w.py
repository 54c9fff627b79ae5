"""Synthetic coronal T2-weighted kidney MRI, healthy vs CKD (after Daniel et al. 2021).

Anatomy is described in millimetres in a patient frame (x: image left -> right, i.e. the
patient's right -> left; y: head -> feet; z: anterior -> posterior), so a subject looks
the same at every image_size. A scan only adds a rigid offset, a bias field and noise.

Every painting step also writes a tissue label (`Tissue`) when asked, so the same anatomy
can be rendered a second way: `appearance="randomised"` hands each slice's label map to
`randomise.render_slice` (SynthSeg-style domain randomisation: new contrasts, deformation,
bias, blur, noise, gamma per slice), because a model trained on one fixed grey rendering
learns that rendering rather than the anatomy. The label painting never moves a pixel of
the realistic rendering (pinned in tests/unit/data/test_randomise.py).

Once contrasts are random, shape is what a model learns, so the anatomy's shape ranges are
those of adult kidneys rather than one bean: coronal widths 5-8 cm against lengths 9-13 cm,
tilt and curvature, a renal sinus from a shallow notch to a deep C, urine in the pelvis, and
simple cysts (common in CKD). Pelvis and cysts are not kidney in the mask, as in real masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

import numpy as np
from scipy import ndimage

from pipeline.config.schema import RandomiseParams
from pipeline.data.synthetic import detmath, randomise

GROUPS: tuple[str, str] = ("CKD", "healthy")
FOV_MM = 384.0  # 256 px x 1.5 mm, kept constant so physical size never depends on image_size
SLICE_MM = 5.0
_TEXTURE_MM = (5.0, 12.0, 30.0)  # fine tissue grain, bowel loops, organ-scale shading
_MARGIN_MM = 60.0  # texture grid reaches past the FOV so rigid offsets never leave it
_BODY_DEPTH_MM = 120.0  # half AP depth of the trunk: coronal width shrinks away from z = 0


class Tissue(IntEnum):
    """Label map values: one per tissue the painter draws with its own signal. Each kidney
    has its own cortex and medulla labels, as its cortico-medullary contrast is its own."""
    AIR = 0
    SKIN_FAT = 1
    WALL_MUSCLE = 2
    ABDOMEN = 3
    LUNG = 4
    HEART = 5
    LIVER = 6
    SPLEEN = 7
    BOWEL_FLUID = 8
    BOWEL_GAS = 9
    BOWEL_WALL = 10
    PSOAS = 11
    VERTEBRA = 12
    DISC = 13
    BACK_MUSCLE = 14
    CSF = 15
    CORD = 16
    PERIRENAL_FAT = 17
    HILUM = 18
    CORTEX_R = 19    # image left: the patient's right kidney
    MEDULLA_R = 20
    CORTEX_L = 21
    MEDULLA_L = 22
    RENAL_FLUID = 23  # urine in the renal pelvis, and cysts: outside the kidney mask, as in the real masks


Appearance = Literal["realistic", "randomised"]


@dataclass(frozen=True)
class SubjectSpec:
    subject_id: str  # "sub-001", "sub-002", ... (1-based)
    group: str  # "CKD" or "healthy"
    n_scans: int  # 1, or repeat_scans for repeat-scan subjects


@dataclass(frozen=True)
class ScanVolume:
    image: np.ndarray  # (Z, H, W) uint8 T2w-looking grey volume
    kidney: np.ndarray  # (Z, H, W) bool, both kidneys
    spacing_mm: tuple[float, float, float]  # (z, y, x) voxel size
    labels: np.ndarray | None = None  # (Z, H, W) uint8 Tissue map in the image's frame (randomised only)


@dataclass(frozen=True)
class _Kidney:
    centre: tuple[float, float, float]  # (z, y, x) mm
    axes: tuple[float, float, float]  # semi-axes (AP depth, length, width) mm
    tilt: float  # radians; the upper pole leans towards the spine
    bend: float  # bean curvature: the waist sits lateral of the poles
    cortex: float  # cortex thickness as a fraction of the radius
    level: float  # cortex signal
    contrast: float  # medulla is darker than cortex by this fraction
    patchiness: float  # scarring-like heterogeneity
    outline: tuple[tuple[float, float], ...]  # (amplitude, phase) of outline harmonics 2, 3, ...
    pyramids: int
    phase: float
    sinus: tuple[float, float]  # renal sinus (hilum notch) half-depth and half-height, fractions of the radius
    cysts: tuple[tuple[float, float, float, float], ...]  # (p, q, z offset mm, radius mm) in the kidney's frame


@dataclass(frozen=True)
class _Anatomy:
    number: int
    half_width: float
    half_height: float
    fat: float
    outline: tuple[tuple[float, float], ...]
    domes: tuple[float, float]  # right / left diaphragm apex y
    liver_edge: float  # y of the liver tip at the lateral wall
    spleen: tuple[float, float, float, float]  # centre y, centre x, half-length, half-width
    spine: tuple[float, float, float]  # x offset, scoliosis bend, disc phase
    bowel: float  # loop threshold: higher = fewer loops
    slab_z: float  # where the slab centre sits relative to the kidneys
    kidneys: tuple[_Kidney, ...]


def _key(seed: int) -> int:
    return int(seed) % 2**64  # default_rng only takes non-negative entropy


def _number(subject_id: str) -> int:
    digits = "".join(c for c in subject_id if c.isdigit())
    return int(digits) if digits else 0


# ---------------------------------------------------------------- subjects and anatomy

def make_subjects(num_subjects: int, repeat_fraction: float, repeat_scans: int, seed: int) -> list[SubjectSpec]:
    """Subjects with exactly round(n/2) CKD; about repeat_fraction of them (both groups) rescanned."""
    rng = np.random.default_rng([_key(seed), 1, 7])
    n_ckd = round(num_subjects / 2)
    groups = [GROUPS[0]] * n_ckd + [GROUPS[1]] * (num_subjects - n_ckd)
    groups = [groups[i] for i in rng.permutation(num_subjects)]
    n_repeat = round(repeat_fraction * num_subjects)
    if repeat_fraction > 0 and num_subjects >= 3:
        n_repeat = max(1, n_repeat)
    # Alternate between the groups so any two or more repeat subjects cover both.
    pools = [[int(i) for i in rng.permutation([i for i, g in enumerate(groups) if g == name])] for name in GROUPS]
    if rng.integers(2):
        pools.reverse()
    repeat = set([p[i] for i in range(num_subjects) for p in pools if i < len(p)][:n_repeat])
    return [SubjectSpec(f"sub-{i + 1:03d}", g, repeat_scans if i in repeat else 1) for i, g in enumerate(groups)]


def _kidney(rng: np.random.Generator, side: int, healthy: bool, size: float) -> _Kidney:
    s = size * rng.normal(1.0, 0.03)
    # The right kidney (image left, side -1) sits lower: the liver pushes it down.
    centre = (rng.uniform(-2, 2), (12.0 if side < 0 else -8.0) + rng.uniform(-10, 10), side * rng.uniform(58, 70))
    # (AP depth, length, width): length 9-13 cm and width 5-8 cm (adult kidneys), so a
    # coronal section's width varies as much as real ones do rather than one bean shape.
    axes = (float(19.0 * s * rng.normal(1.0, 0.1)), float(s * rng.uniform(45.0, 65.0)), float(s * rng.uniform(24.0, 40.0)))

    def pick(healthy_range: tuple[float, float], ckd_range: tuple[float, float]) -> float:
        return float(rng.uniform(*(healthy_range if healthy else ckd_range)))

    return _Kidney(
        centre=centre, axes=axes, tilt=rng.uniform(-0.05, 0.45), bend=rng.uniform(0.04, 0.25),
        cortex=pick((0.15, 0.2), (0.07, 0.11)), level=pick((0.62, 0.7), (0.52, 0.6)),
        contrast=pick((0.28, 0.4), (0.06, 0.12)), patchiness=pick((0.03, 0.06), (0.06, 0.1)),
        outline=tuple((rng.uniform(0, 0.015 if healthy else 0.045), rng.uniform(0, 2 * np.pi)) for _ in range(4)),
        pyramids=int(rng.integers(6, 9)), phase=rng.uniform(0, 2 * np.pi),
        sinus=(float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.2, 0.5))),
        # Simple cysts: common in CKD, occasional in healthy kidneys; bright fluid on T2.
        cysts=tuple((float(rng.uniform(-0.6, 0.5)), float(rng.uniform(-0.75, 0.75)), float(rng.uniform(-8, 8)),
                     float(rng.uniform(3.0, 9.0))) for _ in range(int(rng.integers(0, 2 if healthy else 5)))))


def _anatomy(subject: SubjectSpec, seed: int) -> _Anatomy:
    number = _number(subject.subject_id)
    rng = np.random.default_rng([_key(seed), number])
    healthy = subject.group == GROUPS[1]
    # CKD kidneys ~35 % smaller by volume (CKD kidneys shrink as nephrons are
    # lost); the spread lets the groups overlap a little in size alone.
    size = (1.0 if healthy else 0.87) + float(np.clip(rng.normal(0, 0.07), -0.15, 0.15))
    kidneys = tuple(_kidney(rng, side, healthy, size) for side in (-1, 1))
    return _Anatomy(
        number=number, half_width=rng.uniform(140, 172), half_height=rng.uniform(230, 280), fat=rng.uniform(8, 24),
        outline=tuple((rng.uniform(0, 0.02), rng.uniform(0, 2 * np.pi)) for _ in range(4)),
        domes=(rng.uniform(-140, -120), rng.uniform(-130, -110)), liver_edge=rng.uniform(40, 90),
        spleen=(rng.uniform(-80, -60), rng.uniform(100, 120), rng.uniform(45, 60), rng.uniform(22, 32)),
        spine=(rng.uniform(-5, 5), rng.uniform(-4, 4), rng.uniform(0, 36)), bowel=rng.uniform(0.3, 0.5),
        slab_z=rng.uniform(-2, 2), kidneys=kidneys)


# ---------------------------------------------------------------- smooth noise

def _taps(coords: np.ndarray, start: float, step: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline taps (indices (N, 4), weights (N, 4)) from grid nodes start + k*step."""
    return detmath.bspline_taps((np.asarray(coords, np.float64) - start) / step, n)


def _textures(seed: int, number: int, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> list[np.ndarray]:
    """Smooth unit-ish noise (Z, H, W) per scale, fixed to anatomy: each z layer has its own rng,
    so the texture does not depend on num_slices, image_size or the scan offset."""
    fields = []
    for scale, step in enumerate(_TEXTURE_MM):
        lo = -FOV_MM / 2 - _MARGIN_MM
        n = int(np.ceil((FOV_MM + 2 * _MARGIN_MM) / step)) + 2
        z_step = max(step, SLICE_MM)
        k0, k1 = int(np.floor(z.min() / z_step)) - 1, int(np.floor(z.max() / z_step)) + 3
        layers = np.stack([np.random.default_rng([_key(seed), number, 3, scale + 1, k + 2**20])
                           .standard_normal((n, n), dtype=np.float32) for k in range(k0, k1)])
        g = detmath.bspline_resample(layers, _taps(z, k0 * z_step, z_step, k1 - k0), 0)
        g = detmath.bspline_resample(g, _taps(y, lo, step, n), 1)
        fields.append(2.8 * detmath.bspline_resample(g, _taps(x, lo, step, n), 2))
    return fields


# ---------------------------------------------------------------- anatomy painting

def _paint(sig: np.ndarray, lab: np.ndarray | None, value, label, where: np.ndarray) -> None:
    """Write a signal (and, when a label map is kept, its tissue label) where `where` holds."""
    np.copyto(sig, value, where=where)
    if lab is not None:
        np.copyto(lab, np.asarray(label, np.uint8), where=where)


def _body(a: _Anatomy, z: np.ndarray, y: np.ndarray, x: np.ndarray,
          lab: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Signal of skin fat / wall muscle / abdomen, and the inside-the-wall mask."""
    X, Y = x[None, :], y[:, None]
    theta = detmath.arctan2(Y / a.half_height, X / a.half_width)
    wobble = 1 + sum(amp * detmath.cos(k * theta + ph) for k, (amp, ph) in enumerate(a.outline, 2))
    rho = detmath.power(detmath.power(np.abs(X) / a.half_width, 2.8)
                        + detmath.power(np.abs(Y) / a.half_height, 2.8), 1 / 2.8) * wobble
    s = np.sqrt(np.clip(1 - (z / _BODY_DEPTH_MM) ** 2, 0.05, 1))[:, None, None]
    depth = (s - rho[None].astype(np.float32)) * a.half_width  # mm below the skin
    inner = depth >= a.fat + 9
    sig = np.where(depth < 0, 0.0, np.where(depth < a.fat, 0.8, np.where(inner, 0.62, 0.24)))
    if lab is not None:
        lab[...] = np.where(depth < 0, Tissue.AIR, np.where(depth < a.fat, Tissue.SKIN_FAT, np.where(
            inner, Tissue.ABDOMEN, Tissue.WALL_MUSCLE)))
    return sig.astype(np.float32), inner


def _organs(sig: np.ndarray, inner: np.ndarray, a: _Anatomy, z: np.ndarray, y: np.ndarray,
            x: np.ndarray, tex: list[np.ndarray], lab: np.ndarray | None = None) -> None:
    """Lungs and heart above the domes, liver, spleen, bowel loops; edges wobble with the
    coarse texture so no organ has a ruler-straight border."""
    Z, Y, X = z[:, None, None], y[None, :, None], x[None, None, :]
    wavy = 8 * tex[2]
    dome = np.where(X < 0, a.domes[0] + 0.01 * (X + 70) ** 2, a.domes[1] + 0.01 * (X - 70) ** 2) + 0.5 * Z
    chest = inner & (Y < dome + wavy / 2)
    heart = ((X - 15) / 65) ** 2 + ((Y - sum(a.domes) / 2 + 15) / 55) ** 2 + ((Z + 45) / 45) ** 2 < 1
    _paint(sig, lab, np.where(heart, 0.3, 0.04), np.where(heart, Tissue.HEART, Tissue.LUNG), chest)
    liver = (X < -5 - 1.5 * Z + wavy) & (Y < a.liver_edge - 0.004 * (X + a.half_width) ** 2 + wavy)
    liver &= inner & ~chest
    _paint(sig, lab, 0.27, Tissue.LIVER, liver)
    sy, sx, sl, sw = a.spleen
    sx = min(sx, a.half_width - a.fat - sw - 12)
    spleen = ((Y - sy) / sl) ** 2 + ((X - sx) / sw) ** 2 + ((Z - 15) / 35) ** 2 < 1 + 0.1 * tex[2]
    spleen &= inner & ~chest
    _paint(sig, lab, 0.45, Tissue.SPLEEN, spleen)
    # Loops follow the zero set of smooth noise, which gives winding tubes rather than blobs.
    loops = inner & ~chest & ~liver & ~spleen & (Y > -50 + 0.25 * np.abs(X) + wavy)
    loops &= np.abs(tex[2] + 0.35 * tex[1]) < a.bowel - 0.004 * Z
    content = np.where(tex[1] > 0.2, 0.85, np.where(tex[0] < -2.2, 0.05, 0.33))
    kind = np.where(tex[1] > 0.2, Tissue.BOWEL_FLUID, np.where(tex[0] < -2.2, Tissue.BOWEL_GAS, Tissue.BOWEL_WALL))
    _paint(sig, lab, content, kind, loops)


def _spine(sig: np.ndarray, inner: np.ndarray, a: _Anatomy, z: np.ndarray, y: np.ndarray, x: np.ndarray,
           lab: np.ndarray | None = None) -> None:
    """Vertebral bodies with bright discs, psoas, and the CSF column in posterior slices."""
    dx = np.abs(x[None, :] - a.spine[0] - a.spine[1] * (y[:, None] / 100) ** 2)
    yy = y[:, None]
    zz = z[:, None, None]
    disc = (yy - a.spine[2]) % 36 < 7
    psoas = (yy > -15) & (dx > 20) & (dx < 24 + 0.13 * (yy + 15))
    _paint(sig, lab, 0.22, Tissue.PSOAS, inner & psoas & (zz > -10) & (zz < 25))
    _paint(sig, lab, np.where(disc, 0.68, 0.42), np.where(disc, Tissue.DISC, Tissue.VERTEBRA),
           inner & (dx < 21) & (zz > -18) & (zz < 20))
    _paint(sig, lab, 0.25, Tissue.BACK_MUSCLE, inner & (dx > 9) & (dx < 55) & (zz >= 24))
    cord = (dx < 3.5) & (yy < 20)
    _paint(sig, lab, np.where(cord, 0.45, 0.95), np.where(cord, Tissue.CORD, Tissue.CSF),
           inner & (dx < 8) & (zz >= 20) & (zz < 38))


def _tissues(k: _Kidney) -> tuple[Tissue, Tissue]:
    """(cortex, medulla) labels of a kidney: image left (x < 0) is the patient's right."""
    return (Tissue.CORTEX_R, Tissue.MEDULLA_R) if k.centre[2] < 0 else (Tissue.CORTEX_L, Tissue.MEDULLA_L)


def _span(coords: np.ndarray, centre: float, reach: float) -> slice:
    return slice(int(np.searchsorted(coords, centre - reach)), int(np.searchsorted(coords, centre + reach)))


def _kidney_paint(sig: np.ndarray, mask: np.ndarray, k: _Kidney, z: np.ndarray, y: np.ndarray,
                  x: np.ndarray, tex: np.ndarray, lab: np.ndarray | None = None) -> None:
    """Perirenal fat, hilum vessels, urine in the renal pelvis and cysts, then cortex /
    pyramids / columns; mask = the parenchyma drawn (sinus, pelvis and cysts left out)."""
    (cz, cy, cx), (depth, length, width) = k.centre, k.axes
    ys, xs = _span(y, cy, 1.5 * length), _span(x, cx, 1.5 * length)
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return
    dy, dx = y[ys, None] - cy, x[None, xs] - cx
    m = -np.sign(cx) or 1.0  # +1: the spine (medial side) is towards +x
    q = (dx * -m * detmath.sin(k.tilt) + dy * detmath.cos(k.tilt)) / length
    p = (dx * m * detmath.cos(k.tilt) + dy * detmath.sin(k.tilt)) / width + k.bend * (1 - q ** 2)
    theta = detmath.arctan2(q, p)
    rb = 1 + sum(amp * detmath.cos(j * theta + ph) for j, (amp, ph) in enumerate(k.outline, 2))
    w2 = (((z - cz) / depth) ** 2)[:, None, None]
    r = np.sqrt(((p ** 2 + q ** 2) / rb ** 2)[None] + w2).astype(np.float32)
    notch = (((p - 0.95) / k.sinus[0]) ** 2 + (q / k.sinus[1]) ** 2)[None] + w2 / 0.75 ** 2 < 1
    vessel = (((p - 1.12) / 0.22) ** 2 + (q / 0.12) ** 2)[None] + w2 / 0.5 ** 2 < 1
    cyst = np.zeros_like(notch)
    for pc, qc, zc, rc in k.cysts:
        cyst |= ((((p - pc) * width / rc) ** 2 + ((q - qc) * length / rc) ** 2)[None]
                 + (((z - cz - zc) / rc) ** 2)[:, None, None]) < 1
    pelvis = (((p - 0.8) / (0.7 * k.sinus[0])) ** 2 + (q / (0.7 * k.sinus[1])) ** 2)[None] + w2 / 0.6 ** 2 < 1
    inside = (r < 1) & ~notch & ~cyst
    box = sig[:, ys, xs]
    lbox = None if lab is None else lab[:, ys, xs]
    _paint(box, lbox, 0.4, Tissue.PERIRENAL_FAT, (r < 1.2) & ~inside)
    _paint(box, lbox, 0.12, Tissue.HILUM, vessel)
    _paint(box, lbox, 0.9, Tissue.RENAL_FLUID, (notch & pelvis) | cyst)
    outer = (r > 1 - k.cortex) | ((detmath.cos(k.pyramids * theta + k.phase) > 0.75) & (r > 0.35))
    level = np.where(outer, k.level, k.level * (1 - k.contrast)) * (1 + k.patchiness * tex[:, ys, xs])
    cortex, medulla = _tissues(k)
    _paint(box, lbox, level, np.where(outer, cortex, medulla), inside)
    mask[:, ys, xs] |= inside


# ---------------------------------------------------------------- scan

def render_scan(subject: SubjectSpec, scan_index: int, image_size: int, num_slices: int, seed: int,
                appearance: Appearance = "realistic",
                ranges: RandomiseParams | None = None, slice_mm: float = SLICE_MM) -> ScanVolume:
    """One coronal T2w volume (num_slices, image_size, image_size) uint8 + its kidney mask.

    appearance="randomised": each slice re-rendered from its tissue label map with `ranges`
    (params.yaml `dataset.randomise`; default: RandomiseParams' defaults), deformed with its mask; deterministic for (seed,
    subject, scan, slice)."""
    a = _anatomy(subject, seed)
    rng = np.random.default_rng([_key(seed), a.number, 2, scan_index + 1])
    px = FOV_MM / image_size
    shift = np.array([rng.uniform(-1, 1), *rng.uniform(-0.03, 0.03, 2) * FOV_MM])  # (z, y, x) mm
    scanner_z = (np.arange(num_slices) - (num_slices - 1) / 2) * slice_mm
    scanner_xy = (np.arange(image_size) + 0.5 - image_size / 2) * px
    # Anatomy coordinates of the voxel centres: the subject moved by `shift` inside the scanner.
    z = (scanner_z + a.slab_z - shift[0]).astype(np.float32)
    y, x = ((scanner_xy - d).astype(np.float32) for d in shift[1:])
    tex = _textures(seed, a.number, z, y, x)
    lab = np.zeros((len(z), len(y), len(x)), np.uint8) if appearance == "randomised" else None
    sig, inner = _body(a, z, y, x, lab)
    _organs(sig, inner, a, z, y, x, tex, lab)
    _spine(sig, inner, a, z, y, x, lab)
    kidney = np.zeros(sig.shape, bool)
    for k in a.kidneys:
        _kidney_paint(sig, kidney, k, z, y, x, tex[0], lab)
    sig *= 1 + 0.06 * tex[0] + 0.05 * tex[2]
    sig = ndimage.gaussian_filter(sig, (0, 0.6, 0.6), truncate=3.0)  # point-spread: soften drawn edges
    image = _acquire(sig, rng, scanner_z, scanner_xy)
    if lab is None:
        return ScanVolume(image, kidney, (slice_mm, px, px))
    return _randomised(image, lab, tex[0], a, scan_index, seed, px, ranges or RandomiseParams(), slice_mm)


def _randomised(image: np.ndarray, lab: np.ndarray, tex: np.ndarray, a: _Anatomy, scan_index: int, seed: int,
                px: float, ranges: RandomiseParams, slice_mm: float = SLICE_MM) -> ScanVolume:
    """Every slice re-rendered from its label map; the mask is read off the deformed labels,
    so it follows the deformation exactly."""
    # What tells CKD from healthy once absolute intensities are random: each kidney's
    # medulla relative to its own cortex, and its scarring-like patchiness.
    structure = [randomise.KidneyTissue(*map(int, _tissues(k)), k.contrast, k.patchiness) for k in a.kidneys]
    images, labels = np.empty_like(image), np.empty_like(lab)
    for z in range(image.shape[0]):
        rng = np.random.default_rng([_key(seed), a.number, 5, scan_index + 1, z])
        images[z], labels[z] = randomise.render_slice(lab[z], image[z], tex[z], structure, len(Tissue), px, rng, ranges)
    kidney = np.isin(labels, [t for k in structure for t in (k.cortex, k.medulla)])
    return ScanVolume(images, kidney, (slice_mm, px, px), labels)


def _acquire(sig: np.ndarray, rng: np.random.Generator, z: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Smooth multiplicative coil bias (scanner frame) then Rician noise, to uint8."""
    step, n = 110.0, 8  # in-plane nodes every 110 mm: a coil profile, no anatomy-sized detail
    grid = rng.standard_normal((3, n, n)).astype(np.float32)
    field = detmath.bspline_resample(grid, _taps(z, -200.0, 200.0, 3), 0)
    taps = _taps(xy, -step * (n / 2 - 1), step, n)
    sig *= detmath.exp(0.35 * detmath.bspline_resample(detmath.bspline_resample(field, taps, 1), taps, 2))
    mag = detmath.rician(sig, np.float32(rng.uniform(0.02, 0.035)), rng)
    return np.clip(mag * (255 / 0.95) + 0.5, 0, 255).astype(np.uint8)
