"""rgb_map colour masks <-> class-id arrays.

Masks on disk are RGB (or palette) PNGs coloured by `mask.rgb_map`, as in the seed, so
the seed's datasets drop in. Reading rules (docs/data.md, tested):
- RGB / RGBA (alpha dropped) / palette (expanded through its palette): each pixel's
  colour is looked up in rgb_map. A colour not in the map is read by `mask.color_mode`:
  exact: an error; tolerance: snapped to its nearest map colour if it lies within
  `mask.color_tolerance` (RGB distance) of a blend, a mix of two or three map colours
  (the segment between two, the triangle between three; a map colour itself is one),
  as a mask resized with interpolation has along its class borders; else an error;
  nearest: snapped to its nearest map colour, whatever it is.
  The error names the file, the colours and their pixel counts, whether they are blends,
  and the setting that would map every pixel.
- Single-channel (L, I;16, I): if every value is a valid class id (< num_classes) the
  values are class ids; otherwise each grey value v is looked up as colour (v, v, v).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import DataError
from pipeline.config.schema import MaskParams
from common.imageio import open_image

RGB = tuple[int, int, int]
# A colour within this RGB distance of a mix of map colours is called a blend in the
# error message: Pillow rounds each channel of an interpolated pixel, which moves it at
# most sqrt(3)/2 off the exact mix.
BLEND_SLACK = 1.0


@dataclass
class SnapCount:
    """Mask pixels read, and how many of them were snapped to a map colour."""

    pixels: int = 0
    snapped: int = 0


class UnknownColours(DataError):
    """Mask colours the configured color_mode does not map; `colours` maps each to its
    pixel count, so the colours of many masks can be summarised in one message."""

    def __init__(self, source: str, colours: dict[RGB, int], mask: MaskParams, more_sources: int = 0):
        self.source, self.colours = source, colours
        super().__init__(describe_unknown(source, colours, mask, more_sources))


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _unpack(codes: np.ndarray) -> np.ndarray:
    return np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], axis=-1)


def nearness(colours: np.ndarray, mask: MaskParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (K, 3) colours: the class id of the nearest map colour, the RGB distance to it,
    and the distance to the nearest blend: a point of a segment between two map colours
    or of a triangle between three (map colours included, so never more than the second)."""
    c = np.asarray(colours, dtype=np.float64).reshape(-1, 3)
    palette = np.array(list(mask.rgb_map.keys()), dtype=np.float64)
    ids = np.array(list(mask.rgb_map.values()), dtype=np.uint8)
    dist = np.sqrt(((c[:, None, :] - palette[None]) ** 2).sum(-1))
    nearest = dist.argmin(axis=1)
    blend = dist.min(axis=1)
    for a, b in combinations(range(len(palette)), 2):
        ab = palette[b] - palette[a]
        t = np.clip(((c - palette[a]) @ ab) / (ab @ ab), 0.0, 1.0)
        blend = np.minimum(blend, np.sqrt(((c - (palette[a] + t[:, None] * ab)) ** 2).sum(-1)))
    for a, b, k in combinations(range(len(palette)), 3):
        # A point whose projection falls inside the triangle is its plane distance away;
        # any other point is nearest to an edge, a segment above.
        e1, e2, w = palette[b] - palette[a], palette[k] - palette[a], c - palette[a]
        normal = np.cross(e1, e2)
        if normal @ normal < 1e-9:
            continue
        d00, d01, d11 = e1 @ e1, e1 @ e2, e2 @ e2
        denom = d00 * d11 - d01 * d01
        u = (d11 * (w @ e1) - d01 * (w @ e2)) / denom
        v = (d00 * (w @ e2) - d01 * (w @ e1)) / denom
        inside = (u >= 0) & (v >= 0) & (u + v <= 1)
        blend = np.where(inside, np.minimum(blend, np.abs(w @ normal) / np.sqrt(normal @ normal)), blend)
    return ids[nearest], dist.min(axis=1), blend


def _blend_pair(colour: RGB, mask: MaskParams) -> tuple[RGB, RGB]:
    """The two map colours whose segment passes nearest to `colour`."""
    c = np.asarray(colour, dtype=np.float64)
    best, pair = math.inf, (mask.colours[0], mask.colours[1])
    for a, b in combinations(mask.colours, 2):
        pa, ab = np.asarray(a, np.float64), np.asarray(b, np.float64) - np.asarray(a, np.float64)
        t = float(np.clip((c - pa) @ ab / (ab @ ab), 0.0, 1.0))
        d = float(np.linalg.norm(c - (pa + t * ab)))
        if d < best:
            best, pair = d, (a, b)
    return pair


def describe_unknown(source: str, colours: dict[RGB, int], mask: MaskParams, more_sources: int = 0) -> str:
    """One line: the unknown colours (most frequent first), whether they are blends between
    two map colours, and the color_mode / color_tolerance that would map every pixel."""
    ranked = sorted(colours.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{c} x {n} px" for c, n in ranked[:5])
    more = f" and {len(ranked) - 5} more colours" if len(ranked) > 5 else ""
    where = f"{source} (and {more_sources} more masks)" if more_sources else source
    _, _, blend = nearness(np.array([c for c, _ in ranked]), mask)
    is_blend = blend <= BLEND_SLACK
    fmt = "({},{},{})".format
    if is_blend.all():
        a, b = _blend_pair(ranked[0][0], mask)
        kind = (f"all are blends of two or three map colours (e.g. {fmt(*a)}-{fmt(*b)}), as a mask resized "
                f"with interpolation has along its class borders")
    else:
        farthest = f"up to {float(blend.max()):.1f} RGB from one, e.g. {ranked[int(blend.argmax())][0]}"
        kind = (f"none is a blend of map colours ({farthest})" if not is_blend.any() else
                f"{int(is_blend.sum())} are blends of two or three map colours, {int((~is_blend).sum())} are not "
                f"({farthest})")
    need = max(1, math.ceil(float(blend.max()) - 1e-9))
    if need <= 255:
        fix = (f"mask.color_mode: tolerance with color_tolerance: {need} maps every pixel to its nearest map "
               f"colour, as does color_mode: nearest")
    else:
        fix = "mask.color_mode: nearest maps every pixel to its nearest map colour"
    now = (f" (now color_mode: {mask.color_mode}"
           + (f", color_tolerance: {mask.color_tolerance:g})" if mask.color_mode == "tolerance" else ")"))
    return (f"{where}: colour(s) not in mask.rgb_map: {shown}{more}; {kind}; {fix}{now}; "
            f"or fix the masks / add the colours to rgb_map")


def rgb_to_ids(rgb: np.ndarray, mask: MaskParams, source: str = "mask", count: SnapCount | None = None) -> np.ndarray:
    """(H, W, 3) uint8 colours -> (H, W) uint8 class ids, by mask.rgb_map and
    mask.color_mode; `count` (if given) adds the pixels read and the pixels snapped."""
    codes, inverse = np.unique(_pack(rgb).reshape(-1), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(codes))
    known = {int(_pack(np.array(c))): cid for c, cid in mask.rgb_map.items()}
    lut = np.zeros(len(codes), dtype=np.uint8)
    is_known = np.array([code in known for code in codes.tolist()], dtype=bool)
    lut[is_known] = [known[code] for code in codes[is_known].tolist()]
    other = np.flatnonzero(~is_known)
    if len(other):
        nearest, _, blend = nearness(_unpack(codes[other]), mask)
        ok = {"exact": np.zeros(len(other), bool), "nearest": np.ones(len(other), bool),
              "tolerance": blend <= mask.color_tolerance}[mask.color_mode]
        if not ok.all():
            bad = other[~ok]
            raise UnknownColours(source, {tuple(int(v) for v in _unpack(codes[i])): int(counts[i]) for i in bad},
                                 mask)
        lut[other] = nearest
    if count is not None:
        count.pixels += int(counts.sum())
        count.snapped += int(counts[other].sum())
    return lut[inverse].reshape(rgb.shape[:2])


def image_to_ids(img: Image.Image, mask: MaskParams, source: str = "mask", count: SnapCount | None = None
                 ) -> np.ndarray:
    """Apply the reading rules above to a decoded Pillow image."""
    if img.mode in ("L", "I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(img).astype(np.int64)
        if values.max(initial=0) < len(mask.rgb_map) and values.min(initial=0) >= 0:
            if count is not None:
                count.pixels += values.size
            return values.astype(np.uint8)
        grey = np.clip(values, 0, 255).astype(np.uint8)
        if int(values.max()) > 255:
            raise DataError(f"{source}: 16-bit mask values up to {int(values.max())} are not class ids")
        return rgb_to_ids(np.repeat(grey[..., None], 3, axis=2), mask, source, count)
    if img.mode == "P":
        img = img.convert("RGBA")
    return rgb_to_ids(np.asarray(img.convert("RGB")), mask, source, count)


def blend_tolerant(mask: MaskParams) -> MaskParams:
    """`mask` for masks known to be resized after colouring (blended class borders): the
    exact rule becomes tolerance with color_tolerance BLEND_SLACK (Pillow's rounding of a
    blend); a tolerance or nearest rule of the params is kept as it is."""
    if mask.color_mode != "exact":
        return mask
    return MaskParams.model_validate({**mask.model_dump(), "color_mode": "tolerance", "color_tolerance": BLEND_SLACK})


def read_mask(path: Path | str, mask: MaskParams, count: SnapCount | None = None) -> np.ndarray:
    """Read a mask file as (H, W) uint8 class ids (`count`: add its pixels read / snapped)."""
    return image_to_ids(open_image(path), mask, source=str(path), count=count)


def ids_to_rgb(class_ids: np.ndarray, colours: list[RGB]) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours (colours[i] is class i's colour)."""
    table = np.asarray(colours, dtype=np.uint8)
    if class_ids.size and int(class_ids.max()) >= len(table):
        raise ValueError(f"class id {int(class_ids.max())} has no colour ({len(table)} colours)")
    return table[class_ids]
