"""SynthSeg-style domain randomisation of one 2-D tissue label map (Billot et al. 2023).

A model trained on one fixed grey rendering of the synthetic anatomy learns that rendering:
on real T2w slices, whose tissue contrasts, coil shading, resolution and noise differ, it
found little kidney. Here every training slice gets a new appearance drawn from its label
map, so the only thing that stays the same from slice to slice is the anatomy: the shapes
(themselves deformed by a random affine and elastic warp, the mask with them), and within a
kidney its cortico-medullary contrast and patchiness *relative to its own cortex*, which is
what tells CKD from healthy once absolute intensities are random.

Per slice, in this order (SynthSeg's generative model, in 2-D):
  1. deformation: rotation, per-axis scaling, shear and a smooth elastic displacement,
     applied to the label map (nearest) and, for realistic draws, the realistic image;
  2. a Gaussian mixture: each tissue a mean and a spread drawn anew (the realistic
     rendering is kept as one draw among many, with probability `realistic_fraction`);
  3. a smooth multiplicative bias field; 4. a lower acquisition resolution (blur, then
  down- and up-sampling); 5. Rician noise; 6. robust min-max scaling and a random gamma.

Determinism: every draw comes from the caller's Generator, every transcendental from
detmath (the Gaussian kernels too: SciPy's gaussian_filter builds its kernel with np.exp),
the smooth fields are gathers and products (no BLAS), and the interpolations are SciPy's
plain C loops, so the bytes are the same on every x86 CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.config.schema import RandomiseParams
from pipeline.data.synthetic import detmath


# Control points of the smooth fields across the slice: the elastic displacement
# (SynthSeg: 4 % of the size, ~10) and the bias field.
ELASTIC_NODES = 8
BIAS_NODES = 5


@dataclass(frozen=True)
class KidneyTissue:
    """One kidney's labels and what stays fixed about it when its intensities are random."""
    cortex: int
    medulla: int
    contrast: float     # medulla differs from cortex by this fraction of the cortex signal
    patchiness: float   # relative amplitude of its heterogeneity


def smooth_field(rng: np.random.Generator, nodes: int, size: int) -> np.ndarray:
    """A (size, size) float32 field, cubic B-spline through a (nodes, nodes) N(0, 1) grid
    spanning the slice. Gathers and products only: bit-identical on every CPU."""
    grid = rng.standard_normal((nodes, nodes), dtype=np.float32)
    # Nodes 1 .. nodes-2 span the slice; the outer ones are the spline's support.
    taps = detmath.bspline_taps(np.arange(size) * ((nodes - 3) / max(size - 1, 1)) + 1.0, nodes)
    return detmath.bspline_resample(detmath.bspline_resample(grid, taps, 0), taps, 1).astype(np.float32)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(3.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = detmath.exp(-0.5 * (x * x) / (sigma * sigma))
    return k / math.fsum(k.tolist())   # exact, whatever order a SIMD reduction would take


def blur(image: np.ndarray, sigma: tuple[float, float]) -> np.ndarray:
    """Separable Gaussian blur with detmath-built kernels (mirror edges); sigma <= 0: none."""
    out = image
    for axis, s in enumerate(sigma):
        if s > 0:
            out = ndimage.correlate1d(out, _gaussian_kernel(s), axis=axis, mode="mirror")
    return out


def deformation(rng: np.random.Generator, size: int, px_mm: float, ranges: RandomiseParams) -> np.ndarray:
    """Source coordinates (2, size, size) of each output pixel: a random affine about the
    centre plus a smooth elastic displacement."""
    angle = np.deg2rad(rng.uniform(-ranges.rotation_deg, ranges.rotation_deg))
    sy, sx = 1.0 + rng.uniform(-ranges.scaling, ranges.scaling, 2)
    shear = rng.uniform(-ranges.shear, ranges.shear, 2)
    c, s = float(detmath.cos(angle)), float(detmath.sin(angle))
    # Output -> source: a zoom-in (scale > 1) samples a smaller source area.
    m = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear[0]], [shear[1], 1.0]]) / np.array([[sy], [sx]])
    centre = (size - 1) / 2
    yy, xx = np.meshgrid(np.arange(size) - centre, np.arange(size) - centre, indexing="ij")
    # Written out rather than an einsum/matmul so no BLAS kernel picks the summation order.
    coords = np.stack([m[0, 0] * yy + m[0, 1] * xx, m[1, 0] * yy + m[1, 1] * xx]) + centre
    amplitude = rng.uniform(0, ranges.elastic_mm) / px_mm
    for axis in range(2):
        coords[axis] += amplitude * smooth_field(rng, ELASTIC_NODES, size)
    return coords


def _means(rng: np.random.Generator, n_labels: int, kidneys: list[KidneyTissue],
           ranges: RandomiseParams) -> tuple[np.ndarray, np.ndarray]:
    mean = rng.uniform(0, ranges.mean_max, n_labels).astype(np.float32)
    std = rng.uniform(0, ranges.std_max, n_labels).astype(np.float32)
    # Both kidneys are one tissue (one cortex draw); each medulla sits its own kidney's
    # contrast away from it, darker or brighter (T2w medulla is brighter, the realistic
    # rendering's darker: the sign is not what separates the groups).
    cortex = mean[kidneys[0].cortex]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    for k in kidneys:
        mean[k.cortex], std[k.cortex] = cortex, std[kidneys[0].cortex]
        mean[k.medulla] = max(cortex * (1.0 + sign * k.contrast), 0.0)
        std[k.medulla] = std[k.cortex]
    return mean, std


def render_slice(labels: np.ndarray, realistic: np.ndarray, texture: np.ndarray, kidneys: list[KidneyTissue],
                 n_labels: int, px_mm: float, rng: np.random.Generator,
                 ranges: RandomiseParams) -> tuple[np.ndarray, np.ndarray]:
    """One randomised slice: (uint8 image, deformed uint8 label map), both (H, W).

    `realistic` is the T2w-like rendering of the same slice (used as it is, only deformed,
    in a realistic draw), `texture` a smooth unit noise in the anatomy's frame that gives
    each kidney its patchiness."""
    size = labels.shape[0]
    coords = deformation(rng, size, px_mm, ranges)
    lab = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    if rng.random() < ranges.realistic_fraction:
        warped = ndimage.map_coordinates(realistic.astype(np.float32), coords, order=1, mode="constant", cval=0.0)
        return np.clip(np.floor(warped + 0.5), 0, 255).astype(np.uint8), lab
    tex = ndimage.map_coordinates(texture.astype(np.float32), coords, order=1, mode="nearest")
    mean, std = _means(rng, n_labels, kidneys, ranges)
    sig = mean[lab] + std[lab] * rng.standard_normal(lab.shape, dtype=np.float32)
    for k in kidneys:
        inside = (lab == k.cortex) | (lab == k.medulla)
        sig = np.where(inside, sig * (1 + k.patchiness * tex), sig)
    sig = sig * detmath.exp(np.float32(rng.uniform(0, ranges.bias_std)) * smooth_field(rng, BIAS_NODES, size))
    # A coarser acquisition: blur to the acquisition's point spread, sample its grid, back.
    factor = rng.uniform(1.0, ranges.resolution_max, 2)
    sig = blur(sig.astype(np.float32), tuple(float(0.4 * (f - 1.0)) if f > 1.05 else 0.0 for f in factor))
    low = tuple(max(4, int(round(size / f))) for f in factor)
    if low != sig.shape:
        sig = ndimage.zoom(ndimage.zoom(sig, (low[0] / size, low[1] / size), order=1),
                           (size / low[0], size / low[1]), order=1)
    sigma = np.float32(rng.uniform(0, ranges.noise_max) * max(float(mean.max()), 0.1))
    sig = detmath.rician(sig, sigma, rng)
    low_v, high_v = float(sig.min()), float(np.percentile(sig, 99.5))
    sig = np.clip((sig - low_v) / max(high_v - low_v, 1e-6), 0.0, 1.0)
    sig = detmath.power(sig, np.float32(detmath.exp(rng.normal(0.0, ranges.gamma_std))))
    return np.clip(np.floor(sig * 255 + 0.5), 0, 255).astype(np.uint8), lab
