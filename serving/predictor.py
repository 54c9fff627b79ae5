"""TiledPredictor: an exported FlexUNet (ONNX) over images of any size, without TensorFlow.

    predictor = TiledPredictor.from_uri("models:/flexunet-kidney-t2w@champion")  # or a .onnx path
    ids = predictor.predict(image)            # uint8 (H, W) class ids, bounded memory
    probs = predictor.predict_proba(image)    # float32 (H, W, K)

The model carries its ModelCard (channels, classes, size multiple, training size) in its
ONNX metadata, so no params.yaml is read. Windows, blending and streaming are
serving.tiling's; this module adds the onnxruntime session, input conversion, argument
checks with one-line UserErrors, and the optional histology background skip.

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
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from serving._onnx_session import OnnxSession, open_session
from serving.card import ModelCard
from serving.labels import foreground_mass, unify_foreground
from common.errors import UserError
from serving.tiling import BLENDS, SeamStats, iter_bands, seam_disagreement

log = logging.getLogger(__name__)

MAX_TILE_SIZE = 4096          # a 4096 tile x batch 4 x 3 classes is already ~800 MB of outputs
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "file:/")
# Background skip: a pixel is background when it is near-white (brightest channel >=
# WHITE_LEVEL) and nearly grey (max - min <= GREY_SPREAD): a glass slide, not stained tissue.
# A window whose tissue fraction is below MIN_TISSUE_FRACTION is not run and counts as class 0.
WHITE_LEVEL = 220
GREY_SPREAD = 25
MIN_TISSUE_FRACTION = 0.01


def tissue_fraction(tile: np.ndarray) -> float:
    """Fraction of a tile's pixels that are not near-white glass (see WHITE_LEVEL above)."""
    hi = tile.max(axis=-1)
    lo = tile.min(axis=-1)
    background = (hi >= WHITE_LEVEL) & (hi.astype(np.int16) - lo <= GREY_SPREAD)
    return 1.0 - float(background.mean())


def is_background(tile: np.ndarray) -> bool:
    """skip_fn for histology: True when the tile holds less than 1 % tissue."""
    return tissue_fraction(tile) < MIN_TISSUE_FRACTION


class TiledPredictor:
    """Sliding-window prediction with an ONNX FlexUNet; see serving.tiling for the method."""

    def __init__(self, session: OnnxSession, card: ModelCard, *, tile_size: int | None = None,
                 overlap: float = 0.25, blend: str = "gaussian", batch_size: int = 4, tta: bool = False,
                 skip_background: bool = False, source: str = "model"):
        self.session, self.card, self.source = session, card, source
        self.tile_size = _check_tile(card.tile_size if tile_size is None else tile_size, card, source)
        if not 0.0 <= float(overlap) < 1.0:
            raise UserError(f"overlap {overlap}: must be in [0, 1) (a fraction of the tile, e.g. 0.25)")
        if blend not in BLENDS:
            raise UserError(f"blend {blend!r}: must be one of {', '.join(BLENDS)}")
        if int(batch_size) < 1:
            raise UserError(f"batch size {batch_size}: must be >= 1")
        self.overlap, self.blend, self.batch_size = float(overlap), blend, int(batch_size)
        self.tta, self.skip_background = bool(tta), bool(skip_background)
        _check_fixed_dims(session, self.tile_size, self.batch_size * (1 + len(self._flips())), source)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_onnx(cls, path: Path | str, *, tile_size: int | None = None, overlap: float = 0.25,
                  blend: str = "gaussian", batch_size: int = 4, tta: bool = False, threads: int | None = None,
                  skip_background: bool = False) -> TiledPredictor:
        """Load an exported .onnx file (its card from the metadata). threads: onnxruntime
        intra-op threads (None: all cores)."""
        session, card = open_session(Path(path), threads)
        return cls(session, card, tile_size=tile_size, overlap=overlap, blend=blend, batch_size=batch_size,
                   tta=tta, skip_background=skip_background, source=str(path))

    @classmethod
    def from_uri(cls, uri_or_path: str | Path, **kwargs: Any) -> TiledPredictor:
        """A .onnx file, a folder holding one (rglob), or an MLflow URI (`models:/name@alias`,
        `models:/name/3`, `runs:/<run id>/<path>`): its artifacts are downloaded to a temp
        folder and the single *.onnx found there is loaded. Keywords: as from_onnx."""
        text = str(uri_or_path)
        if text.startswith(URI_SCHEMES):
            with tempfile.TemporaryDirectory(prefix="flexunet-model-") as tmp:
                folder = _download(text, Path(tmp))
                predictor = cls.from_onnx(_find_onnx(folder, text), **kwargs)
            predictor.source = text  # the session holds the model in memory: the temp copy can go
            return predictor
        path = Path(text).expanduser()
        if not path.exists():
            raise UserError(f"{path}: model not found; pass a .onnx file, a folder holding one, "
                            f"or an MLflow URI such as models:/<name>@champion")
        return cls.from_onnx(_find_onnx(path, text) if path.is_dir() else path, **kwargs)

    # ------------------------------------------------------------------ prediction
    def predict_fn(self, batch: np.ndarray) -> np.ndarray:
        """The raw model: float32 (N, h, w, C) of 0..255 values -> probabilities (N, h, w, K)."""
        return self.session(batch)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Convert an image to (H, W, card.channels) by the rules in the module docstring."""
        return convert_channels(image, self.card.channels)

    def iter_bands(self, image: np.ndarray, seam_stats: SeamStats | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Finished bands (row0, float32 probabilities (rows, W, K)), top to bottom."""
        return iter_bands(self.prepare(image), self.predict_fn, **self._tiling(), seam_stats=seam_stats)

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities float32 (H, W, K). Holds H x W x K floats: for very large
        images prefer predict(), which keeps only the labels."""
        image = self.prepare(image)
        out = np.empty(image.shape[:2] + (self.card.num_classes,), dtype=np.float32)
        for row0, band in iter_bands(image, self.predict_fn, **self._tiling()):
            out[row0: row0 + band.shape[0]] = band
        return out

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class ids uint8 (H, W): argmax of the blended probabilities, band by band, so peak
        memory is the input + labels + O(width x tile), not H x W x K floats. If the card
        says `single_foreground_class`, the foreground pixels then all get the class with
        the largest summed probability over them (serving.labels)."""
        image = self.prepare(image)
        labels = np.empty(image.shape[:2], dtype=np.uint8)
        mass = np.zeros(self.card.num_classes - 1)
        for row0, band in iter_bands(image, self.predict_fn, **self._tiling()):
            ids = labels[row0: row0 + band.shape[0]]
            ids[:] = band.argmax(axis=-1)
            if self.card.single_foreground_class:
                mass += foreground_mass(band, ids)
        return unify_foreground(labels, mass) if self.card.single_foreground_class else labels

    def seam_disagreement(self, image: np.ndarray) -> SeamStats:
        """Neighbouring windows' disagreement in their overlaps (serving.tiling.seam_disagreement)."""
        kw = {k: v for k, v in self._tiling().items() if k not in ("blend", "skip_fn")}
        return seam_disagreement(self.prepare(image), self.predict_fn, **kw)

    def _tiling(self) -> dict[str, Any]:
        return {"tile_size": self.tile_size, "overlap": self.overlap, "blend": self.blend,
                "batch_size": self.batch_size, "multiple": self.card.size_multiple, "tta": self._flips(),
                "skip_fn": is_background if self.skip_background else None}

    def _flips(self) -> tuple[str, ...]:
        """TTA flips: those the card says the model was trained with (kidney MRI: left-right only)."""
        return tuple(self.card.tta_flips) if self.tta else ()

    def __repr__(self) -> str:
        return (f"TiledPredictor({self.source!r}, tile_size={self.tile_size}, overlap={self.overlap}, "
                f"blend={self.blend!r}, batch_size={self.batch_size}, tta={self.tta})")


def load_predictor(model: str | Path, **kwargs: Any) -> TiledPredictor:
    """TiledPredictor.from_uri: a .onnx path, a folder holding one, or an MLflow model URI."""
    return TiledPredictor.from_uri(model, **kwargs)


# ---------------------------------------------------------------------- helpers
def _check_tile(tile: int, card: ModelCard, source: str) -> int:
    m = card.size_multiple
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise UserError(f"tile size {tile!r}: must be a positive integer multiple of {m}")
    if tile > MAX_TILE_SIZE:
        raise UserError(f"tile size {tile} exceeds the cap of {MAX_TILE_SIZE} px (memory grows with its "
                        f"square); use e.g. {max(m, MAX_TILE_SIZE // 4 // m * m)}")
    if tile % m:
        lo, hi = max(m, tile // m * m), (tile // m + 1) * m
        raise UserError(f"tile size {tile} is not a multiple of {m}, the size multiple of {source} "
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


def _download(uri: str, dst: Path) -> Path:
    """MLflow artifacts of a models:/ or runs:/ URI -> a local folder (mlflow imported lazily)."""
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise UserError(f"{uri}: MLflow URIs need mlflow installed (pip install mlflow); "
                        f"or pass the .onnx file itself") from None
    # MLFLOW_TRACKING_URI, when set, names the store explicitly: in a process that also
    # logged elsewhere (tests, a notebook), mlflow's global URI would otherwise win.
    store = os.environ.get("MLFLOW_TRACKING_URI") or None
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=store,
                                                        registry_uri=store))
    except (MlflowException, OSError) as exc:
        where = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{uri}: cannot download the model from MLflow at {where} ({first}); "
                        f"check the name, version/alias and MLFLOW_TRACKING_URI") from None


def _find_onnx(folder: Path, what: str) -> Path:
    """The single *.onnx under `folder`; with several, model.onnx (fp32) wins."""
    found = sorted(p for p in folder.rglob("*.onnx") if p.is_file())
    if len(found) > 1:
        found = [p for p in found if p.name == "model.onnx"] or found
    if len(found) != 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found) or "none"
        raise UserError(f"{what}: expected exactly one .onnx model in it, found {names}; "
                        f"pass the .onnx file itself")
    return found[0]
