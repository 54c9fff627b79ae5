"""Batch prediction: a folder (or glob) of images -> palette masks, overlays and a CSV table.

Outputs in `output_dir`:
- `<stem>.png`: palette PNG of class ids, coloured with the card's colours (the seed's
  rgb_map), so it opens like the seed's masks and its pixel values are the class ids.
- `overlays/<stem>.png` (overlay=True): the image with each non-background class tinted
  in its colour at alpha 0.4; background pixels are the image untouched.
- `predictions.csv`: one row per input file: file, height, width, `px_<class name>` pixel
  counts (they sum to height x width), tiles (windows the image needed), skipped_tiles
  (windows not run because they hold no tissue: TilingSettings.tissue_threshold; their
  pixels are background), seconds (read + predict + write), status (`ok`,
  `skipped-existing` or `error: <one-line message>`).

Resume: an input whose mask already exists is not predicted again unless overwrite=True.
Its row is rebuilt from the mask on disk (counts, size) plus the previous table's tiles
and seconds, so the table always describes the masks actually present (a missing overlay is drawn
from the existing mask, without predicting). Every file is written atomically
(common.atomic: temp file beside the target, then rename), so an interrupted run never
leaves a half-written mask or table. The table is rewritten whole after each image (at
most once per `csv_interval` seconds, so 10 000 images do not cost 10 000 rewrites) and
once more at the end, also when the run is interrupted by an exception or Ctrl-C; a
killed run leaves an older complete table, and the next run rebuilds the missing rows
from the masks. Rows of the previous table for files not among this run's inputs are
kept when its columns match (same classes).

A file that cannot be read or predicted is logged (one line), recorded as `error: ...`
and skipped; the batch goes on and the summary's `failed` counts it.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from common.atomic import write_text
from common.errors import UserError
from common.imageio import (IMAGE_SUFFIXES, MaxPixels, list_images, open_image, read_image,
                             save_palette_png, save_rgb_png)
from serving.card import ModelCard
from serving.tissue import TileCount

log = logging.getLogger(__name__)

CSV_NAME = "predictions.csv"
OVERLAY_DIR = "overlays"
OVERLAY_ALPHA = 0.4
STATUS_OK = "ok"
STATUS_SKIPPED = "skipped-existing"


class Predictor(Protocol):
    """What batch prediction needs from serving.predictor.TiledPredictor."""

    card: ModelCard
    tile_size: int

    def predict(self, image: np.ndarray, tiles: TileCount | None = None) -> np.ndarray: ...


@dataclass
class BatchSummary:
    """Counts of one run; megapixels and MP/s cover the images predicted in this run."""

    ok: int = 0
    skipped: int = 0
    failed: int = 0
    megapixels: float = 0.0
    predict_seconds: float = 0.0          # sum of the predicted images' seconds
    tiles: int = 0                        # windows of the predicted images
    skipped_tiles: int = 0                # of which skipped as background (no tissue)
    wall_seconds: float = 0.0
    csv_path: Path | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.ok + self.skipped + self.failed

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.predict_seconds if self.predict_seconds > 0 else 0.0

    def line(self) -> str:
        background = f", {self.skipped_tiles} of {self.tiles} windows skipped as background" \
            if self.skipped_tiles else ""
        return (f"predicted {self.total} images: {self.ok} ok, {self.skipped} skipped (existing), "
                f"{self.failed} failed; {self.megapixels:.3g} MP at {self.mp_per_s:.3g} MP/s{background}, "
                f"{self.wall_seconds:.1f} s in all; table {self.csv_path}")


def resolve_inputs(spec: str) -> list[Path]:
    """A folder (its image files, sorted), a single file, or a glob pattern (sorted matches).

    Glob matches are not filtered by suffix: a file the user named explicitly and cannot
    be read is reported as an error rather than silently ignored.
    """
    path = Path(spec)
    if path.is_dir():
        found = list_images(path)
        if not found:
            raise UserError(f"{spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return found
    if path.is_file():
        return [path]
    if not glob.has_magic(spec):
        raise UserError(f"{spec}: no such folder or file; pass a folder of images or a glob such as 'scans/*.png'")
    found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not found:
        raise UserError(f"{spec}: the pattern matches no files")
    return found


def predict_folder(predictor: Predictor, inputs: list[Path], output_dir: Path, *, overwrite: bool = False,
                   overlay: bool = False, max_pixels: MaxPixels = "pillow", csv_interval: float = 2.0,
                   progress: bool | None = None) -> BatchSummary:
    """Predict every input, writing masks, optional overlays and `predictions.csv` (see module doc).

    max_pixels: decompression-bomb limit passed to common.imageio.read_image ("pillow":
    Pillow's limit; None: no limit). progress: tqdm bar (None: only on a terminal).
    """
    output_dir = Path(output_dir)
    _check_plan(inputs, output_dir)
    card = predictor.card
    table = _Table(output_dir / CSV_NAME, card.class_names)
    summary = BatchSummary(csv_path=table.path)
    started = last_write = time.monotonic()
    try:
        with logging_redirect_tqdm():
            bar = tqdm(inputs, desc="predict", unit="img", disable=None if progress is None else not progress)
            for path in bar:
                row = _one_image(predictor, path, output_dir, overwrite=overwrite, overlay=overlay,
                                 max_pixels=max_pixels, previous=table.rows.get(str(path)))
                table.rows[str(path)] = row
                _count(summary, row)
                if time.monotonic() - last_write >= csv_interval:
                    table.write()
                    last_write = time.monotonic()
    finally:
        table.write()  # also on Ctrl-C: the rows done so far stay on record
        summary.wall_seconds = time.monotonic() - started
    log.info("%s", summary.line())
    return summary


def _check_plan(inputs: list[Path], output_dir: Path) -> None:
    """Refuse runs that would overwrite an input or write two inputs to one mask."""
    out = output_dir.resolve()
    seen: dict[str, Path] = {}
    for path in inputs:
        if path.resolve().parent == out:
            raise UserError(f"{output_dir}: is the folder of input {path}; masks would mix with (or overwrite) "
                            "the inputs; choose another --output")
        if path.stem in seen:
            raise UserError(f"{seen[path.stem]} and {path} would both write {output_dir / (path.stem + '.png')}; "
                            "rename one or predict them separately")
        seen[path.stem] = path


def _count(summary: BatchSummary, row: dict[str, Any]) -> None:
    status = row["status"]
    if status == STATUS_OK:
        summary.ok += 1
        summary.megapixels += row["height"] * row["width"] / 1e6
        summary.predict_seconds += row["seconds"]
        summary.tiles += row["tiles"]
        summary.skipped_tiles += row["skipped_tiles"]
    elif status == STATUS_SKIPPED:
        summary.skipped += 1
    else:
        summary.failed += 1
        summary.errors.append(status.removeprefix("error: "))


def _one_image(predictor: Predictor, path: Path, output_dir: Path, *, overwrite: bool, overlay: bool,
               max_pixels: MaxPixels, previous: dict[str, Any] | None) -> dict[str, Any]:
    """Predict (or reuse) one image and return its table row; never raises for a bad file."""
    card = predictor.card
    mask_path = output_dir / f"{path.stem}.png"
    overlay_path = output_dir / OVERLAY_DIR / f"{path.stem}.png"
    t0 = time.perf_counter()
    try:
        ids = None if overwrite else _existing_mask(mask_path, card.num_classes)
        if ids is not None:
            if overlay and not overlay_path.exists():
                image = read_image(path, card.channels, max_pixels)
                save_rgb_png(overlay_path, overlay_image(image, ids, card.colours))
            kept = {k: (previous or {}).get(k, "") for k in ("tiles", "skipped_tiles", "seconds")}
            return _row(path, ids, card.num_classes, STATUS_SKIPPED, **kept)
        image = read_image(path, card.channels, max_pixels)
        tiles = TileCount()
        ids = np.asarray(predictor.predict(image, tiles=tiles))
        if ids.shape != image.shape[:2]:
            raise RuntimeError(f"predictor returned shape {ids.shape} for a {image.shape[:2]} image")
        save_palette_png(mask_path, ids, card.colours)
        if overlay:
            save_rgb_png(overlay_path, overlay_image(image, ids, card.colours))
        return _row(path, ids, card.num_classes, STATUS_OK, tiles=tiles.tiles, skipped_tiles=tiles.skipped,
                    seconds=round(time.perf_counter() - t0, 4))
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop a 10 000-image batch
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        message = " ".join(message.split())  # one line, whatever the exception said
        log.error("%s", message if str(path) in message else f"{path}: {message}")
        log.debug("traceback for %s", path, exc_info=True)
        return {"file": str(path), "seconds": round(time.perf_counter() - t0, 4), "status": f"error: {message}"}


def _existing_mask(mask_path: Path, num_classes: int) -> np.ndarray | None:
    """Class ids of a mask a previous run wrote, or None when absent or not one of ours."""
    if not mask_path.is_file():
        return None
    try:
        img = open_image(mask_path, max_pixels=None)  # our own output: trusted, may be gigapixel
    except UserError:
        img = None
    if img is None or img.mode != "P":
        log.warning("%s: exists but is not a palette mask; predicting it again", mask_path)
        return None
    ids = np.asarray(img)
    if ids.size and int(ids.max()) >= num_classes:
        log.warning("%s: has class ids >= %d (another model?); predicting it again", mask_path, num_classes)
        return None
    return ids


def _row(path: Path, ids: np.ndarray, num_classes: int, status: str, **measured: Any) -> dict[str, Any]:
    """A table row from a mask; measured: tiles, skipped_tiles, seconds."""
    counts = np.bincount(ids.ravel(), minlength=num_classes)
    row: dict[str, Any] = {"file": str(path), "height": ids.shape[0], "width": ids.shape[1]}
    row.update({f"#{k}": int(c) for k, c in enumerate(counts[:num_classes])})
    row.update(measured, status=status)
    return row


def overlay_image(image: np.ndarray, ids: np.ndarray, colours: list[tuple[int, int, int]],
                  alpha: float = OVERLAY_ALPHA, rows_per_chunk: int = 512) -> np.ndarray:
    """RGB uint8: class colours blended over the image at `alpha`; class 0 left transparent.

    Blends a band of rows at a time: float temporaries of a whole gigapixel image would
    need 12 bytes a pixel.
    """
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    palette = np.asarray(colours, dtype=np.float32)
    out = np.array(rgb, dtype=np.uint8, copy=True)
    for r0 in range(0, ids.shape[0], rows_per_chunk):
        band, ids_band = out[r0:r0 + rows_per_chunk], ids[r0:r0 + rows_per_chunk]
        fg = ids_band > 0
        tinted = (1.0 - alpha) * band[fg].astype(np.float32) + alpha * palette[ids_band[fg]]
        band[fg] = np.rint(tinted).astype(np.uint8)
    return out


class _Table:
    """predictions.csv: rows keyed by input file, rewritten whole and atomically."""

    MEASURED = ("tiles", "skipped_tiles", "seconds", "status")

    def __init__(self, path: Path, class_names: list[str]):
        self.path = path
        self.class_names = class_names
        self.columns = ["file", "height", "width", *(f"px_{n}" for n in class_names), *self.MEASURED]
        self.keys = ["file", "height", "width", *(f"#{k}" for k in range(len(class_names))), *self.MEASURED]
        self.rows: dict[str, dict[str, Any]] = self._previous_rows()

    def _previous_rows(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        with self.path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != self.columns:
                log.warning("%s: columns differ from this model's classes; starting a new table", self.path)
                return {}
            return {r["file"]: self._internal(r) for r in reader}

    def _internal(self, row: dict[str, str]) -> dict[str, Any]:
        """CSV row -> the internal form (class counts under '#k')."""
        out: dict[str, Any] = {k: row[k] for k in ("file", "height", "width", *self.MEASURED)}
        out.update({f"#{k}": row[f"px_{n}"] for k, n in enumerate(self.class_names)})
        return out

    def write(self) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows.values():
            writer.writerow([row.get(k, "") for k in self.keys])
        write_text(self.path, buf.getvalue())
