"""TiledPredictor: an exported FlexUNet (ONNX) over images of any size, without TensorFlow.

    predictor = TiledPredictor.from_onnx("model.onnx", TilingSettings(overlap=0.5))  # or overlap=0.5
    ids = predictor.predict(image)            # uint8 (H, W) class ids, bounded memory
    probs = predictor.predict_proba(image)    # float32 (H, W, K)
    for band in predictor.stream(level):      # a whole-slide level (serving.slide): bands of
        ...                                   # labels, probabilities and uncertainty, to disk

The model carries its ModelCard (channels, classes, size multiple, training size) in its
ONNX metadata, so no params.yaml is read. The knobs are serving.settings.TilingSettings
(validated there); windows, blending and streaming are serving.tiling's; the histology
background skip is serving.tissue's. This module adds the onnxruntime session, input
conversion and the checks that need the model (tile size vs its size multiple, fixed
input dimensions), each a one-line UserError.

Input conversion (the rules of common.imageio.to_uint8_array, for arrays):
- (H, W) or (H, W, 1) grey: used as is by a 1-channel model; replicated to RGB for a
  3-channel one (a broadcast view: no copy).
- (H, W, 2) grey + alpha, (H, W, 4) RGBA: the alpha channel is dropped.
- RGB into a 1-channel model: ITU-R 601-2 luma (Pillow's "L": L = R*299/1000 + G*587/1000
  + B*114/1000).
- uint8 is expected. bool becomes 0/255; other grey dtypes (uint16, float...) are min-max
  stretched to 0..255 per image as imageio does for 16-bit files; other colour dtypes are
  accepted when their values lie in 0..255. Anything else is a UserError.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from serving._onnx_session import OnnxSession, open_session
from serving.card import ModelCard
from common.imageio import resize_image
from serving._tiling_engine import FLIPS, undo_tta
from serving.labels import foreground_mass, unify_foreground
from serving.preparation import Placement, check_spacing, resample_probs, whole_slice_probs
from serving.settings import TilingSettings
from serving.tiling import iter_bands
from serving.tissue import TileCount, TissueSkip
from serving.uncertainty import normalised_entropy

log = logging.getLogger(__name__)

RESCALE_TOLERANCE = 0.05   # --spacing within 5 % of a tiled model's training resolution: tiled as is


@dataclass
class Band:
    """Finished rows [row0, row0 + rows) of a streamed prediction."""

    row0: int
    ids: np.ndarray                  # uint8 (rows, W): per-pixel argmax (before any single-class rule)
    probs: np.ndarray                # float32 (rows, W, K): blended probabilities
    tta_variance: np.ndarray | None  # float32 (rows, W): variance of the flipped predictions (--tta only)

    @cached_property
    def uncertainty(self) -> np.ndarray:
        """float32 (rows, W): normalised entropy of probs (serving.uncertainty); computed
        when asked, so predict(), which keeps labels only, does not pay for the logarithms."""
        return normalised_entropy(self.probs)



class TiledPredictor:
    """Sliding-window prediction with an ONNX FlexUNet; see serving.tiling for the method.

    settings: a TilingSettings (None: the defaults); its tile_size, when unset, becomes the
    card's training size, so `predictor.settings` holds what is actually used.
    """

    def __init__(self, session: OnnxSession, card: ModelCard, settings: TilingSettings | None = None,
                 source: str = "model"):
        self.session, self.card, self.source = session, card, source
        settings = settings or TilingSettings()
        self.settings = settings.replace(tile_size=settings.tile_size or card.tile_size)
        self.tile_size: int = _check_tile(self.settings.tile_size, card, source)
        _check_fixed_dims(session, self.tile_size, self.settings.batch_size * (1 + len(self._flips())), source)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_onnx(cls, path: Path | str, settings: TilingSettings | None = None, **changes: Any) -> TiledPredictor:
        """Load an exported .onnx file (its card from the metadata) with `settings`, or the
        defaults, with `changes` (TilingSettings field names, e.g. overlap=0.5) applied."""
        settings = (settings or TilingSettings()).replace(**changes)
        session, card = open_session(Path(path), settings.threads)
        return cls(session, card, settings, source=str(path))

    # ------------------------------------------------------------------ prediction
    def predict_fn(self, batch: np.ndarray) -> np.ndarray:
        """The raw model: float32 (N, h, w, C) of 0..255 values -> probabilities (N, h, w, K)."""
        return self.session(batch)

    def forward(self, batch: np.ndarray, variance: bool = False) -> np.ndarray:
        """Whole inputs at the model size: float32 (N, s, s, C) -> probabilities (N, s, s, K),
        with --tta the card's flips averaged (as serving.tiling does for windows) and, with
        `variance`, their variance as one more channel. A model exported with a fixed batch
        size gets batches of that size (zero-padded), as the tiler gives it."""
        batch = np.asarray(batch, dtype=np.float32)
        flips = self._flips()
        fixed = self.session.fixed_dim(0)
        per = len(batch) if fixed is None else fixed // (1 + len(flips))
        parts = []
        for start in range(0, len(batch), max(per, 1)):
            part = batch[start: start + per]
            n = len(part)
            if n < per:
                part = np.concatenate([part, np.zeros((per - n,) + part.shape[1:], np.float32)])
            if not flips:
                parts.append(np.asarray(self.session(part), dtype=np.float32)[:n])
                continue
            out = np.asarray(self.session(np.concatenate([part] + [part[FLIPS[f]] for f in flips])), np.float32)
            parts.append(undo_tta(out, n, len(part), flips, variance))
        return np.concatenate(parts)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Convert an image to (H, W, card.channels) by the rules in the module docstring."""
        return convert_channels(image, self.card.channels)

    def iter_bands(self, image: np.ndarray, tiles: TileCount | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Finished bands (row0, float32 probabilities (rows, W, K)), top to bottom. tiles:
        filled with the number of windows and of windows skipped as background."""
        return ((band.row0, band.probs) for band in self.stream(image, tiles))

    def predict_proba(self, image: np.ndarray, tiles: TileCount | None = None) -> np.ndarray:
        """Class probabilities float32 (H, W, K). Holds H x W x K floats: for very large
        images prefer predict(), which keeps only the labels."""
        image = self.prepare(image)
        out = np.empty(image.shape[:2] + (self.card.num_classes,), dtype=np.float32)
        for band in self.stream(image, tiles):
            out[band.row0: band.row0 + band.probs.shape[0]] = band.probs
        return out

    def predict(self, image: np.ndarray, tiles: TileCount | None = None) -> np.ndarray:
        """Class ids uint8 (H, W): argmax of the blended probabilities, band by band, so peak
        memory is the input + labels + O(width x tile), not H x W x K floats. If the card
        says `single_foreground_class`, the foreground pixels then all get the class with
        the largest summed probability over them (serving.labels). tiles: as iter_bands."""
        image = self.prepare(image)
        labels = np.empty(image.shape[:2], dtype=np.uint8)
        mass = np.zeros(self.card.num_classes - 1)
        for band in self.stream(image, tiles):
            labels[band.row0: band.row0 + band.ids.shape[0]] = band.ids
            if self.card.single_foreground_class:
                mass += foreground_mass(band.probs, band.ids)
        return unify_foreground(labels, mass) if self.card.single_foreground_class else labels

    def stream(self, image: Any, tiles: TileCount | None = None, tissue: TissueSkip | None = None
               ) -> Iterator[Band]:
        """Bands of labels, probabilities and uncertainty, top to bottom; nothing of the
        image's size is held, so the caller writes them to disk (serving.outputs).

        image: an (H, W[, C]) array, or a lazy (H, W, C) one (a slide level: serving.slide)
        already in the model's channels. tissue: the background skip from a low-resolution
        mask (a slide's pyramid level); None: built from the image when
        `tissue_threshold` is set (in-memory images only). The single-foreground-class
        rule is the caller's, after the last band (serving.labels.unify_foreground on the
        summed foreground_mass), since it needs the whole image.
        """
        image = image if _is_lazy(image) else self.prepare(image)
        if self.card.scale == "whole" or self._rescale_factor(image) is not None:
            yield self._whole_band(image, tiles)
            return
        yield from self._tiled(image, tiles, tissue)

    def _tiled(self, image: Any, tiles: TileCount | None, tissue: TissueSkip | None) -> Iterator[Band]:
        """Windows at the image's own resolution (serving.tiling), band by band."""
        if tissue is None:
            threshold = self.tissue_threshold
            if threshold is not None and _is_lazy(image):
                raise UserError("a lazy image's background skip needs its tissue mask from a low-resolution "
                                "level: pass tissue=TissueSkip(mask, step) (serving.slide does)")
            tissue = TissueSkip.from_image(image, threshold, tiles) if threshold or tiles is not None else None
        elif tiles is not None:
            tissue.count = tiles
        k = self.card.num_classes
        for row0, band in iter_bands(image, self.predict_fn, **self._tiling(tissue)):
            probs = band[..., :k]
            yield Band(row0, probs.argmax(axis=-1).astype(np.uint8), probs,
                       band[..., k] if band.shape[-1] > k else None)

    def _rescale_factor(self, image: Any) -> float | None:
        """Tiled models: the input's spacing over the training one (0.5: a 1 um/px image for a
        2 um/px model, shrunk by half) when --spacing gives an in-memory image's scale and the
        card its training one (None: tile as is)."""
        spacing, trained = self.settings.spacing, self.card.spacing
        if spacing is None or _is_lazy(image):
            return None
        if trained is None:
            log.warning("--spacing %g: the model card records no training resolution, so the image is tiled "
                        "as it is", spacing)
            return None
        factor = spacing / trained
        return None if abs(math.log(factor)) < math.log(1 + RESCALE_TOLERANCE) else factor

    def _whole_band(self, image: Any, tiles: TileCount | None) -> Band:
        """The image as one band, through serving.preparation: a whole-slice model's one
        pass at the model size, or a tiled model's windows at its training resolution; the
        probabilities restored onto the image's grid before the argmax."""
        if _is_lazy(image):
            raise UserError(f"{self.source} takes whole slices (its card's scale is 'whole'); a whole-slide "
                            f"image needs a tiled model")
        h, w = image.shape[:2]
        if self.card.scale == "whole":
            if self.settings.spacing is not None:
                check_spacing(Placement(h, w, self.tile_size).spacing(self.settings.spacing, self.settings.spacing),
                              self.card.spacing_range, self.card.spacing_unit, self.source)
            if tiles is not None:
                tiles.tiles += 1
            probs = whole_slice_probs(lambda x: self.forward(x, variance=True), image, self.tile_size)
        else:
            factor = self._rescale_factor(image)
            small = resize_image(np.ascontiguousarray(image), max(1, round(w * factor)), max(1, round(h * factor)))
            at_training = np.empty(small.shape[:2] + (self.card.num_classes + bool(self._flips()),), np.float32)
            for band in self._tiled(small, tiles, None):
                rows = slice(band.row0, band.row0 + band.probs.shape[0])
                at_training[rows, :, : self.card.num_classes] = band.probs
                if band.tta_variance is not None:
                    at_training[rows, :, -1] = band.tta_variance
            probs = resample_probs(at_training, h, w)
        k = self.card.num_classes   # with --tta, one more channel: the flips' variance
        return Band(0, probs[..., :k].argmax(axis=-1).astype(np.uint8), np.ascontiguousarray(probs[..., :k]),
                    probs[..., k] if probs.shape[-1] > k else None)

    @property
    def tissue_threshold(self) -> int | None:
        """The background-skip threshold in use: the settings', else the model card's; 0 is off."""
        value = self.settings.tissue_threshold
        value = self.card.tissue_threshold if value is None else value
        return value or None

    @property
    def min_object_px(self) -> int:
        """Smallest object kept (serving.objects.is_object), in pixels of the written mask:
        the settings', else the model card's. The card's is counted at the training
        resolution, so when --spacing resamples an image (a 0.5 um/px PNG for a 2 um/px
        model) it grows with the area of a training pixel on the image (16x there)."""
        value = self.settings.min_object_px
        if value is not None:
            return int(value)
        spacing, trained = self.settings.spacing, self.card.spacing
        if self.card.scale != "tiled" or spacing is None or trained is None:
            return int(self.card.min_object_px)
        return int(round(self.card.min_object_px * (trained / spacing) ** 2))

    def _tiling(self, skip: TissueSkip | None) -> dict[str, Any]:
        """serving.tiling's keywords for these settings and this model."""
        s = self.settings
        return {"tile_size": self.tile_size, "overlap": s.overlap, "blend": s.blend, "batch_size": s.batch_size,
                "multiple": self.card.size_multiple, "tta": self._flips(), "skip_fn": skip, "tta_variance": True}

    def _flips(self) -> tuple[str, ...]:
        """TTA flips: those the card says the model was trained with (kidney MRI: left-right only)."""
        return tuple(self.card.tta_flips) if self.settings.tta else ()

    def __repr__(self) -> str:
        return f"TiledPredictor({self.source!r}, {self.settings})"


# ---------------------------------------------------------------------- helpers
def _is_lazy(image: Any) -> bool:
    return not isinstance(image, np.ndarray) and len(getattr(image, "shape", ())) == 3


def _check_tile(tile: int, card: ModelCard, source: str) -> int:
    """The model's own rule for tile sizes (TilingSettings checked it is a positive int under the cap)."""
    m = card.size_multiple
    if tile % m:
        lo, hi = max(m, tile // m * m), (tile // m + 1) * m
        raise UserError(f"tile_size {tile} is not a multiple of {m}, the size multiple of {source} "
                        f"(2**(num_layers-1)); use {lo} or {hi}")
    return int(tile)


def _check_fixed_dims(session: OnnxSession, tile: int, batch: int, source: str) -> None:
    """A model exported with a fixed size only takes that size (flexunet export leaves them open)."""
    for axis, want, what in ((1, tile, "height"), (2, tile, "width"), (0, batch, "batch size")):
        fixed = session.fixed_dim(axis)
        if fixed is not None and fixed != want:
            raise UserError(f"{source}: the model's input {what} is fixed at {fixed} but {want} is needed "
                            f"(tile size / batch size); re-export it with `flexunet export` (dynamic sizes)")


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W[, C]) array -> (H, W, channels) following the module's conversion rules."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise UserError(f"image of shape {image.shape}: expected (H, W) or (H, W, C) with H, W >= 1")
    c = image.shape[2]
    if c not in (1, 2, 3, 4):
        raise UserError(f"image has {c} channels: expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA)")
    image = image[..., :1] if c == 2 else image[..., :3] if c == 4 else image   # drop alpha (a view)
    image = _to_uint8_range(image)
    if image.shape[2] == channels:
        return image
    if channels == 3:  # grey -> RGB, as a read-only broadcast view
        return np.broadcast_to(image, image.shape[:2] + (3,))
    if channels == 1:
        from PIL import Image  # Pillow's luma, so arrays and files convert identically

        rgb = np.ascontiguousarray(image, dtype=np.uint8)
        return np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"), dtype=np.uint8)[..., None]
    raise UserError(f"model card asks for {channels} input channels; only 1 or 3 are supported")


def _to_uint8_range(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * np.uint8(255)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise UserError(f"image of dtype {image.dtype}: expected uint8 (or a numeric grey image)")
    lo, hi = float(np.min(image)), float(np.max(image))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise UserError("image contains NaN or infinite values; clean or convert it to uint8 first")
    if image.shape[2] == 1:  # imageio's rule for 16-bit / float grey: per-image min-max stretch
        scaled = np.zeros(image.shape, np.float64) if hi <= lo else (image - lo) * (255.0 / (hi - lo))
        return np.round(scaled).astype(np.uint8)
    if lo < 0 or hi > 255:
        raise UserError(f"colour image of dtype {image.dtype} with values in [{lo:g}, {hi:g}]: "
                        f"expected 0..255; convert it to 8-bit first")
    return image
