"""Image/mask pairs on disk: matched by stem and validated, without TensorFlow.

Stages that only need the file list (register, the tiled evaluation) import this module,
not dataset.py, so they start without loading TensorFlow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.data.masks import UnknownColours, read_mask
from common.errors import DataError
from pipeline.config.schema import MaskParams
from common.imageio import list_images, read_image

log = logging.getLogger(__name__)
# Smallest image side a source imports: below it there is no image to resize or tile.
MIN_SIDE = 8


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path


def find_pairs(split_dir: Path) -> list[Pair]:
    """Match images/<stem>.* to masks/<stem>.*; every unmatched file is an error."""
    images_dir, masks_dir = split_dir / "images", split_dir / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder missing; expected <split>/images and <split>/masks")
    images, masks = _by_stem(list_images(images_dir)), _by_stem(list_images(masks_dir))
    if not images and not masks:
        raise DataError(f"{split_dir}: split is empty (no images in {images_dir})")
    for stem in sorted(images.keys() - masks.keys()):
        raise DataError(f"{images[stem]}: mask missing (expected {masks_dir}/{stem}.png)")
    for stem in sorted(masks.keys() - images.keys()):
        raise DataError(f"{masks[stem]}: image missing (expected {images_dir}/{stem}.png)")
    return [Pair(images[s], masks[s]) for s in sorted(images)]


def _by_stem(paths: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in paths:
        if path.stem in found:
            raise DataError(f"{path}: duplicate stem {path.stem!r} (also {found[path.stem].name}); "
                            f"keep one file per image, the mask pairs by stem")
        found[path.stem] = path
    return found


def validate_pairs(pairs: list[Pair], mask: MaskParams, size: tuple[int, int] | None = None,
                   desc: str = "checking", min_side: int = 0) -> None:
    """Open every pair once: readable, same size (and `size` if given, no side under
    `min_side`), known colours. Unknown colours are gathered over all masks into one error
    (the first file, how many more, the setting that maps every pixel of them all)."""
    unknown: list[UnknownColours] = []
    for pair in tqdm(pairs, desc=desc, unit="pair", leave=False, disable=len(pairs) < 50):
        try:
            ids = read_mask(pair.mask, mask)
        except UnknownColours as exc:
            unknown.append(exc)
            continue
        check_pair(pair, read_image(pair.image), ids, size, min_side)
    if unknown:
        colours: dict = {}
        for exc in unknown:
            for colour, n in exc.colours.items():
                colours[colour] = colours.get(colour, 0) + n
        raise UnknownColours(unknown[0].source, colours, mask, more_sources=len(unknown) - 1)


def check_pair(pair: Pair, image, ids, size: tuple[int, int] | None = None, min_side: int = 0) -> None:
    """The decoded pair agrees with itself (and with the model `size`, (width, height), if
    given); neither side is under `min_side`."""
    if image.shape[:2] != ids.shape:
        raise DataError(
            f"{pair.image}: image is {image.shape[1]}x{image.shape[0]} but its mask "
            f"{pair.mask.name} is {ids.shape[1]}x{ids.shape[0]}"
        )
    if min(image.shape[:2]) < min_side:
        raise DataError(f"{pair.image}: {image.shape[1]}x{image.shape[0]} px is too small to import; "
                        f"every side must be at least {min_side} px")
    if size is not None and image.shape[:2] != (size[1], size[0]):
        raise DataError(
            f"{pair.image}: {image.shape[1]}x{image.shape[0]} differs from the model size "
            f"{size[0]}x{size[1]}; re-run the prepare stage for this image size"
        )


def load_split(data_dir: Path, split: str, mask: MaskParams, size: tuple[int, int]) -> list[Pair]:
    pairs = find_pairs(data_dir / split)
    validate_pairs(pairs, mask, size, desc=f"checking {split}")
    return pairs


def mini_test_pairs(data_dir: Path, count: int | None = None, fallback: int = 6) -> list[Pair]:
    """The first `count` (None: all) mini_test pairs: what the panels, epoch-change and
    tiled inference show. A dataset without mini_test images (an imagemask import without
    that folder) falls back to the first `count` (None: `fallback`) test pairs, logged."""
    images = data_dir / "mini_test" / "images"
    if images.is_dir() and list_images(images):
        return find_pairs(data_dir / "mini_test")[:count]
    pairs = find_pairs(data_dir / "test")[:count if count is not None else fallback]
    log.info("%s has no mini_test images: using the first %d test images instead", data_dir, len(pairs))
    return pairs
