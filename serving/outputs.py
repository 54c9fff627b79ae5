"""Where a streamed prediction goes: palette PNGs for small images, OME-Zarr for slides.

Both writers take the predictor's bands top to bottom (serving.predictor.Band) and are
finished once the last band is in, with the single-foreground-class decision
(serving.labels), which needs the whole image's sums and so is applied afterwards.

- PngOutput: `<stem>.png` (palette of class ids) and `uncertainty/<stem>.png` (8-bit
  normalised entropy, serving.uncertainty; with --tta also `uncertainty/<stem>.tta.png`,
  the flip variance x 4). Holds the image's labels: for small images.
- OmeZarrOutput: `<stem>.ome.zarr`, an OME-Zarr 0.5 (zarr v3) image whose `labels/<name>`
  is the multiscale label image, class colours and names in its `image-label` metadata,
  and whose own pixels are a grey preview of the input at the resolution of its
  tissue-mask level, with as many levels as the labels (the spec has labels live under
  an image; decoding and storing the whole slide again would cost more than predicting
  it); and `<stem>.uncertainty.zarr`, a zarr v3 array of 8-bit uncertainty (plus
  `tta_variance` with --tta). Rows are buffered to the chunk height and written chunk
  row by chunk row, so memory holds one chunk row, never the label image; the coarser
  levels are then built chunk by chunk from the finer one (nearest neighbour, as labels
  must keep their values). Coordinates are level-0 pixels of the input, or micrometres
  when its resolution is known.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from common.atomic import atomic_dir
from common.errors import UserError
from common.imageio import save_palette_png, save_png
from serving.card import ModelCard
from serving.labels import foreground_mass
from serving.uncertainty import to_uint8
from serving.volumes import nifti_stem

OME_VERSION = "0.5"
CHUNK = 1024
MIN_LEVEL_SIDE = 1024      # the label pyramid stops once a level fits in one chunk
LABEL_NAME = "segmentation"


class PngOutput:
    """Labels and uncertainty of a small image, held in memory and saved as PNGs at the end."""

    def __init__(self, mask_path: Path, uncertainty_path: Path, height: int, width: int, card: ModelCard):
        self.mask_path, self.uncertainty_path, self.colours = mask_path, uncertainty_path, card.colours
        self.ids = np.zeros((height, width), np.uint8)
        self.uncertainty = np.zeros((height, width), np.uint8)
        self.tta_variance: np.ndarray | None = None

    def write(self, row0: int, ids: np.ndarray, uncertainty: np.ndarray, tta_variance: np.ndarray | None) -> None:
        self.ids[row0: row0 + ids.shape[0]] = ids
        self.uncertainty[row0: row0 + ids.shape[0]] = to_uint8(uncertainty)
        if tta_variance is not None:
            if self.tta_variance is None:
                self.tta_variance = np.zeros_like(self.uncertainty)
            self.tta_variance[row0: row0 + ids.shape[0]] = to_uint8(TTA_VARIANCE_SCALE * tta_variance)

    def finish(self, unify_to: int | None) -> np.ndarray:
        """Save both PNGs; return the class ids (for overlays)."""
        if unify_to is not None:
            self.ids[self.ids != 0] = unify_to
        save_palette_png(self.mask_path, self.ids, self.colours)
        from PIL import Image

        save_png(Image.fromarray(self.uncertainty, mode="L"), self.uncertainty_path)
        if self.tta_variance is not None:
            save_png(Image.fromarray(self.tta_variance, mode="L"), self.uncertainty_path.with_suffix(".tta.png"))
        return self.ids


class _RowBuffer:
    """Rows of a 2-D zarr array written a whole chunk row at a time (no partial-chunk rewrites)."""

    def __init__(self, array: Any):
        self.array = array
        self.rows = int(array.chunks[0])
        self.buffer = np.zeros((self.rows, array.shape[1]), array.dtype)
        self.start = 0     # first row of the buffer
        self.filled = 0    # rows of the buffer holding data

    def write(self, row0: int, rows: np.ndarray) -> None:
        assert row0 == self.start + self.filled, "bands must arrive top to bottom"
        done = 0
        while done < rows.shape[0]:
            n = min(self.rows - self.filled, rows.shape[0] - done)
            self.buffer[self.filled: self.filled + n] = rows[done: done + n]
            self.filled += n
            done += n
            if self.filled == self.rows:
                self.flush()

    def flush(self) -> None:
        if self.filled:
            self.array[self.start: self.start + self.filled] = self.buffer[: self.filled]
        self.start += self.filled
        self.filled = 0


class OmeZarrOutput:
    """An OME-Zarr label image (and a zarr uncertainty array) written band by band.

    path / uncertainty_path: the (temporary) folders to write; the caller renames them
    into place (common.atomic.atomic_dir). downsample: level-0 pixels per predicted pixel
    (a slide predicted on a coarser level); mpp: level-0 microns per pixel, if known.
    preview: grey uint8 (h, w) picture of the input at `preview_downsample` level-0 px
    per pixel: the image the labels belong to.
    """

    def __init__(self, path: Path, uncertainty_path: Path, height: int, width: int, card: ModelCard, *,
                 preview: np.ndarray, preview_downsample: float, downsample: float = 1.0,
                 mpp: float | None = None, tta: bool = False, name: str = "image", chunk: int = CHUNK):
        import zarr

        self.card, self.downsample, self.mpp, self.chunk = card, float(downsample), mpp, chunk
        self.height, self.width = height, width
        self.root = zarr.open_group(str(path), mode="w", zarr_format=3)
        self.preview, self.preview_downsample, self.name = preview, preview_downsample, name
        labels = self.root.create_group("labels")
        labels.attrs["ome"] = {"version": OME_VERSION, "labels": [LABEL_NAME]}
        self.labels = labels.create_group(LABEL_NAME)
        self.level0 = self._array(self.labels, "0", (height, width))
        unc = zarr.open_group(str(uncertainty_path), mode="w", zarr_format=3)
        unc.attrs.update({"flexunet": {
            "uncertainty": "normalised entropy of the blended class probabilities x 255 (0 certain, 255 uniform)",
            "tta_variance": "variance of the flip-TTA predictions x 4 x 255 (with --tta; 255: the largest possible)",
            "level0_pixels_per_pixel": self.downsample, "mpp": mpp}})
        self.buffers = [_RowBuffer(self.level0), _RowBuffer(self._array(unc, "uncertainty", (height, width)))]
        if tta:
            self.buffers.append(_RowBuffer(self._array(unc, "tta_variance", (height, width))))

    def _array(self, group: Any, name: str, shape: tuple[int, int]) -> Any:
        return group.create_array(name, shape=shape, chunks=(self.chunk, self.chunk), dtype="uint8",
                                  fill_value=0, dimension_names=["y", "x"])

    def write(self, row0: int, ids: np.ndarray, uncertainty: np.ndarray, tta_variance: np.ndarray | None) -> None:
        self.buffers[0].write(row0, ids)
        self.buffers[1].write(row0, to_uint8(uncertainty))
        if len(self.buffers) > 2 and tta_variance is not None:
            self.buffers[2].write(row0, to_uint8(TTA_VARIANCE_SCALE * tta_variance))

    def finish(self, unify_to: int | None) -> None:
        for buffer in self.buffers:
            buffer.flush()
        if unify_to is not None:
            self._relabel(unify_to)
        levels = self._pyramid()
        self._write_preview(levels)
        self.labels.attrs["ome"] = {
            "version": OME_VERSION,
            "multiscales": [self._multiscale(LABEL_NAME, [self.downsample * 2 ** i for i in range(levels)])],
            "image-label": {
                "colors": [{"label-value": k, "rgba": [*map(int, c), 0 if k == 0 else 255]}
                           for k, c in enumerate(self.card.colours)],
                "properties": [{"label-value": k, "class": n} for k, n in enumerate(self.card.class_names)],
                "source": {"image": "../../"},
            },
        }

    # ------------------------------------------------------------------ internals
    def _blocks(self, shape: tuple[int, ...], step: int) -> list[tuple[slice, slice]]:
        return [(slice(y, min(y + step, shape[0])), slice(x, min(x + step, shape[1])))
                for y in range(0, shape[0], step) for x in range(0, shape[1], step)]

    def _relabel(self, unify_to: int) -> None:
        """The single-foreground-class rule, applied chunk by chunk to the stored labels."""
        for block in self._blocks(self.level0.shape, self.chunk):
            ids = self.level0[block]
            if ids.any():
                self.level0[block] = np.where(ids != 0, np.uint8(unify_to), np.uint8(0))

    def _pyramid(self) -> int:
        """Levels 1, 2, ... (each half the previous, nearest neighbour) until one fits a chunk."""
        src, level = self.level0, 1
        while max(src.shape) > MIN_LEVEL_SIDE:
            dst = self._array(self.labels, str(level), (math.ceil(src.shape[0] / 2), math.ceil(src.shape[1] / 2)))
            for ys, xs in self._blocks(src.shape, 2 * self.chunk):
                dst[ys.start // 2: math.ceil(ys.stop / 2), xs.start // 2: math.ceil(xs.stop / 2)] = src[ys, xs][::2, ::2]
            src, level = dst, level + 1
        return level

    def _write_preview(self, levels: int) -> None:
        """The image the labels belong to: the grey preview, halved as often as the labels
        are, since readers expect an image and its labels to have as many levels."""
        for i in range(levels):
            level = self.preview[:: 2**i, :: 2**i]
            self._array(self.root, str(i), level.shape)[:] = level
        downsamples = [self.preview_downsample * 2**i for i in range(levels)]
        self.root.attrs["ome"] = {"version": OME_VERSION, "multiscales": [self._multiscale(self.name, downsamples)]}

    def _multiscale(self, name: str, downsamples: list[float]) -> dict[str, Any]:
        unit = {"unit": "micrometer"} if self.mpp else {}
        scale = self.mpp or 1.0
        return {
            "name": name,
            "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
            "datasets": [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [d * scale] * 2}]}
                         for i, d in enumerate(downsamples)],
        }


def grey_preview(image: np.ndarray) -> np.ndarray:
    """uint8 (h, w) luma of an (h, w, C) uint8 image (the OME-Zarr's reference picture):
    the predictor's own conversion (Pillow's luma), so the preview is what a grey model sees."""
    from serving.predictor import convert_channels

    return np.ascontiguousarray(convert_channels(image, 1)[..., 0])


# ---------------------------------------------------------------------- one input's outputs
FORMATS = ("auto", "png", "ome-zarr")
ZARR_ABOVE_PIXELS = 64 * 2**20     # auto: OME-Zarr for slides and images above 64 MP
PROGRESS_ABOVE_PIXELS = 16 * 2**20  # a progress bar over the rows of images above 16 MP
UNCERTAINTY_DIR = "uncertainty"
TTA_VARIANCE_SCALE = 4.0   # a probability's variance is at most 1/4: x 4 puts it on 0..1 before 8 bits


def output_stem(path: Path) -> str:
    """`slide.ome.tif` -> `slide`, `scan.nii.gz` -> `scan` (double suffixes), a DICOM series
    folder -> its name, else the file's stem."""
    name = path.name
    if path.is_dir():
        return name
    if (stem := nifti_stem(path)) is not None:
        return stem
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


@dataclass(frozen=True)
class Targets:
    """The files one input writes into `folder` (see the module docstring)."""

    folder: Path
    stem: str
    format: str          # "png" or "ome-zarr" (auto resolved)
    geojson: bool

    @property
    def mask(self) -> Path:
        return self.folder / (f"{self.stem}.ome.zarr" if self.format == "ome-zarr" else f"{self.stem}.png")

    @property
    def uncertainty(self) -> Path:
        return (self.folder / f"{self.stem}.uncertainty.zarr" if self.format == "ome-zarr"
                else self.folder / UNCERTAINTY_DIR / f"{self.stem}.png")

    @property
    def objects(self) -> Path:
        return self.folder / f"{self.stem}.geojson"


def resolve_format(requested: str, is_slide: bool, pixels: int) -> str:
    if requested not in FORMATS:
        raise UserError(f"output format {requested!r}: use one of {', '.join(FORMATS)}")
    if requested != "auto":
        return requested
    return "ome-zarr" if is_slide or pixels > ZARR_ABOVE_PIXELS else "png"


@dataclass
class PredictionStats:
    """What the CSV row reports about one prediction (pixel counts after the class rule)."""

    counts: np.ndarray
    uncertainty_mean: float
    objects: int | None = None
    ids: np.ndarray | None = None     # PNG outputs only: the labels, for the overlay


def write_prediction(predictor: Any, source: Any, targets: Targets, tiles: Any = None) -> PredictionStats:
    """Stream `source` (serving.inputs.InputImage) through `predictor` into `targets`.

    Every file is written atomically: the zarr folders are built under temporary names
    and renamed at the end, so an interrupted run leaves the previous outputs or none.
    """
    card = predictor.card
    k = card.num_classes
    counts = np.zeros(k, np.int64)
    mass = np.zeros(max(k - 1, 1))
    entropy_sum = 0.0
    tracer = None
    if targets.geojson:
        from serving.objects import ObjectTracer

        tracer = ObjectTracer(k, downsample=source.downsample)
    with ExitStack() as stack:
        if targets.format == "ome-zarr":
            mask_dir = stack.enter_context(atomic_dir(targets.mask))
            unc_dir = stack.enter_context(atomic_dir(targets.uncertainty))
            assert source.preview is not None
            output: Any = OmeZarrOutput(mask_dir, unc_dir, source.height, source.width, card,
                                        preview=grey_preview(source.preview),
                                        preview_downsample=source.preview_downsample, downsample=source.downsample,
                                        mpp=source.mpp, tta=bool(predictor.settings.tta), name=targets.stem)
        else:
            output = PngOutput(targets.mask, targets.uncertainty, source.height, source.width, card)
        # A slide takes minutes: a bar over its rows (off for small images and off a terminal).
        rows = stack.enter_context(tqdm(total=source.height, unit="row", desc=targets.stem, leave=False,
                                        disable=True if source.height * source.width < PROGRESS_ABOVE_PIXELS
                                        else None))
        for band in predictor.stream(source.array, tiles, tissue=source.tissue(predictor.tissue_threshold)):
            rows.update(band.ids.shape[0])
            output.write(band.row0, band.ids, band.uncertainty, band.tta_variance)
            counts += np.bincount(band.ids.ravel(), minlength=k)[:k]
            entropy_sum += float(band.uncertainty.sum(dtype=np.float64))
            if card.single_foreground_class:
                mass += foreground_mass(band.probs, band.ids)
            if tracer is not None:
                tracer.add_band(band.row0, band.ids, band.probs)
        unify_to = 1 + int(np.argmax(mass)) if card.single_foreground_class and k > 2 and mass.any() else None
        if unify_to is not None:
            counts = np.bincount([0, unify_to], weights=[counts[0], counts[1:].sum()], minlength=k).astype(np.int64)
        stats = PredictionStats(counts, entropy_sum / max(1, source.height * source.width))
        ids = output.finish(unify_to)
        if targets.format == "ome-zarr":
            output.root.attrs["flexunet"] = {"counts": counts.tolist(), "height": source.height,
                                             "width": source.width, "level": source.level,
                                             "uncertainty_mean": stats.uncertainty_mean}
        else:
            stats.ids = ids
    if tracer is not None:
        from serving.objects import is_object, write_geojson

        kept = [o for o in tracer.objects(unify_to) if is_object(o.pixels, predictor.min_object_px)]
        stats.objects = write_geojson(targets.objects, kept, card.class_names, [tuple(c) for c in card.colours],
                                      mpp=source.mpp)
    return stats
