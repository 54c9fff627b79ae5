"""Batch prediction: a folder, glob or manifest of images and scans -> masks, overlays and a CSV table.

Inputs (resolve_inputs): a folder (its image files, NIfTI scans and DICOM series
subfolders; or the folder is one DICOM series), a single file, a glob pattern, or a
manifest: a .csv or .parquet file whose column `path` (or its only column) lists paths or
file:// URIs, relative ones taken from the manifest's folder (read_manifest). A scan
(NIfTI file, DICOM series folder) is predicted by serving.scans: labels in its own space,
kidney volumes in its row; everything below is about 2-D images and slides.

Engines: run_batch drives an engine that turns (input, previous row) jobs into table rows.
LocalEngine predicts in this process; serving.ray_engine.RayEngine on Ray Data actors.
Both call predict_image, the one function that predicts one image and writes its mask
and overlay, so their outputs are the same files and rows. predict_folder is run_batch
with the local engine.

Outputs in `output_dir` (serving.outputs; `format` auto: OME-Zarr for whole-slide inputs
and images above 64 MP, PNG for the rest):
- `<stem>.png`: palette PNG of class ids, coloured with the card's colours (the seed's
  rgb_map), so it opens like the seed's masks and its pixel values are the class ids;
  `uncertainty/<stem>.png`: 8-bit normalised entropy (0 certain, 255 a uniform guess).
- or `<stem>.ome.zarr` (OME-Zarr 0.5 label image, multiscale, class colours in its
  metadata) and `<stem>.uncertainty.zarr`, written chunk by chunk.
- `<stem>.geojson` (geojson=True; default with OME-Zarr): the objects as QuPath
  annotations, in level-0 pixel coordinates (serving.objects).
- `overlays/<stem>.png` (overlay=True, PNG outputs): the image with each non-background
  class tinted in its colour at alpha 0.4; background pixels are the image untouched.
- `predictions.csv`: one row per input file: file, height, width (of the predicted level),
  `px_<class name>` pixel counts (they sum to height x width), level (the slide level
  predicted; 0 for plain images), objects (GeoJSON features written), uncertainty_mean
  (mean normalised entropy: sort by it to review the least certain cases first), tiles
  (windows the image needed), skipped_tiles (windows not run because they hold no
  tissue: TilingSettings.tissue_threshold; their pixels are background), seconds_saved
  (estimated: skipped windows x the run windows' mean time), seconds (read + predict +
  write), status (`ok`, `skipped-existing` or `error: <one-line message>`).

Resume: an input whose mask already exists is not predicted again unless overwrite=True.
Its row is rebuilt from the mask on disk (counts, size; an OME-Zarr carries them in its
attributes) plus the previous table's tiles and seconds, so the table always describes the masks actually present (a missing overlay is drawn
from the existing mask, without predicting). Every file is written atomically
(common.atomic: temp file beside the target, then rename), so an interrupted run never
leaves a half-written mask or table. The table is rewritten whole after each image (at
most once per `csv_interval` seconds, so 10 000 images do not cost 10 000 rewrites) and
once more at the end, also when the run is interrupted by an exception or Ctrl-C; a
killed run leaves an older complete table, and the next run rebuilds the missing rows
from the masks. Rows of the previous table for files not among this run's inputs are
kept when its columns match (same classes).

Rows are written sorted by file, whatever order the engine finished them in.

A file that cannot be read or predicted is recorded as `error: ...` (and logged, one line)
and skipped; the batch goes on and the summary's `failed` counts it.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlparse

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from common.atomic import write_text
from common.errors import UserError
from common.imageio import IMAGE_SUFFIXES, MaxPixels, list_images, open_image, read_image, save_rgb_png
from serving.card import ModelCard
from serving.inputs import image_size, open_input
from serving.outputs import Targets, output_stem, resolve_format, write_prediction
from serving.scans import SCAN_COLUMNS, ScanTargets, existing_row, predict_scan
from serving.settings import TilingSettings
from serving.tissue import TileCount, TissueSkip
from serving.volumes import NIFTI_SUFFIXES, is_dicom_series, is_scan, nifti_stem

if TYPE_CHECKING:
    from serving.predictor import Band

log = logging.getLogger(__name__)

CSV_NAME = "predictions.csv"
OVERLAY_DIR = "overlays"
OVERLAY_ALPHA = 0.4
STATUS_OK = "ok"
STATUS_SKIPPED = "skipped-existing"
MANIFEST_SUFFIXES = (".csv", ".parquet")
MANIFEST_COLUMN = "path"
RESUME_KEYS = ("objects", "tiles", "skipped_tiles", "seconds_saved", "seconds")   # what a skipped image's row keeps from the previous table


class Predictor(Protocol):
    """What batch prediction needs from serving.predictor.TiledPredictor."""

    card: ModelCard
    tile_size: int
    settings: TilingSettings
    tissue_threshold: int | None
    source: str

    def stream(self, image: Any, tiles: TileCount | None = None, tissue: TissueSkip | None = None
               ) -> Iterator[Band]: ...

    def prepare(self, image: np.ndarray) -> np.ndarray: ...

    def forward(self, batch: np.ndarray) -> np.ndarray: ...


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
    """A folder (its image files, sorted), a single file, a manifest (.csv / .parquet: its
    listed paths, in its order; read_manifest), or a glob pattern (sorted matches).

    Glob matches and manifest entries are not filtered by suffix or existence: a file the
    user named explicitly and cannot be read is reported as an error row rather than
    silently ignored.
    """
    path = Path(spec)
    if path.is_dir():
        if is_dicom_series(path):   # the folder is one series
            return [path]
        found = sorted([*list_images(path), *list_scans(path)])
        if not found:
            raise UserError(f"{spec}: no image files ({', '.join(IMAGE_SUFFIXES)}), NIfTI volumes "
                            f"({', '.join(NIFTI_SUFFIXES)}) or DICOM series folders in this folder")
        return found
    if path.is_file():
        return read_manifest(path) if path.suffix.lower() in MANIFEST_SUFFIXES else [path]
    if not glob.has_magic(spec):
        raise UserError(f"{spec}: no such folder or file; pass a folder of images, a glob such as 'scans/*.png' "
                        f"or a manifest ({' or '.join(MANIFEST_SUFFIXES)} with a column '{MANIFEST_COLUMN}')")
    found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file() or is_dicom_series(Path(p)))
    if not found:
        raise UserError(f"{spec}: the pattern matches no files")
    return found


def list_scans(folder: Path) -> list[Path]:
    """The scans directly in `folder`: NIfTI files and subfolders holding a DICOM series."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")
                  and ((p.is_file() and nifti_stem(p) is not None) or is_dicom_series(p)))


def read_manifest(path: Path) -> list[Path]:
    """The images a manifest lists: a .csv (with a header row) or .parquet table whose column
    `path` (or its only column) holds local paths or file:// URIs; relative paths are taken
    from the manifest's folder. Parquet needs pyarrow (it comes with the [ray] extra)."""
    columns, values = (_parquet_column if path.suffix.lower() == ".parquet" else _csv_column)(path)
    if MANIFEST_COLUMN not in columns and len(columns) != 1:
        raise UserError(f"{path}: a manifest needs a column '{MANIFEST_COLUMN}' of image paths "
                        f"(or a single column); found {', '.join(map(str, columns)) or 'no columns'}")
    entries = [str(v).strip() for v in values(MANIFEST_COLUMN if MANIFEST_COLUMN in columns else columns[0])
               if v is not None and str(v).strip()]
    if not entries:
        raise UserError(f"{path}: the manifest lists no images")
    return [_manifest_path(e, path) for e in entries]


def _csv_column(path: Path) -> tuple[list[str], Callable[[str], list[Any]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns, rows = list(reader.fieldnames or []), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read the manifest ({exc})") from None
    return columns, lambda column: [r.get(column) for r in rows]


def _parquet_column(path: Path) -> tuple[list[str], Callable[[str], list[Any]]]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise UserError(f"{path}: a Parquet manifest needs pyarrow: pip install pyarrow "
                        f"(or 'flexunet[ray]'), or pass a .csv manifest") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own ArrowInvalid/OSError types
        raise UserError(f"{path}: cannot read the manifest ({' '.join(str(exc).split())[:200]})") from None
    return table.column_names, lambda column: table.column(column).to_pylist()


def _manifest_path(entry: str, manifest: Path) -> Path:
    """A manifest entry -> a local path (file:// URIs decoded; relative to the manifest's folder)."""
    parsed = urlparse(entry)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise UserError(f"{manifest}: {entry}: only local paths and file:// URIs are read; "
                        f"copy or mount the images locally")
    path = Path(entry).expanduser()
    return path if path.is_absolute() else manifest.parent / path


@dataclass(frozen=True)
class ImageOptions:
    """What predict_image does with an image besides predicting it (the same for every image)."""

    output_dir: Path
    overwrite: bool = False
    overlay: bool = False
    max_pixels: MaxPixels = "pillow"
    format: str = "auto"              # serving.outputs.FORMATS
    geojson: bool | None = None       # QuPath objects; None: with OME-Zarr outputs
    level: int | None = None          # slide level to predict (None: by --mpp or the model card)
    mpp: float | None = None          # target microns per pixel (picks the nearest slide level)


Job = tuple[Path, "dict[str, Any] | None"]   # an input and its row in the previous table


class Engine(Protocol):
    """Turns jobs into table rows (predict_image's), in any order."""

    card: ModelCard

    def rows(self, jobs: list[Job], options: ImageOptions) -> Iterator[dict[str, Any]]: ...


class LocalEngine:
    """Predicts the images one after another in this process (the default engine)."""

    def __init__(self, predictor: Predictor):
        self.predictor, self.card = predictor, predictor.card

    def rows(self, jobs: list[Job], options: ImageOptions) -> Iterator[dict[str, Any]]:
        for path, previous in jobs:
            yield predict_image(self.predictor, path, options, previous)


def predict_folder(predictor: Predictor, inputs: list[Path], output_dir: Path, **kwargs: Any) -> BatchSummary:
    """Predict every input in this process: run_batch with the local engine (see there)."""
    return run_batch(LocalEngine(predictor), inputs, output_dir, **kwargs)


def run_batch(engine: Engine, inputs: list[Path], output_dir: Path, *, overwrite: bool = False,
              overlay: bool = False, max_pixels: MaxPixels = "pillow", csv_interval: float = 2.0,
              progress: bool | None = None, format: str = "auto", geojson: bool | None = None,
              level: int | None = None, mpp: float | None = None) -> BatchSummary:
    """Predict every input through `engine`, writing masks, optional overlays and
    `predictions.csv` (see module doc).

    max_pixels: decompression-bomb limit passed to common.imageio.read_image ("pillow":
    Pillow's limit; None: no limit). progress: tqdm bar (None: only on a terminal).
    """
    output_dir = Path(output_dir)
    _check_plan(inputs, output_dir)
    options = ImageOptions(output_dir, overwrite=overwrite, overlay=overlay, max_pixels=max_pixels,
                           format=format, geojson=geojson, level=level, mpp=mpp)
    table = _Table(output_dir / CSV_NAME, engine.card.class_names, scans=engine.card.plane is not None)
    summary = BatchSummary(csv_path=table.path)
    jobs = [(path, table.rows.get(str(path))) for path in inputs]
    started = last_write = time.monotonic()
    try:
        with logging_redirect_tqdm(), tqdm(total=len(jobs), desc="predict", unit="img",
                                           disable=None if progress is None else not progress) as bar:
            for row in engine.rows(jobs, options):
                bar.update()
                table.rows[row["file"]] = row
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
        stem = output_stem(path)
        if stem in seen:
            raise UserError(f"{seen[stem]} and {path} would both write {output_dir / stem}.*; "
                            "rename one or predict them separately")
        seen[stem] = path


def _count(summary: BatchSummary, row: dict[str, Any]) -> None:
    status = row["status"]
    if status == STATUS_OK:
        summary.ok += 1
        summary.megapixels += row["height"] * row["width"] * (row.get("slices") or 1) / 1e6
        summary.predict_seconds += row["seconds"]
        summary.tiles += row["tiles"]
        summary.skipped_tiles += row["skipped_tiles"]
    elif status == STATUS_SKIPPED:
        summary.skipped += 1
    else:
        message = status.removeprefix("error: ")
        summary.failed += 1
        summary.errors.append(message)
        log.error("%s", message if row["file"] in message else f"{row['file']}: {message}")


def predict_image(predictor: Predictor, path: Path, options: ImageOptions,
                  previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict (or reuse) one image, write its outputs atomically (serving.outputs), and
    return its table row; never raises for a bad file (its row says `error: ...`).
    previous: its row in the previous table, whose RESUME_KEYS a skipped image keeps.
    Every engine runs this."""
    card = predictor.card
    t0 = time.perf_counter()
    try:
        if is_scan(path):
            return _scan_row(predictor, path, options, t0)
        targets = _targets(path, options)
        overlay_path = options.output_dir / OVERLAY_DIR / f"{targets.stem}.png"
        if not options.overwrite:
            reused = _reuse(path, targets, options, card, overlay_path, previous)
            if reused is not None:
                return reused
        source = open_input(path, card, level=options.level, mpp=options.mpp, max_pixels=options.max_pixels)
        try:
            tiles = TileCount()
            stats = write_prediction(predictor, source, targets, tiles)
            if options.overlay and stats.ids is not None and not source.is_slide:
                save_rgb_png(overlay_path, overlay_image(source.array, stats.ids, card.colours))
        finally:
            source.close()
        seconds = time.perf_counter() - t0
        run = tiles.tiles - tiles.skipped
        return _row(path, source.height, source.width, stats.counts, STATUS_OK, level=source.level,
                    objects="" if stats.objects is None else stats.objects,
                    uncertainty_mean=round(stats.uncertainty_mean, 5), tiles=tiles.tiles,
                    skipped_tiles=tiles.skipped,
                    seconds_saved=round(tiles.skipped * seconds / run, 2) if run else "",
                    seconds=round(seconds, 4))
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop a 10 000-image batch
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        message = " ".join(message.split())  # one line, whatever the exception said; run_batch logs it
        log.debug("traceback for %s", path, exc_info=True)
        return {"file": str(path), "seconds": round(time.perf_counter() - t0, 4), "status": f"error: {message}"}


def _scan_row(predictor: Predictor, path: Path, options: ImageOptions, t0: float) -> dict[str, Any]:
    """A scan's row (serving.scans): its earlier outputs reused, or predicted now."""
    if not options.overwrite:
        row = existing_row(ScanTargets(options.output_dir, output_stem(path)))
        if row is not None:
            return {**row, "file": str(path), "status": STATUS_SKIPPED}
    row = predict_scan(predictor, path, options.output_dir)
    return {"file": str(path), **row, "seconds": round(time.perf_counter() - t0, 4), "status": STATUS_OK}


def _targets(path: Path, options: ImageOptions) -> Targets:
    """Where `path`'s outputs go; auto format: OME-Zarr for slides and very large images."""
    fmt = options.format
    if fmt == "auto":
        from serving.slide import is_slide

        slide = is_slide(path)
        h, w = (0, 0) if slide else image_size(path)
        fmt = resolve_format(fmt, slide, h * w)
    geojson = fmt == "ome-zarr" if options.geojson is None else options.geojson
    return Targets(options.output_dir, output_stem(path), fmt, geojson)


def _reuse(path: Path, targets: Targets, options: ImageOptions, card: ModelCard, overlay_path: Path,
           previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """The row of outputs a previous run wrote (resume), or None to predict."""
    kept = {k: (previous or {}).get(k, "") for k in RESUME_KEYS}
    if targets.format == "ome-zarr":
        summary = _existing_zarr(targets.mask)
        if summary is None:
            return None
        return _row(path, summary["height"], summary["width"], np.asarray(summary["counts"]), STATUS_SKIPPED,
                    level=summary.get("level", ""), uncertainty_mean=summary.get("uncertainty_mean", ""), **kept)
    ids = _existing_mask(targets.mask, card.num_classes)
    if ids is None:
        return None
    if options.overlay and not overlay_path.exists():
        image = read_image(path, card.channels, options.max_pixels)
        save_rgb_png(overlay_path, overlay_image(image, ids, card.colours))
    return _row(path, ids.shape[0], ids.shape[1], np.bincount(ids.ravel(), minlength=card.num_classes),
                STATUS_SKIPPED, level=0, **kept)


def _existing_zarr(path: Path) -> dict[str, Any] | None:
    """The summary a finished OME-Zarr output carries, or None (absent or not ours)."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        summary = json.loads((path / "zarr.json").read_text(encoding="utf-8"))["attributes"]["flexunet"]
        return summary if {"counts", "height", "width"} <= set(summary) else None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s: exists but is not a finished flexunet OME-Zarr; predicting it again", path)
        return None


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


def _row(path: Path, height: int, width: int, counts: np.ndarray, status: str, **measured: Any) -> dict[str, Any]:
    """A table row: size, class pixel counts, and `measured` (the _Table.MEASURED columns)."""
    row: dict[str, Any] = {"file": str(path), "height": int(height), "width": int(width)}
    row.update({f"#{k}": int(c) for k, c in enumerate(counts)})
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

    MEASURED = ("level", "objects", "uncertainty_mean", "tiles", "skipped_tiles", "seconds_saved", "seconds", "status")

    def __init__(self, path: Path, class_names: list[str], scans: bool = False):
        """scans: a model for scans, whose rows add serving.scans.SCAN_COLUMNS (kidney volumes)."""
        self.path = path
        self.class_names = class_names
        self.measured = (*SCAN_COLUMNS, *self.MEASURED) if scans else self.MEASURED
        self.columns = ["file", "height", "width", *(f"px_{n}" for n in class_names), *self.measured]
        self.keys = ["file", "height", "width", *(f"#{k}" for k in range(len(class_names))), *self.measured]
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
        out: dict[str, Any] = {k: row[k] for k in ("file", "height", "width", *self.measured)}
        out.update({f"#{k}": row[f"px_{n}"] for k, n in enumerate(self.class_names)})
        return out

    def write(self) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        for _, row in sorted(self.rows.items()):   # by file: the same table whatever the engine's order
            writer.writerow([row.get(k, "") for k in self.keys])
        write_text(self.path, buf.getvalue())
