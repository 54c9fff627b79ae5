"""Synthetic PAS-stained kidney biopsy tiles with glomerulus masks (after HuBMAP, 20x).

The tile is first drawn as a map of tissue classes (tubule membrane, cytoplasm, lumen,
nucleus, glomerular tuft, ...), then coloured through a per-image stain palette and a
smooth stain-amount field. The mask is the set of pixels inside a glomerulus capsule, the
same test that decides where the tuft and Bowman's space are drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.data.synthetic import detmath

_REF = 1024.0  # lengths below are pixels of a 1024 px tile; they scale with size

# ---------------------------------------------------------------- classes and palette
(BACKGROUND, INTERSTITIUM, MEMBRANE, CYTOPLASM, LUMEN, BRUSH, NUCLEUS,
 BOWMAN, CAPSULE, TUFT, CAPILLARY, TUFT_NUCLEUS, PALE_CYTOPLASM) = range(13)
_PALETTE = (
    (240, 237, 242), (232, 207, 226), (168, 58, 136), (224, 158, 200), (246, 230, 241), (198, 112, 170),
    (98, 62, 142), (247, 236, 244), (160, 62, 138), (166, 76, 152), (222, 172, 208), (74, 44, 122), (233, 190, 218),
)


@dataclass(frozen=True)
class _Glomerulus:
    cy: float  # centre, pixels
    cx: float
    radius: float  # capsule inner radius along the long axis, pixels
    aspect: float  # short / long axis
    angle: float
    tuft: float  # tuft reach as a fraction of the capsule radius
    lobes: tuple[tuple[float, float], ...]  # (angle, size) of each lobule around the centre
    capsule: float  # capsule thickness as a fraction of the radius


# ---------------------------------------------------------------- noise helpers

def _taps(size: int, step: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline taps (indices (size, 4), weights (size, 4)) from grid nodes (k - 1) * step."""
    return detmath.bspline_taps((np.arange(size) + 0.5) / step + 1, n)


def _smooth(rng: np.random.Generator, size: int, step: float) -> np.ndarray:
    """Smooth noise with roughly unit spread and features about `step` pixels wide. Gathers,
    not matmul: BLAS threads are slow on a busy machine and may reorder sums between runs."""
    step = max(step, 1.0)
    n = int(np.ceil(size / step)) + 4
    taps = _taps(size, step, n)
    grid = rng.standard_normal((n, n), dtype=np.float32)
    return 2.0 * detmath.bspline_resample(detmath.bspline_resample(grid, taps, 0), taps, 1)


def _blocks(size: int, cell: int) -> tuple[int, np.ndarray]:
    """Cells per side and in-cell pixel centres; images are handled as (n, cell, n, cell) blocks
    so every pixel meets only its own cell's points, with no per-pixel gathering."""
    return -(-size // cell), np.arange(cell, dtype=np.float32) + 0.5


def _unblock(a: np.ndarray, size: int) -> np.ndarray:
    n, c = a.shape[0], a.shape[1]
    return a.reshape(n * c, n * c)[:size, :size]


def _worley(rng: np.random.Generator, size: int, cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jittered-grid Voronoi cells: distance to own centre, distance margin to the nearest
    neighbour (0 on a cell border), and a uniform per-cell attribute."""
    n, local = _blocks(size, cell)
    jitter = rng.uniform(0.15, 0.85, (2, n + 2, n + 2)).astype(np.float32)
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


def _dots(rng: np.random.Generator, size: int, cell: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One round dot per cell (nuclei) and a per-dot uniform, so callers keep a share of them."""
    n, local = _blocks(size, cell)
    r = (radius * rng.uniform(0.7, 1.3, (n, n))).astype(np.float32)
    room = np.maximum(cell - 2 * np.minimum(r, cell / 2), 0)
    cy, cx = (np.minimum(r, cell / 2) + rng.uniform(0, 1, (2, n, n)) * room).astype(np.float32)
    d2 = (local[None, :, None, None] - cy[:, None, :, None]) ** 2
    d2 = d2 + (local[None, None, None, :] - cx[:, None, :, None]) ** 2
    dot = d2 < (r ** 2)[:, None, :, None]
    u = np.broadcast_to(rng.uniform(0, 1, (n, n)).astype(np.float32)[:, None, :, None], dot.shape)
    return _unblock(dot, size), _unblock(np.ascontiguousarray(u), size)


# ---------------------------------------------------------------- glomeruli

def _lobes(rng: np.random.Generator) -> tuple[tuple[float, float], ...]:
    count = int(rng.integers(6, 10))
    angles = (np.arange(count) + rng.uniform(-0.25, 0.25, count)) * 2 * np.pi / count + rng.uniform(0, 2 * np.pi)
    return tuple((float(a), float(rng.uniform(0.85, 1.1))) for a in angles)


def _place(rng: np.random.Generator, size: int) -> list[_Glomerulus]:
    """0-4 glomeruli, centres inside the tile (edges may be cut), capsules never overlapping."""
    count = int(rng.choice(5, p=[0.17, 0.3, 0.28, 0.15, 0.1]))
    placed: list[_Glomerulus] = []
    for _ in range(60):
        if len(placed) == count:
            break
        g = _Glomerulus(
            cy=rng.uniform(0, size), cx=rng.uniform(0, size), radius=rng.uniform(0.075, 0.125) * size,
            aspect=rng.uniform(0.82, 1.0), angle=rng.uniform(0, np.pi), tuft=rng.uniform(0.84, 0.95),
            lobes=_lobes(rng), capsule=rng.uniform(0.025, 0.045))
        # Room for both capsules plus a thin strip of interstitium between them.
        if all(math.hypot(g.cy - o.cy, g.cx - o.cx) > 1.15 * (g.radius + o.radius) + 4 for o in placed):
            placed.append(g)
    return placed


def _polar(g: _Glomerulus, size: int, reach: float) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Box around the glomerulus, normalised elliptic radius (1 = capsule inner edge), angle."""
    r = reach * g.radius
    box = tuple(slice(int(max(0, np.floor(c - r))), int(min(size, np.ceil(c + r)))) for c in (g.cy, g.cx))
    dy = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] + 0.5 - g.cy
    dx = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] + 0.5 - g.cx
    u = dx * detmath.cos(g.angle) + dy * detmath.sin(g.angle)
    v = (-dx * detmath.sin(g.angle) + dy * detmath.cos(g.angle)) / g.aspect
    return box, np.sqrt(u * u + v * v) / g.radius, detmath.arctan2(v, u)


def _paint_glomerulus(cls: np.ndarray, mask: np.ndarray, g: _Glomerulus, size: int,
                      capillary: tuple[np.ndarray, np.ndarray], dots: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Capsule ring, Bowman's space, lobulated tuft with capillary lumens and dense nuclei;
    the mask gets exactly the pixels inside the capsule."""
    box, rho, theta = _polar(g, size, 1.25)
    if rho.size == 0:
        return
    # The tuft is a union of lobules (discs) around a core, which scallops its outline.
    u, v = rho * detmath.cos(theta), rho * detmath.sin(theta)
    tuft = rho < 0.55 * g.tuft
    for angle, scale in g.lobes:
        lu, lv = 0.5 * g.tuft * detmath.cos(angle), 0.5 * g.tuft * detmath.sin(angle)
        tuft |= (u - lu) ** 2 + (v - lv) ** 2 < (0.45 * g.tuft * scale) ** 2
    inside = rho < 1
    tuft &= inside
    cap_d, cap_a = (a[box] for a in capillary)
    out = cls[box]
    out[(rho < 1 + g.capsule + 0.05) & ~inside] = INTERSTITIUM
    out[(rho < 1 + g.capsule) & ~inside] = CAPSULE
    out[inside] = BOWMAN
    out[tuft] = np.where(cap_d[tuft] < 3.4 * size / _REF * (0.6 + cap_a[tuft]), CAPILLARY, TUFT)
    for (nuc, nuc_u), keep in zip(dots, (0.6, 0.45)):
        nuc, nuc_u = nuc[box], nuc_u[box]
        out[tuft & nuc & (nuc_u < keep)] = TUFT_NUCLEUS
        out[inside & ~tuft & (rho > 0.96) & nuc & (nuc_u < keep / 2)] = NUCLEUS  # parietal epithelium
    mask[box] |= inside


# ---------------------------------------------------------------- tile

def _tubules(rng: np.random.Generator, size: int, f: float) -> np.ndarray:
    """Class map of packed round-ish tubules in interstitium: PAS+ basement membrane, cytoplasm
    with basal nuclei, brush border and lumen."""
    cell = max(2, round(46 * f))
    dist, margin, attr = _worley(rng, size, cell)
    nuc, nuc_u = _dots(rng, size, max(2, round(12 * f)), 3.8 * f)
    # Depth into the tubule: bounded by the Voronoi border and by a per-tubule circle, so
    # tubules are round where they have room and flattened where they are packed.
    depth = np.minimum(margin - 2.5 * f, cell * (0.46 + 0.2 * attr) - dist)
    # Distal tubules / collecting ducts: paler cells, no brush border, wider lumen.
    distal = attr > 0.72
    cls = np.where(distal, PALE_CYTOPLASM, CYTOPLASM).astype(np.uint8)
    lumen = cell * (0.05 + 0.2 * attr ** 2)
    cls[(dist < lumen + 3.5 * f) & ~distal] = BRUSH
    cls[dist < lumen] = LUMEN
    cls[(depth > 3 * f) & (depth < 10 * f) & nuc & (nuc_u < 0.5)] = NUCLEUS
    cls[depth < 3.5 * f] = MEMBRANE
    cls[depth < 0] = INTERSTITIUM
    cls[(depth < 0) & nuc & (nuc_u < 0.06)] = NUCLEUS  # interstitial / endothelial cells
    return cls


def _colour(rng: np.random.Generator, cls: np.ndarray, f: float) -> np.ndarray:
    """Per-image stain palette, smooth stain-amount variation, grain, slight optical blur."""
    size = cls.shape[0]
    # Stain strength varies per slide: raise each channel's transmission to its own power.
    palette = 255 * detmath.power(np.asarray(_PALETTE, np.float32) / 255, rng.uniform(0.85, 1.2, 3).astype(np.float32))
    stain = 1 + 0.12 * _smooth(rng, size, 200 * f) + 0.08 * _smooth(rng, size, 25 * f)
    absorb = (255 - palette[cls]) * stain[..., None]
    sigma = max(0.5, 0.9 * f)
    img = ndimage.gaussian_filter(255 - absorb, (sigma, sigma, 0), truncate=2.5)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 3.5
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_glomeruli(size: int, index: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 RGB PAS-like tile and its (size, size) bool glomerulus mask."""
    rng = np.random.default_rng([int(seed) % 2**64, int(index) % 2**64, 5])
    f = size / _REF
    glomeruli = _place(rng, size)
    cls = _tubules(rng, size, f)
    # White gaps (tears, vessels, biopsy edge) from a coarse field, kept away from glomeruli.
    gap = _smooth(rng, size, 200 * f) < rng.uniform(-2.2, -1.2)
    for g in glomeruli:
        box, rho, _ = _polar(g, size, 1.8)
        gap[box] &= rho > 1.8
    cls[gap] = BACKGROUND
    mask = np.zeros((size, size), bool)
    if glomeruli:  # tuft textures cost a third of the time; skip them on empty tiles
        capillary = _worley(rng, size, max(2, round(13 * f)))[:3:2]
        # Two dot lattices of different pitch, so tuft nuclei show no grid.
        dots = [_dots(rng, size, max(2, round(c * f)), 3.2 * f) for c in (12, 17)]
        for g in glomeruli:
            _paint_glomerulus(cls, mask, g, size, capillary, dots)
    return _colour(rng, cls, f), mask
