"""Synthetic PAS-stained renal cortex with glomerulus masks, drawn at a stated µm per pixel.

Label map first, appearance second, as the kidney generator does: `tissue_labels` draws one
label per structure (tubules with basement membrane, cytoplasm, brush border, lumen and
basal nuclei; interstitium; arterioles; glass at the tissue's edge and in tears;
glomeruli as a lobulated capillary tuft of mesangium, capillary lumens and nuclei inside
Bowman's space and capsule, some sclerotic), then `pipeline.data.synthetic.stain` colours
the labels through the two stains of a PAS section. The mask is exactly the pixels whose
label is one of GLOMERULUS: Bowman's capsule and all it holds, as pathologists outline a
glomerulus.

Every length is in µm and converted with the tile's µm/px, so the tiles show the sizes of
real cortex at the resolution the model card states (docs/data.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.config.schema import StainParams
from pipeline.data.synthetic import detmath, stain
from pipeline.data.synthetic.randomise import smooth_field

# ---------------------------------------------------------------- labels
(GLASS, INTERSTITIUM, MEMBRANE, CYTOPLASM, PALE_CYTOPLASM, BRUSH, LUMEN, NUCLEUS, STROMA_NUCLEUS,
 VESSEL_WALL, VESSEL_LUMEN, CAPSULE, BOWMAN, PARIETAL_NUCLEUS, MESANGIUM, CAPILLARY, TUFT_NUCLEUS,
 SCLEROSIS, TUFT_CELL) = range(19)
NUM_LABELS = 19
GLOMERULUS = (CAPSULE, BOWMAN, PARIETAL_NUCLEUS, MESANGIUM, CAPILLARY, TUFT_NUCLEUS, SCLEROSIS, TUFT_CELL)

# ---------------------------------------------------------------- sizes, µm
# Outer diameter of Bowman's capsule. Glomerular profiles in sections of adult human
# cortex are about 100-200 µm across (tufts 150-200 µm; a section through a sphere off
# its equator cuts a smaller disc); the real sample's glomeruli span 90-190 µm at its
# assumed 0.5 µm/px (data/real-sample/glomeruli-pas/README.md).
GLOMERULUS_DIAMETER_UM = (100.0, 200.0)
TUBULE_PITCH_UM = 62.0        # proximal tubules 50-70 µm across, packed
NUCLEUS_UM = 7.0              # epithelial nuclei 6-8 µm
MEMBRANE_UM = 2.0             # PAS+ tubular basement membrane (thickened 1-3 µm at this scale)
INTERSTITIUM_UM = 3.0         # between tubules in healthy cortex
CAPILLARY_PITCH_UM = 11.0     # glomerular capillary loops
SCLEROTIC_FRACTION = 0.15     # glomeruli drawn globally sclerosed
DEFAULT_MPP = 2.0             # the glomeruli preset's dataset.mpp

# ---------------------------------------------------------------- appearance
# Per label: haematoxylin and PAS amounts (OD along the stains' unit vectors) of a typical
# section, and how grainy the label is (relative amplitude of its texture).
_STAIN = {
    GLASS: (0.0, 0.0, 0.0), INTERSTITIUM: (0.06, 0.3, 0.4), MEMBRANE: (0.2, 1.2, 0.15),
    CYTOPLASM: (0.06, 0.26, 0.7), PALE_CYTOPLASM: (0.04, 0.12, 0.8), BRUSH: (0.08, 0.55, 0.3),
    LUMEN: (0.01, 0.04, 0.5), NUCLEUS: (1.15, 0.2, 0.25), STROMA_NUCLEUS: (1.3, 0.2, 0.2),
    VESSEL_WALL: (0.14, 0.65, 0.35), VESSEL_LUMEN: (0.01, 0.04, 0.5), CAPSULE: (0.18, 1.15, 0.15),
    BOWMAN: (0.01, 0.04, 0.5), PARIETAL_NUCLEUS: (1.1, 0.2, 0.2), MESANGIUM: (0.25, 1.1, 0.3),
    CAPILLARY: (0.02, 0.07, 0.6), TUFT_NUCLEUS: (1.3, 0.3, 0.2), SCLEROSIS: (0.12, 0.8, 0.1),
    TUFT_CELL: (0.1, 0.38, 0.5),
}
STAIN_AMOUNTS = np.array([_STAIN[k][:2] for k in range(NUM_LABELS)])
TEXTURE = np.array([_STAIN[k][2] for k in range(NUM_LABELS)], np.float32)


@dataclass(frozen=True)
class Glomerulus:
    cy: float                 # centre, px
    cx: float
    radius: float             # outer capsule radius along the long axis, px
    aspect: float             # short / long axis
    angle: float
    capsule: float            # capsule thickness, px
    space: float              # Bowman's space at its widest, fraction of the radius
    pole: float               # direction the tuft is pushed to (the vascular pole opposite), rad
    lobes: tuple[tuple[float, float], ...]   # (angle, size) of each lobule
    harmonics: tuple[tuple[float, float], ...]   # (amplitude, phase) of the outline's 2nd, 3rd, ... harmonic
    sclerotic: bool


# ---------------------------------------------------------------- noise helpers

def _blocks(size: int, cell: int) -> tuple[int, np.ndarray]:
    """Cells per side and in-cell pixel centres; the image is handled as (n, cell, n, cell)
    blocks so each pixel meets only its own and neighbouring cells' points."""
    return -(-size // cell), np.arange(cell, dtype=np.float32) + 0.5


def _unblock(a: np.ndarray, size: int) -> np.ndarray:
    n, c = a.shape[0], a.shape[1]
    return a.reshape(n * c, n * c)[:size, :size]


def worley(rng: np.random.Generator, size: int, cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jittered-grid Voronoi cells: distance to own centre, half the distance margin to the
    nearest neighbour's centre (0 on a cell border), and a uniform per-cell attribute."""
    n, local = _blocks(size, cell)
    jitter = rng.uniform(0.1, 0.9, (2, n + 2, n + 2)).astype(np.float32)
    attr = rng.uniform(0, 1, (n + 2, n + 2)).astype(np.float32)
    base = np.arange(-1, n + 1, dtype=np.float32)
    py, px = (base[:, None] + jitter[0]) * cell, (base[None, :] + jitter[1]) * cell
    yy = (np.arange(n, dtype=np.float32)[:, None] * cell + local)[:, :, None, None]
    xx = (np.arange(n, dtype=np.float32)[:, None] * cell + local)[None, None]
    d1 = np.full((n, cell, n, cell), np.inf, np.float32)
    d2, a = d1.copy(), np.zeros_like(d1)
    for oy in range(3):
        for ox in range(3):
            sel = (slice(oy, oy + n), slice(ox, ox + n))
            d = (yy - py[sel][:, None, :, None]) ** 2 + (xx - px[sel][:, None, :, None]) ** 2
            closer = d < d1
            d2 = np.where(closer, d1, np.minimum(d2, d))
            a = np.where(closer, attr[sel][:, None, :, None], a)
            d1 = np.minimum(d, d1)
    r1, r2 = np.sqrt(d1), np.sqrt(d2)
    return _unblock(r1, size), _unblock((r2 - r1) / 2, size), _unblock(a, size)


def dots(rng: np.random.Generator, size: int, cell: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One round dot per cell (nuclei) and a per-dot uniform, so callers keep a share of them."""
    n, local = _blocks(size, cell)
    r = (radius * rng.uniform(0.75, 1.25, (n, n))).astype(np.float32)
    fit = np.minimum(r, cell / 2)
    cy, cx = (fit + rng.uniform(0, 1, (2, n, n)) * np.maximum(cell - 2 * fit, 0)).astype(np.float32)
    d2 = (local[None, :, None, None] - cy[:, None, :, None]) ** 2
    d2 = d2 + (local[None, None, None, :] - cx[:, None, :, None]) ** 2
    dot = d2 < (r ** 2)[:, None, :, None]
    u = np.broadcast_to(rng.uniform(0, 1, (n, n)).astype(np.float32)[:, None, :, None], dot.shape)
    return _unblock(dot, size), _unblock(np.ascontiguousarray(u), size)


def _warp(labels: np.ndarray, rng: np.random.Generator, stretch: float, amplitude_px: float) -> np.ndarray:
    """Tubules cut at an angle look elongated and bent: an anisotropic stretch along a
    random direction and a smooth displacement, applied to the label map (nearest)."""
    size = labels.shape[0]
    angle = rng.uniform(0, np.pi)
    c, s = float(detmath.cos(angle)), float(detmath.sin(angle))
    centre = (size - 1) / 2
    yy, xx = np.meshgrid(np.arange(size) - centre, np.arange(size) - centre, indexing="ij")
    along = (c * yy + s * xx) / stretch
    across = -s * yy + c * xx
    coords = np.stack([c * along - s * across, s * along + c * across]) + centre
    for axis in range(2):
        coords[axis] += amplitude_px * smooth_field(rng, 10, size)
    return ndimage.map_coordinates(labels, coords, order=0, mode="nearest")


# ---------------------------------------------------------------- cortex

def _cortex(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Packed tubules in interstitium: PAS+ basement membrane, cytoplasm with a row of basal
    nuclei, a brush border (proximal) and a lumen; distal tubules paler with wider lumens."""
    um = 1.0 / mpp
    # Drawn on a larger canvas so the stretch and displacement never pull in empty edges.
    pad = int(math.ceil(0.3 * size)) + 4
    big = size + 2 * pad
    cell = max(3, round(TUBULE_PITCH_UM * rng.uniform(0.85, 1.15) * um))
    dist, margin, attr = worley(rng, big, cell)
    nuc, nuc_u = dots(rng, big, max(2, round(11.0 * um)), 0.5 * NUCLEUS_UM * um)
    stroma, stroma_u = dots(rng, big, max(2, round(16.0 * um)), 0.4 * NUCLEUS_UM * um)
    gap = (INTERSTITIUM_UM * rng.uniform(0.6, 3.0) / 2) * um
    depth = np.minimum(margin - gap, cell * (0.55 + 0.2 * attr) - dist)   # into the epithelium, px
    distal = attr > 0.7
    lumen = cell * np.where(distal, 0.18 + 0.15 * attr, 0.06 + 0.16 * attr)
    labels = np.where(distal, PALE_CYTOPLASM, CYTOPLASM).astype(np.uint8)
    labels[(dist < lumen + 2.5 * um) & ~distal] = BRUSH
    labels[dist < lumen] = LUMEN
    basal = (depth > MEMBRANE_UM * um) & (depth < (MEMBRANE_UM + NUCLEUS_UM + 2) * um)
    labels[basal & nuc & (nuc_u < 0.45)] = NUCLEUS
    labels[depth < MEMBRANE_UM * um] = MEMBRANE
    labels[depth < 0] = INTERSTITIUM
    labels[(depth < 0) & stroma & (stroma_u < 0.35)] = STROMA_NUCLEUS
    warped = _warp(labels, rng, stretch=rng.uniform(1.0, 2.5), amplitude_px=rng.uniform(6, 20) * um)
    return np.ascontiguousarray(warped[pad:pad + size, pad:pad + size])


def _ellipse(cy: float, cx: float, radius: float, aspect: float, angle: float, size: int, reach: float
             ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Box around an ellipse, the normalised elliptic radius there (1 = the ellipse) and angle."""
    r = reach * radius
    box = tuple(slice(int(max(0, np.floor(c - r))), int(min(size, np.ceil(c + r)))) for c in (cy, cx))
    dy = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] + 0.5 - cx
    cos, sin = detmath.cos(angle), detmath.sin(angle)
    u = dx * cos + dy * sin
    v = (-dx * sin + dy * cos) / aspect
    return box, np.sqrt(u * u + v * v) / radius, detmath.arctan2(v, u)


def _arterioles(rng: np.random.Generator, labels: np.ndarray, mpp: float, avoid: list[Glomerulus]) -> None:
    """0-2 arterioles: a thick wall of smooth muscle with nuclei around a small lumen, in a
    sheath of interstitium."""
    size, um = labels.shape[0], 1.0 / mpp
    for _ in range(int(rng.choice(3, p=[0.45, 0.4, 0.15]))):
        radius = rng.uniform(12, 35) * um
        cy, cx = rng.uniform(0, size, 2)
        if any(math.hypot(cy - g.cy, cx - g.cx) < g.radius + 1.3 * radius for g in avoid):
            continue
        box, rho, _ = _ellipse(cy, cx, radius, rng.uniform(0.6, 1.0), rng.uniform(0, np.pi), size, 1.3)
        out = labels[box]
        out[rho < 1.2] = INTERSTITIUM
        out[rho < 1.0] = VESSEL_WALL
        wall_nuclei = dots(rng, size, max(2, round(7 * um)), 0.35 * NUCLEUS_UM * um)
        nuclei = wall_nuclei[0][box] & (wall_nuclei[1][box] < 0.5)
        out[(rho < 0.95) & (rho > 0.45) & nuclei] = STROMA_NUCLEUS
        out[rho < rng.uniform(0.25, 0.45)] = VESSEL_LUMEN


def _lobes(rng: np.random.Generator) -> tuple[tuple[float, float], ...]:
    count = int(rng.integers(5, 9))
    angles = (np.arange(count) + rng.uniform(-0.3, 0.3, count)) * 2 * np.pi / count + rng.uniform(0, 2 * np.pi)
    return tuple((float(a), float(rng.uniform(0.8, 1.15))) for a in angles)


def place_glomeruli(rng: np.random.Generator, size: int, mpp: float, room: np.ndarray) -> list[Glomerulus]:
    """0-3 glomeruli per 512 µm field (more on larger tiles), centres anywhere in the tile
    (border ones are cut) with `room` (px of tissue around each pixel) for most of the
    glomerulus, capsules never touching."""
    fields = (size * mpp / 512.0) ** 2
    count = int(rng.choice(4, p=[0.2, 0.4, 0.28, 0.12]) * max(fields, 1.0) + 0.5 * (fields > 1))
    placed: list[Glomerulus] = []
    for _ in range(40 * max(count, 1)):
        if len(placed) == count:
            break
        radius = rng.uniform(*GLOMERULUS_DIAMETER_UM) / 2 / mpp
        g = Glomerulus(cy=rng.uniform(0, size), cx=rng.uniform(0, size), radius=radius,
                       aspect=rng.uniform(0.8, 1.0), angle=rng.uniform(0, np.pi),
                       capsule=max(1.0, rng.uniform(1.5, 4.0) / mpp), space=rng.uniform(0.0, 0.1) * float(rng.random() < 0.5),
                       pole=rng.uniform(0, 2 * np.pi), lobes=_lobes(rng),
                       harmonics=tuple((float(rng.uniform(0, 0.06)), float(rng.uniform(0, 2 * np.pi)))
                                       for _ in range(3)),
                       sclerotic=bool(rng.random() < SCLEROTIC_FRACTION))
        if room[int(g.cy), int(g.cx)] < 0.7 * radius:
            continue
        if all(math.hypot(g.cy - o.cy, g.cx - o.cx) > 1.1 * (g.radius + o.radius) + 8 / mpp for o in placed):
            placed.append(g)
    return placed


def _capillary_loops(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Labels of a glomerular tuft's inside, for the whole tile: Voronoi loops, bent and
    stretched, whose borders are PAS+ walls, with an open lumen in part of them."""
    um = 1.0 / mpp
    dist, margin, attr = worley(rng, size, max(3, round(CAPILLARY_PITCH_UM * um)))
    loops = np.full((size, size), TUFT_CELL, np.uint8)
    loops[dist < CAPILLARY_PITCH_UM * um * (0.1 + 0.3 * attr)] = CAPILLARY
    loops[margin < max(0.7 * um, 0.45)] = MESANGIUM
    return _warp(loops, rng, stretch=rng.uniform(1.2, 2.5), amplitude_px=rng.uniform(4, 9) * um)


def _outline(g: Glomerulus, theta: np.ndarray) -> np.ndarray:
    """The capsule's radius by direction, relative to its ellipse: a few low harmonics, so
    outlines are irregular rather than drawn with a compass."""
    shape = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(g.harmonics, start=2):
        shape = shape + amplitude * detmath.cos(k * theta + phase)
    return shape


def _paint_glomerulus(labels: np.ndarray, g: Glomerulus, mpp: float, texture: dict[str, tuple[np.ndarray, ...]]
                      ) -> None:
    """Capsule ring, Bowman's space (widest opposite the pole), and the tuft: lobules of
    mesangium around capillary lumens, dense nuclei; a sclerotic tuft is one homogeneous,
    shrunken PAS+ mass with few nuclei. All inside rho < 1, the capsule's outer edge."""
    size, um = labels.shape[0], 1.0 / mpp
    box, rho, theta = _ellipse(g.cy, g.cx, g.radius, g.aspect, g.angle, size, 1.25)
    if rho.size == 0:
        return
    rho = rho / _outline(g, theta)
    inner = 1.0 - g.capsule / g.radius
    # The tuft fills the capsule but for Bowman's space, a crescent widest away from the pole.
    reach = inner - g.space * (1 - detmath.cos(theta - g.pole)) / 2 - 0.015
    if g.sclerotic:
        reach = reach * 0.8
    u, v = rho * detmath.cos(theta), rho * detmath.sin(theta)
    tuft = rho < 0.7 * reach
    for angle, scale in g.lobes:
        lu, lv = 0.55 * reach * detmath.cos(angle), 0.55 * reach * detmath.sin(angle)
        tuft |= (u - lu) ** 2 + (v - lv) ** 2 < (0.45 * reach * scale) ** 2
    tuft &= rho < reach
    out = labels[box]
    out[(rho < 1.04) & (rho >= 1)] = INTERSTITIUM
    out[rho < 1] = CAPSULE
    out[rho < inner] = BOWMAN
    parietal, parietal_u = (a[box] for a in texture["parietal"])
    out[(rho < inner) & (rho > inner - 5 * um / g.radius) & parietal & (parietal_u < 0.35) & ~tuft] = PARIETAL_NUCLEUS
    if g.sclerotic:
        out[tuft] = SCLEROSIS
        nuclei, nuclei_u = (a[box] for a in texture["tuft_nuclei"])
        out[tuft & nuclei & (nuclei_u < 0.12)] = TUFT_NUCLEUS
        return
    # Capillary loops: thin PAS+ walls (and mesangial matrix) around pale endothelial
    # cytoplasm, open lumens and crowded nuclei.
    loops = texture["loops"][box]
    out[tuft] = loops[tuft]
    nuclei, nuclei_u = (a[box] for a in texture["tuft_nuclei"])
    out[tuft & nuclei & (nuclei_u < 0.55) & (loops != CAPILLARY)] = TUFT_NUCLEUS


def _glass(rng: np.random.Generator, size: int) -> np.ndarray:
    """Where the slide is bare: the section's edge (in 60 % of the tiles, covering 5-70 %
    of it) and thin tears."""
    glass = np.zeros((size, size), bool)
    if rng.random() < 0.6:
        # A smooth level set with a ragged fringe: the biopsy core's border, cutting off
        # 5-70 % of the tile.
        edge = smooth_field(rng, 4, size) + 0.08 * smooth_field(rng, 14, size)
        glass |= edge < np.quantile(edge, rng.uniform(0.05, 0.7))
    if rng.random() < 0.2:
        tear = smooth_field(rng, 6, size)
        glass |= np.abs(tear - rng.uniform(-0.5, 0.5)) < rng.uniform(0.005, 0.02)
    return glass


def tissue_labels(rng: np.random.Generator, size: int, mpp: float, edges: bool = True) -> np.ndarray:
    """A (size, size) uint8 label map of PAS-stained renal cortex at `mpp` µm per pixel;
    edges=False: tissue throughout (the whole slide cuts its own islands)."""
    labels = _cortex(rng, size, mpp)
    glass = _glass(rng, size) if edges else np.zeros((size, size), bool)
    # Exact Euclidean distances (integer arithmetic inside): the same on every CPU.
    glomeruli = place_glomeruli(rng, size, mpp, ndimage.distance_transform_edt(~glass))
    _arterioles(rng, labels, mpp, glomeruli)
    if glomeruli:
        um = 1.0 / mpp
        texture = {"loops": _capillary_loops(rng, size, mpp),
                   "tuft_nuclei": dots(rng, size, max(2, round(7.0 * um)), 0.5 * 6.0 * um),
                   "parietal": dots(rng, size, max(2, round(10 * um)), 0.4 * 6.0 * um)}
        for g in glomeruli:
            _paint_glomerulus(labels, g, mpp, texture)
    for g in glomeruli:   # glass never cuts a glomerulus: the mask keeps its outline whole
        box, rho, theta = _ellipse(g.cy, g.cx, g.radius, g.aspect, g.angle, size, 1.5)
        glass[box] &= rho / _outline(g, theta) > 1.15
    labels[glass] = GLASS
    return labels


def glomerulus_mask(labels: np.ndarray) -> np.ndarray:
    return np.isin(labels, GLOMERULUS)


# ---------------------------------------------------------------- tiles

def render_tile(size: int, index: int, seed: int, mpp: float = DEFAULT_MPP, appearance: str = "realistic",
                ranges: StainParams | None = None, edges: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 RGB PAS tile at `mpp` µm/px and its uint8 label map.
    randomised: the label map drawn at a jittered scale and deformed, then coloured with a
    random stain and scanner draw (pipeline.data.synthetic.stain)."""
    rng = np.random.default_rng([int(seed) % 2**64, int(index) % 2**64, 25])
    if appearance == "randomised":
        ranges = ranges or StainParams()
        drawn_mpp = mpp * float(detmath.exp(rng.uniform(-1, 1) * detmath.log(1.0 + ranges.scale_jitter)))
        labels = stain.deform(tissue_labels(rng, size, drawn_mpp, edges), rng, ranges.elastic_um / mpp)
        return stain.render_randomised(labels, rng, mpp, STAIN_AMOUNTS, TEXTURE, ranges), labels
    labels = tissue_labels(rng, size, mpp, edges)
    return stain.render_realistic(labels, rng, mpp, STAIN_AMOUNTS, TEXTURE), labels


def render_glomeruli(size: int, index: int, seed: int, mpp: float = DEFAULT_MPP, appearance: str = "realistic",
                     ranges: StainParams | None = None, edges: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One PAS tile (render_tile) and its (size, size) bool glomerulus mask."""
    image, labels = render_tile(size, index, seed, mpp, appearance, ranges, edges)
    return image, glomerulus_mask(labels)
