"""rgb_map colour masks <-> class-id arrays.

Masks on disk are RGB (or palette) PNGs coloured by `mask.rgb_map`, as in the seed, so
the seed's datasets drop in. Reading rules (documented in the README, tested):
- RGB / RGBA (alpha dropped) / palette (expanded through its palette): each pixel's
  colour is looked up in rgb_map. An unknown colour is an error naming the file, the
  colour and its pixel count, unless `mask.color_tolerance` > 0 snaps it to the nearest
  map colour within that RGB distance (for JPEG-damaged masks).
- Single-channel (L, I;16, I): if every value is a valid class id (< num_classes) the
  values are class ids; otherwise each grey value v is looked up as colour (v, v, v).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import DataError
from pipeline.config.schema import MaskParams
from common.imageio import open_image, palette_image

RGB = tuple[int, int, int]


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def rgb_to_ids(rgb: np.ndarray, mask: MaskParams, source: str = "mask") -> np.ndarray:
    """(H, W, 3) uint8 colours -> (H, W) uint8 class ids, by mask.rgb_map."""
    codes, inverse = np.unique(_pack(rgb).reshape(-1), return_inverse=True)
    lut = np.empty(len(codes), dtype=np.uint8)
    known = {int(_pack(np.array(c))): cid for c, cid in mask.rgb_map.items()}
    palette = np.array(list(mask.rgb_map.keys()), dtype=np.float64)
    palette_ids = np.array(list(mask.rgb_map.values()), dtype=np.uint8)
    counts = np.bincount(inverse, minlength=len(codes))
    unknown: list[tuple[RGB, int]] = []
    for i, code in enumerate(codes.tolist()):
        if code in known:
            lut[i] = known[code]
            continue
        colour = ((code >> 16) & 255, (code >> 8) & 255, code & 255)
        dist = np.sqrt(((palette - np.array(colour)) ** 2).sum(axis=1))
        if mask.color_tolerance > 0 and dist.min() <= mask.color_tolerance:
            lut[i] = palette_ids[int(dist.argmin())]
        else:
            unknown.append((colour, int(counts[i])))
    if unknown:
        unknown.sort(key=lambda item: -item[1])
        shown = ", ".join(f"{c} x {n} px" for c, n in unknown[:5])
        more = f" and {len(unknown) - 5} more colours" if len(unknown) > 5 else ""
        raise DataError(
            f"{source}: colour(s) not in mask.rgb_map: {shown}{more}; fix the mask, add the "
            f"colour to rgb_map, or set mask.color_tolerance to snap near colours"
        )
    return lut[inverse].reshape(rgb.shape[:2])


def image_to_ids(img: Image.Image, mask: MaskParams, source: str = "mask") -> np.ndarray:
    """Apply the reading rules above to a decoded Pillow image."""
    if img.mode in ("L", "I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(img).astype(np.int64)
        if values.max(initial=0) < len(mask.rgb_map) and values.min(initial=0) >= 0:
            return values.astype(np.uint8)
        grey = np.clip(values, 0, 255).astype(np.uint8)
        if int(values.max()) > 255:
            raise DataError(f"{source}: 16-bit mask values up to {int(values.max())} are not class ids")
        return rgb_to_ids(np.repeat(grey[..., None], 3, axis=2), mask, source)
    if img.mode == "P":
        img = img.convert("RGBA")
    return rgb_to_ids(np.asarray(img.convert("RGB")), mask, source)


def read_mask(path: Path | str, mask: MaskParams) -> np.ndarray:
    """Read a mask file as (H, W) uint8 class ids."""
    return image_to_ids(open_image(path), mask, source=str(path))


def ids_to_rgb(class_ids: np.ndarray, colours: list[RGB]) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours (colours[i] is class i's colour)."""
    table = np.asarray(colours, dtype=np.uint8)
    if class_ids.size and int(class_ids.max()) >= len(table):
        raise ValueError(f"class id {int(class_ids.max())} has no colour ({len(table)} colours)")
    return table[class_ids]


def mask_image(class_ids: np.ndarray, mask: MaskParams) -> Image.Image:
    """Class ids -> palette PNG image in the rgb_map colours (reads back as RGB colours)."""
    return palette_image(class_ids, mask.colours)
