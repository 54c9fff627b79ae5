"""Reading images into model-ready uint8 arrays, and writing palette PNG masks.

Conversion rules for input images (documented in docs/data.md, tested):
- 8-bit RGB: used as is. RGBA / LA: alpha is dropped. Palette (P): expanded through
  its palette. CMYK/YCbCr etc.: converted to RGB by Pillow.
- 8-bit grayscale (L) or 1-bit: replicated to 3 channels when the model takes RGB.
- 16-bit / 32-bit integer or float grayscale (I;16, I, F): min-max stretched per image
  to 0..255 (medical exports rarely use the full 16-bit range; a fixed /257 would
  leave them black). A constant image becomes all zeros.
- RGB into a 1-channel model: ITU-R 601-2 luma (Pillow's "L").
Decompression bombs: by default an image is refused when it has more pixels than
Pillow's own hard limit (2 x PIL.Image.MAX_IMAGE_PIXELS, ~179 MP), exactly as before;
`max_pixels=N` refuses above N pixels, `max_pixels=None` accepts any size (the CLI's
--allow-large-images). The size is checked from the header, before any pixel is decoded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.atomic import atomic_path
from common.errors import ImageError

RGB = tuple[int, int, int]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


MaxPixels = int | None | Literal["pillow"]
# Pillow's limit is a module global; changing it for one call must not race another call.
_PILLOW_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pillow_limit_off() -> Iterator[None]:
    """Switch Pillow's own bomb check off for one open, under a lock (we check ourselves)."""
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _bomb_error(path: Path, reason: str) -> ImageError:
    return ImageError(f"{path}: refused as a possible decompression bomb ({reason}); "
                      "if you trust the file, allow it (flexunet predict --allow-large-images)")


def open_image(path: Path | str, max_pixels: MaxPixels = "pillow") -> Image.Image:
    """Open and fully decode an image, turning every failure into one clear ImageError.

    max_pixels: "pillow" (default) keeps Pillow's own limit and leaves its global alone
    (no lock, so parallel tf.data readers are not serialised); an int or None replaces it.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: file is empty (0 bytes); re-export or remove it")
    own_check = max_pixels != "pillow"
    try:
        with _pillow_limit_off() if own_check else nullcontext(), Image.open(path) as img:
            pixels = img.width * img.height
            if own_check and max_pixels is not None and pixels > max_pixels:
                raise _bomb_error(path, f"{img.width}x{img.height} = {pixels} pixels > limit {max_pixels}")
            img.load()
            return img.copy()
    except Image.DecompressionBombError as exc:
        raise _bomb_error(path, str(exc).split(", could be")[0]) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from None


def to_uint8_array(img: Image.Image, channels: int = 3) -> np.ndarray:
    """Apply the conversion rules above; return (H, W, channels) uint8."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        img = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if channels == 1:
        out = np.asarray(img.convert("L"), dtype=np.uint8)[..., None]
    elif img.mode in ("L", "1", "LA"):
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
        out = np.repeat(grey[..., None], 3, axis=2)
    else:
        out = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(out)


def read_image(path: Path | str, channels: int = 3, max_pixels: MaxPixels = "pillow") -> np.ndarray:
    """Read an image file as (H, W, channels) uint8 following the conversion rules."""
    return to_uint8_array(open_image(path, max_pixels), channels)


def palette_image(class_ids: np.ndarray, colours: list[RGB]) -> Image.Image:
    """Class-id array -> palette ('P') image whose palette holds the class colours."""
    if class_ids.ndim != 2:
        raise ValueError(f"class_ids must be 2-D, got shape {class_ids.shape}")
    img = Image.fromarray(class_ids.astype(np.uint8), mode="P")
    flat = [v for colour in colours for v in colour]
    img.putpalette(flat + [0] * (768 - len(flat)))
    return img


def save_png(img: Image.Image, path: Path | str) -> None:
    """Write a PNG atomically (temp file beside the target, then rename)."""
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def save_palette_png(path: Path | str, class_ids: np.ndarray, colours: list[RGB]) -> None:
    """Save class ids as a palette PNG coloured like the seed's masks."""
    save_png(palette_image(class_ids, colours), path)


def save_rgb_png(path: Path | str, rgb: np.ndarray) -> None:
    save_png(Image.fromarray(np.asarray(rgb, dtype=np.uint8)), path)


def list_images(folder: Path | str) -> list[Path]:
    """Image files directly in `folder`, sorted by name; hidden (temp) files skipped."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C), bilinear (Pillow's; a 1-channel image too)."""
    plane = image[..., 0] if image.shape[2] == 1 else image
    return np.asarray(Image.fromarray(plane).resize((width, height), Image.BILINEAR)).reshape(height, width, -1)


def resize_labels(ids: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) class ids -> (height, width), nearest neighbour (no invented classes)."""
    return np.asarray(Image.fromarray(ids).resize((width, height), Image.NEAREST))
