"""PAS appearance of a histology label map: stains in optical-density space, and their randomisation.

A brightfield pixel transmits I = I0 exp(-OD) per channel (Beer-Lambert), and a section's
OD is the sum of its stains', each an amount times a fixed colour vector. A PAS section
has two: haematoxylin (nuclei, blue-purple) and periodic acid-Schiff (basement membranes,
mesangium, brush border: magenta). `render_realistic` gives each label its typical amount
of both, with grain and a slow variation of staining across the section; the vectors are
Macenko's estimate on real PAS tiles (H_PAS below).

`render_randomised` is domain randomisation for stain and scanner (Tellez et al. 2018's
HED jitter, in the spirit of SynthSeg): per draw the stain vectors are turned in OD space,
each stain's amount scaled and shifted (Macenko-style), every label's amounts jittered, the
glass tinted (in a share of draws, `random_labels`, every label's amounts are drawn anew
instead, as SynthSeg draws tissue intensities), then focus blur, brightness, contrast, gamma, noise and JPEG compression.
A share of draws (`realistic_fraction`) keeps the realistic colours, on the same jittered,
deformed anatomy. Determinism as in randomise.py: draws from the caller's Generator,
transcendental functions from detmath, SciPy's plain C loops, Pillow's integer JPEG codec.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.config.schema import StainParams
from pipeline.data.synthetic import detmath
from pipeline.data.synthetic.randomise import blur, smooth_field

# OD colour vectors (R, G, B) of haematoxylin and PAS, unit length: Macenko's estimate over
# the tissue of the real development sample (data/real-sample/glomeruli-pas; docs/data.md).
# Colour deconvolution's reference "H PAS" pair (Ruifrok & Johnston 2001, Landini) has
# the same haematoxylin but a redder magenta, (0.175, 0.972, 0.155), 16 degrees away: the
# randomised draws turn both vectors by up to stain_angle_deg, which spans the two.
H_PAS = np.array([[0.637, 0.675, 0.373], [0.223, 0.881, 0.417]])
H_PAS = H_PAS / np.sqrt((H_PAS * H_PAS).sum(1, keepdims=True))
GLASS_OD = 0.04               # a clean slide's glass transmits ~96 %


def _grain(rng: np.random.Generator, size: int, mpp: float, grain_um: float) -> np.ndarray:
    """Unit noise with features about `grain_um` across (granular cytoplasm, chromatin)."""
    nodes = max(4, int(round(size * mpp / grain_um)) + 3)
    return smooth_field(rng, nodes, size)


def _optical_density(labels: np.ndarray, amounts: np.ndarray, texture: np.ndarray, vectors: np.ndarray,
                     rng: np.random.Generator, mpp: float, glass: np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 OD of the label map: per-label stain amounts, grained by `texture`
    (per-label relative amplitude) and varying slowly across the section."""
    size = labels.shape[0]
    grain = texture[labels] * _grain(rng, size, mpp, 3.0)
    slow = 0.12 * smooth_field(rng, 4, size)
    conc = amounts[labels] * np.clip(1.0 + grain + slow, 0.2, None)[..., None]   # (H, W, 2)
    od = conc[..., 0, None] * vectors[0] + conc[..., 1, None] * vectors[1]
    return od + glass


def _to_rgb(od: np.ndarray, rng: np.random.Generator, blur_px: float, noise: float) -> np.ndarray:
    light = detmath.exp(-od).astype(np.float32)
    if blur_px > 0.05:
        light = np.stack([blur(light[..., c], (blur_px, blur_px)) for c in range(3)], -1)
    light = light + rng.standard_normal(light.shape, dtype=np.float32) * np.float32(noise)
    return light


def _bytes(light: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(light * 255 + 0.5), 0, 255).astype(np.uint8)


def render_realistic(labels: np.ndarray, rng: np.random.Generator, mpp: float, amounts: np.ndarray,
                     texture: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the label map as a typical PAS section, slightly out of focus."""
    od = _optical_density(labels, amounts, texture, H_PAS, rng, mpp, np.full(3, GLASS_OD))
    return _bytes(_to_rgb(od, rng, max(0.4 / mpp, 0.5), 0.012))   # at least a scanner's or a downsampling's PSF


def _turn(vector: np.ndarray, rng: np.random.Generator, angle_deg: float) -> np.ndarray:
    """The vector turned by up to about `angle_deg` in a random direction, kept non-negative."""
    angle = np.deg2rad(angle_deg)
    spread = float(detmath.sin(angle) / detmath.cos(angle)) / np.sqrt(3)   # per component: tan(angle) in all
    turned = np.abs(vector + rng.normal(0.0, spread, 3))
    return turned / np.sqrt((turned * turned).sum())


def render_randomised(labels: np.ndarray, rng: np.random.Generator, mpp: float, amounts: np.ndarray,
                      texture: np.ndarray, ranges: StainParams) -> np.ndarray:
    """(H, W, 3) uint8: the label map with a random stain and scanner."""
    if rng.random() < ranges.realistic_fraction:
        return render_realistic(labels, rng, mpp, amounts, texture)
    vectors = np.stack([_turn(v, rng, ranges.stain_angle_deg) for v in H_PAS])
    alpha = rng.uniform(1 - ranges.stain_scale, 1 + ranges.stain_scale, 2)
    beta = rng.uniform(-ranges.stain_shift, ranges.stain_shift, 2)
    if rng.random() < ranges.random_labels:
        # SynthSeg's move: every label's stains drawn anew, so only shapes tell a glomerulus.
        drawn = rng.uniform(0.0, 1.0, amounts.shape) * amounts.max(0) * (amounts > 0)
    else:
        jitter = detmath.exp(rng.normal(0.0, ranges.label_jitter, amounts.shape))
        drawn = np.clip(amounts * jitter * alpha + beta * (amounts > 0), 0.0, None)
    glass = GLASS_OD + rng.uniform(0, 0.08, 3)
    od = _optical_density(labels, drawn, texture * rng.uniform(0.5, 1.5), vectors, rng, mpp, glass)
    light = _to_rgb(od, rng, rng.uniform(0, ranges.blur_um) / mpp, rng.uniform(0, ranges.noise_max))
    light = (light - 0.5) * np.float32(1 + rng.uniform(-ranges.contrast, ranges.contrast)) + 0.5
    light = light + np.float32(rng.uniform(-ranges.brightness, ranges.brightness))
    light = detmath.power(np.clip(light, 0.0, 1.0), np.float32(detmath.exp(rng.normal(0.0, ranges.gamma_std))))
    image = _bytes(light)
    if ranges.jpeg_quality_min < 100 and rng.random() < 0.5:
        image = _jpeg(image, int(rng.integers(ranges.jpeg_quality_min, 96)))
    return image


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip: libjpeg's integer DCT, exact whichever SIMD path it takes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def deform(labels: np.ndarray, rng: np.random.Generator, amplitude_px: float) -> np.ndarray:
    """The label map under a smooth random displacement of up to `amplitude_px` (nearest)."""
    size = labels.shape[0]
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    amplitude = rng.uniform(0, amplitude_px)
    coords = np.stack([yy + amplitude * smooth_field(rng, 8, size), xx + amplitude * smooth_field(rng, 8, size)])
    return ndimage.map_coordinates(labels, coords, order=0, mode="reflect")
