"""Prepare stage: write data/<name>/{train,valid,test,mini_test}/{images,masks} + manifest.

The synthetic generators are the embedded default. Splits are by subject (kidney-t2w)
or by whole large image (glomeruli), so no anatomy appears in two splits. The whole
dataset folder is built in a temp directory and renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import plots
from pipeline.data.sources import ingest
from pipeline.data.synthetic import glomeruli, kidney_t2w
from pipeline.data.masks import SnapCount, ids_to_rgb
from common.errors import ParamsError
from pipeline.layout import SPLITS, TKV_EXTRA, Layout
from pipeline.config.schema import DatasetParams, Params
from common.atomic import atomic_dir, write_json
from common.imageio import list_images, save_rgb_png

log = logging.getLogger(__name__)
FOLDERS = (*SPLITS, "mini_test")


@dataclass
class Writer:
    """Writes image/mask pairs into the staging folder and keeps the statistics."""

    root: Path
    colours: list[tuple[int, int, int]]
    counts: dict[str, int] = field(default_factory=dict)
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    snaps: dict[str, SnapCount] = field(default_factory=dict)   # per split, for the sources that read colour masks

    def __post_init__(self) -> None:
        for split in FOLDERS:
            for kind in ("images", "masks"):
                (self.root / split / kind).mkdir(parents=True, exist_ok=True)
            self.counts[split] = 0
            self.pixels[split] = np.zeros(len(self.colours), dtype=np.int64)

    def write(self, split: str, stem: str, image: np.ndarray, ids: np.ndarray) -> None:
        if split not in self.counts:   # an extra folder (TKV_EXTRA), made on first use
            for kind in ("images", "masks"):
                (self.root / split / kind).mkdir(parents=True, exist_ok=True)
            self.counts[split], self.pixels[split] = 0, np.zeros(len(self.colours), dtype=np.int64)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        save_rgb_png(self.root / split / "images" / f"{stem}.png", image)
        save_rgb_png(self.root / split / "masks" / f"{stem}.png", ids_to_rgb(ids, self.colours))
        self.counts[split] += 1
        self.pixels[split] += np.bincount(ids.reshape(-1), minlength=len(self.colours))

    def snap_count(self, split: str) -> SnapCount:
        """Where a source adds the mask pixels it read for `split`, and how many it snapped."""
        return self.snaps.setdefault(split, SnapCount())

    def snap_report(self, params: Params) -> dict[str, Any]:
        """Pixels read from the source's colour masks and how many were snapped to a map
        colour by mask.color_mode, per split and in total (empty: no colour masks read)."""
        if not self.snaps:
            return {}
        splits = {s: {"snapped": c.snapped, "pixels": c.pixels} for s, c in self.snaps.items()}
        snapped, pixels = sum(c.snapped for c in self.snaps.values()), sum(c.pixels for c in self.snaps.values())
        return {"mask_colours": {"color_mode": params.mask.color_mode, "color_tolerance": params.mask.color_tolerance,
                                 "snapped_pixels": snapped, "mask_pixels": pixels,
                                 "snapped_fraction": round(snapped / max(pixels, 1), 6), "splits": splits}}


def split_groups(keys: list[str], labels: list[str], cfg: DatasetParams) -> dict[str, str]:
    """Assign each key to a split, stratified by label, deterministic by seed; every split
    gets at least one key of each label when there are enough."""
    rng = np.random.default_rng([cfg.seed, 7])
    assignment: dict[str, str] = {}
    for label in sorted(set(labels)):
        members = [k for k, lab in zip(keys, labels) if lab == label]
        members = [members[i] for i in rng.permutation(len(members))]
        n_valid = max(1, round(cfg.split.valid * len(members)))
        n_test = max(1, round(cfg.split.test * len(members)))
        if len(members) - n_valid - n_test < 1:
            raise ParamsError(f"dataset: too few items labelled {label!r} ({len(members)}) to fill 3 splits")
        for i, key in enumerate(members):
            assignment[key] = "valid" if i < n_valid else "test" if i < n_valid + n_test else "train"
    return assignment


def _class_id(params: Params, name: str) -> int:
    try:
        return params.mask.class_names.index(name)
    except ValueError:
        raise ParamsError(f"mask.class_names must contain {name!r} for {params.dataset.name} "
                          f"(got {params.mask.class_names})") from None


def _kidney(params: Params, writer: Writer) -> dict[str, Any]:
    cfg = params.dataset
    subjects = kidney_t2w.make_subjects(cfg.num_subjects, cfg.repeat_fraction, cfg.repeat_scans, cfg.seed)
    splits = split_groups([s.subject_id for s in subjects], [s.group for s in subjects], cfg)
    group_class = {g: _class_id(params, g) for g in kidney_t2w.GROUPS}
    rng = np.random.default_rng([cfg.seed, 11])
    records, scans, mini = [], [], []
    for subject in tqdm(subjects, desc="kidney-t2w subjects", unit="subject"):
        split = splits[subject.subject_id]
        # Randomised appearance is a training device; the other splits keep the T2w-like one.
        appearance = cfg.appearance if split in cfg.randomise.splits else "realistic"
        for scan in range(subject.n_scans):
            vol = kidney_t2w.render_scan(subject, scan, cfg.image_size, cfg.slices_per_scan, cfg.seed,
                                         appearance, cfg.randomise, slice_mm=cfg.slice_mm)
            stems, extra = [], []
            for z in range(vol.image.shape[0]):
                has_kidney = bool(vol.kidney[z].any())
                stem = f"{subject.subject_id}_scan{scan + 1}_z{z:02d}"
                if not has_kidney and rng.random() >= cfg.kidney_free_fraction:
                    if split == "test":   # not a Dice test image, but part of the scan's TKV
                        writer.write(TKV_EXTRA, stem, vol.image[z], np.zeros_like(vol.kidney[z], np.uint8))
                        extra.append(stem)
                    continue
                ids = vol.kidney[z].astype(np.uint8) * group_class[subject.group]
                writer.write(split, stem, vol.image[z], ids)
                stems.append(stem)
                if split == "test" and has_kidney and z == vol.image.shape[0] // 2 and scan == 0:
                    mini.append((stem, vol.image[z], ids))
            # What the TKV evaluation needs: which slices form the scan, and a voxel's volume.
            scans.append({"subject_id": subject.subject_id, "scan": scan + 1, "group": subject.group,
                          "split": split, "voxel_ml": float(np.prod(vol.spacing_mm)) / 1000.0, "stems": stems,
                          "tkv_extra_stems": extra})
        records.append({"subject_id": subject.subject_id, "group": subject.group, "n_scans": subject.n_scans,
                        "split": split, "spacing_mm": list(vol.spacing_mm)})
    for stem, image, ids in mini[: cfg.num_mini_test]:
        writer.write("mini_test", stem, image, ids)
    randomised = {"appearance": cfg.appearance, "randomise": cfg.randomise.model_dump()}
    # The field of view is fixed, so a whole slice at the model size is always FOV_MM / size
    # per pixel; the randomised draws zoom the anatomy by up to +/- randomise.scaling.
    nominal = kidney_t2w.FOV_MM / cfg.image_size
    zoom = cfg.randomise.scaling if cfg.appearance == "randomised" else 0.0
    scale = scale_record("whole", "mm", nominal, (nominal / (1 + zoom), nominal / (1 - zoom)), params)
    return {"subjects": records, "scans": scans, "scale": scale,
            **(randomised if cfg.appearance == "randomised" else {})}


def scale_record(scale: str, unit: str, spacing: float | None, spacing_range: tuple[float, float] | None,
                 params: Params) -> dict[str, Any]:
    """How the training images meet the model and at what physical scale: the model card's
    scale fields (serving/card.py), which export copies from the manifest. Kidney scans
    also record the slicing plane and intensity percentiles of serving.preparation."""
    if spacing is not None and spacing_range is None:
        spacing_range = (spacing, spacing)
    record: dict[str, Any] = {"scale": scale, "spacing_unit": unit, "spacing": spacing,
                              "spacing_range": None if spacing_range is None else [round(v, 6) for v in spacing_range]}
    if params.dataset.name == "kidney-t2w":
        nifti = params.dataset.nifti
        record.update(plane=nifti.slice_axis if params.dataset.source == "kidney-nifti" else "coronal",
                      intensity_percentiles=list(nifti.intensity_percentiles))
    return record


def _glomeruli(params: Params, writer: Writer) -> dict[str, Any]:
    cfg = params.dataset
    tile, large = cfg.image_size, cfg.image_size * cfg.large_image_factor
    keys = [f"glom-{i:03d}" for i in range(cfg.num_large_images)]
    splits = split_groups(keys, ["all"] * len(keys), cfg)
    class_id = _class_id(params, "glomerulus")
    n_mini = 0
    mpp = cfg.mpp or glomeruli.DEFAULT_MPP
    for index, key in enumerate(tqdm(keys, desc="glomeruli images", unit="image")):
        # Randomised appearance is a training device; the other splits keep the typical PAS one.
        appearance = cfg.appearance if splits[key] in cfg.stain.splits else "realistic"
        image, glom = glomeruli.render_glomeruli(large, index, cfg.seed, mpp, appearance, cfg.stain)
        ids = glom.astype(np.uint8) * class_id
        split = splits[key]
        for y in range(0, large, tile):
            for x in range(0, large, tile):
                writer.write(split, f"{key}_y{y}_x{x}", image[y:y + tile, x:x + tile], ids[y:y + tile, x:x + tile])
        if split == "test" and n_mini < cfg.num_mini_test:
            writer.write("mini_test", key, image, ids)  # whole image, for tiled inference
            n_mini += 1
    jitter = cfg.stain.scale_jitter if cfg.appearance == "randomised" else 0.0
    randomised = {"appearance": cfg.appearance, "stain": cfg.stain.model_dump()} if cfg.appearance == "randomised" else {}
    return {"images": [{"id": k, "split": splits[k], "size": large} for k in keys],
            "scale": scale_record("tiled", "um", mpp, (mpp / (1 + jitter), mpp * (1 + jitter)), params),
            **randomised}


def _build(params: Params, writer: Writer, project_root: Path) -> dict[str, Any]:
    cfg = params.dataset
    if cfg.source == "synthetic":
        return {"kidney-t2w": _kidney, "glomeruli": _glomeruli}[cfg.name](params, writer)
    raw = ingest.raw_folder(params, project_root)

    def split_of(keys: list[str], labels: list[str]) -> dict[str, str]:
        return split_groups(keys, labels, cfg)

    if cfg.source == "imagemask":   # images resized whole to the model size, at a scale not recorded
        return {**ingest.import_imagemask(params, raw, writer), "scale": scale_record("whole", "mm", None, None, params)}
    if cfg.source == "glomeruli-png":
        return {**ingest.import_glomeruli(params, raw, writer, split_of),
                "scale": scale_record("tiled", "um", cfg.mpp, None, params)}
    details = ingest.import_kidney_nifti(params, raw, writer, split_of)
    spacings = [s["model_spacing_mm"] for s in details["scans"]]
    return {**details, "scale": scale_record("whole", "mm", float(np.median(spacings)),
                                             (min(spacings), max(spacings)), params)}


def fingerprint(folder: Path) -> str:
    """sha256 over every image/mask file (path and bytes): equal iff the data is equal."""
    digest = hashlib.sha256()
    for split in (*FOLDERS, TKV_EXTRA):
        for kind in ("images", "masks"):
            sub = folder / split / kind
            for path in list_images(sub) if sub.is_dir() else []:
                digest.update(f"{split}/{kind}/{path.name}".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def prepare(layout: Layout) -> dict[str, Any]:
    """Generate the configured dataset; return (and write) its manifest."""
    params = layout.params
    cfg = params.dataset
    with atomic_dir(layout.data_dir) as staging:
        writer = Writer(staging, params.mask.colours)
        details = _build(params, writer, layout.root)
        for split in SPLITS:
            if writer.counts[split] == 0:
                raise ParamsError(f"dataset: split {split!r} came out empty; raise dataset.num_subjects/num_large_images")
        stats = _statistics(params, writer)
        manifest = {
            "dataset": cfg.name, "source": cfg.source, "seed": cfg.seed, "image_size": cfg.image_size,
            "class_names": params.mask.class_names,
            "rgb_map": {"({},{},{})".format(*c): i for c, i in params.mask.rgb_map.items()},
            "counts": writer.counts, "fingerprint": fingerprint(staging), **writer.snap_report(params), **details,
        }
        write_json(staging / "manifest.json", manifest)
    write_json(layout.metrics / "dataset.json", stats)
    plots.dataset_statistics(stats, layout.plots / "dataset_statistics.png")
    log.info("%s: %s -> %s", cfg.name, writer.counts, layout.data_dir)
    if snaps := writer.snap_report(params):
        report = snaps["mask_colours"]
        log.info("mask colours: %d of %d pixels snapped to a map colour (color_mode %s)",
                 report["snapped_pixels"], report["mask_pixels"], params.mask.color_mode)
    return manifest


def _statistics(params: Params, writer: Writer) -> dict[str, Any]:
    fractions = {s: (px / max(px.sum(), 1)).round(6).tolist() for s, px in writer.pixels.items() if s in FOLDERS}
    return {"dataset": params.dataset.name, "images": {s: n for s, n in writer.counts.items() if s in FOLDERS},
            "class_fraction": fractions,
            "class_names": params.mask.class_names, "class_colours": [list(c) for c in params.mask.colours],
            **writer.snap_report(params)}
