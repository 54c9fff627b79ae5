"""Real datasets -> the seed layout data/<name>/{train,valid,test,mini_test}/{images,masks}.

- imagemask: an existing folder in the seed's layout (`<raw>/{train,valid,test}/{images,masks}`,
  optional `mini_test`), validated pair by pair (readable, same size, no side under
  pairs.MIN_SIDE px, colours read by mask.color_mode) and imported: images resized to the
  model size (bilinear) with their masks (nearest); mini_test keeps its own size (tiled
  inference). Without mini_test, the panels use the first test images.
- glomeruli-png: whole images `<raw>/images/<stem>.png` with masks `<raw>/masks/<stem>.png`
  (the 1024 px HuBMAP set) -> training tiles of the model size, spread evenly over each
  image with `dataset.tile_overlap` (nnU-Net's window spacing, as the tiled predictor
  uses: a side that is not a multiple of the tile gets a last tile flush with the border,
  overlapping its neighbour, instead of padding); split by whole image; the test
  images also go whole into mini_test. An image smaller than a tile is an error.
- kidney-nifti: pipeline/data/sources/nifti.py, assembled here into slices and a scan list.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.data.sources import nifti
from pipeline.data.masks import read_mask
from pipeline.data.pairs import MIN_SIDE, find_pairs, validate_pairs
from common.errors import DataError
from pipeline.layout import TKV_EXTRA
from pipeline.config.schema import Params
from common.imageio import read_image, resize_image, resize_labels
from common.errors import UserError
from serving.preparation import Placement, in_memory, labels_to_model_size, prepare_scan
from serving.tiling import window_starts

log = logging.getLogger(__name__)
SPLIT_FOLDERS = ("train", "valid", "test")


def raw_folder(params: Params, project_root: Path) -> Path:
    raw = Path(params.dataset.raw)
    raw = raw if raw.is_absolute() else project_root / raw
    if not raw.is_dir() or not any(raw.iterdir()):
        raise DataError(f"{raw}: raw data folder missing or empty; put the {params.dataset.source} data there "
                        f"(docs/data.md, 'Real data') and track it with `dvc add {params.dataset.raw}`")
    return raw


def _resize(image: np.ndarray, ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    if image.shape[:2] == (size, size):
        return image, ids
    return resize_image(image, size, size), resize_labels(ids, size, size)


def import_imagemask(params: Params, raw: Path, writer) -> dict[str, Any]:
    size, channels = params.dataset.image_size, params.model.image_channels
    folders = [f for f in (*SPLIT_FOLDERS, "mini_test") if (raw / f).is_dir()]
    missing = [f for f in SPLIT_FOLDERS if f not in folders]
    if missing:
        raise DataError(f"{raw}: split folder(s) {missing} missing; expected {raw}/<split>/images and /masks "
                        f"for train, valid and test (mini_test optional)")
    by_folder = {folder: find_pairs(raw / folder) for folder in folders}
    seen: dict[str, Path] = {}
    for folder in SPLIT_FOLDERS:   # one image in two splits would leak test data into training
        for pair in by_folder[folder]:
            if pair.image.stem in seen:
                raise DataError(f"{pair.image}: duplicate stem {pair.image.stem!r} (also {seen[pair.image.stem]}); "
                                f"an image may be in one split only")
            seen[pair.image.stem] = pair.image
    # All folders at once: one error sums up the unknown colours of every mask.
    validate_pairs([p for pairs in by_folder.values() for p in pairs], params.mask, desc="checking imagemask",
                   min_side=MIN_SIDE)
    for folder, pairs in by_folder.items():
        for pair in tqdm(pairs, desc=f"importing {folder}", unit="pair", leave=False):
            image = read_image(pair.image, channels)
            ids = read_mask(pair.mask, params.mask, writer.snap_count(folder))
            if folder != "mini_test":
                image, ids = _resize(image, ids, size)
            writer.write(folder, pair.image.stem, image, ids)
    return {"raw": str(params.dataset.raw), "resized_to": size}


def import_glomeruli(params: Params, raw: Path, writer, split_of) -> dict[str, Any]:
    cfg, tile = params.dataset, params.dataset.image_size
    pairs = find_pairs(raw)
    validate_pairs(pairs, params.mask, desc="checking glomeruli", min_side=MIN_SIDE)
    splits = split_of([p.image.stem for p in pairs], ["all"] * len(pairs))
    records, n_mini = [], 0
    for pair in tqdm(pairs, desc="glomeruli images", unit="image"):
        split = splits[pair.image.stem]
        image = read_image(pair.image, params.model.image_channels)
        ids = read_mask(pair.mask, params.mask, writer.snap_count(split))
        h, w = ids.shape
        if h < tile or w < tile:
            raise DataError(f"{pair.image}: {w}x{h} is smaller than one {tile} px tile; lower dataset.image_size")
        for y in window_starts(h, tile, cfg.tile_overlap):
            for x in window_starts(w, tile, cfg.tile_overlap):
                writer.write(split, f"{pair.image.stem}_y{y}_x{x}", image[y:y + tile, x:x + tile],
                             ids[y:y + tile, x:x + tile])
        if split == "test" and n_mini < cfg.num_mini_test:
            writer.write("mini_test", pair.image.stem, image, ids)
            n_mini += 1
        records.append({"id": pair.image.stem, "split": split, "size": [w, h],
                        "multiple_of_tile": h % tile == 0 and w % tile == 0})
    return {"raw": str(cfg.raw), "images": records}


def import_kidney_nifti(params: Params, raw: Path, writer, split_of) -> dict[str, Any]:
    cfg, ncfg, size = params.dataset, params.dataset.nifti, params.dataset.image_size
    scans = nifti.discover(raw, ncfg)
    groups = nifti.read_subjects(raw / ncfg.subjects_csv, ncfg, params.mask.class_names)
    for s in scans:
        if s.subject not in groups:
            raise DataError(f"{s.image}: subject {s.subject!r} is not in {raw / ncfg.subjects_csv}")
    subjects = sorted({s.subject for s in scans})
    n_scans = {subj: sum(1 for x in scans if x.subject == subj) for subj in subjects}
    # Stratified by group and by "has repeat scans", so the test split gets repeat-scan
    # subjects for the TKV precision (CV) whenever there are enough (3) to spread.
    labels = [f"{groups[s]}+repeats" if n_scans[s] > 1 else groups[s] for s in subjects]
    labels = [lab if labels.count(lab) >= 3 else lab.removesuffix("+repeats") for lab in labels]
    splits = split_of(subjects, labels)
    scan_records, mini = [], []
    for s in tqdm(scans, desc="kidney-nifti scans", unit="scan"):
        vol = nifti.load_scan(s, ncfg)
        try:   # the preparation `flexunet predict` applies to a scan (serving.preparation)
            prepared = prepare_scan(in_memory(vol.image), vol.image.shape, vol.affine, plane=ncfg.slice_axis,
                                    intensity_percentiles=ncfg.intensity_percentiles, source=s.image)
        except UserError as exc:
            raise DataError(str(exc)) from None
        geometry = prepared.geometry
        mask = geometry.ras(vol.mask)
        class_id = params.mask.class_names.index(groups[s.subject])
        split, stems, extra = splits[s.subject], [], []
        # Per scan: adding or changing one subject leaves every other scan's slices as they were.
        rng = np.random.default_rng([cfg.seed, 11, zlib.crc32(s.subject.encode()), s.scan])
        middle = max(range(geometry.num_slices), key=lambda k: geometry.display(mask, k).sum())
        for k in range(geometry.num_slices):
            mask2d = geometry.display(mask, k)
            keep = mask2d.any() or rng.random() < cfg.kidney_free_fraction
            if not keep and split != "test":
                continue
            small, place = prepared.model_slice(k, size)
            small_mask = labels_to_model_size(mask2d, place)
            stem = f"{s.subject}_scan{s.scan}_{ncfg.slice_axis[:3]}{k:03d}"
            if not keep:   # a test scan's dropped slice still counts towards its predicted TKV
                writer.write(TKV_EXTRA, stem, small, small_mask)
                extra.append(stem)
                continue
            writer.write(split, stem, small, small_mask * class_id)
            stems.append(stem)
            if split == "test" and k == middle and s.scan == min(x.scan for x in scans if x.subject == s.subject):
                mini.append((stem, small, small_mask * class_id))
        row_mm, col_mm = geometry.in_plane_spacing()
        thickness = geometry.ras_zooms[geometry.axis]
        place = Placement(*prepared.display(0).shape, size)   # every slice of a scan has one size
        model_row, model_col = row_mm * place.side / size, col_mm * place.side / size
        scan_records.append({
            "subject_id": s.subject, "scan": s.scan, "group": groups[s.subject], "split": split,
            "image_file": s.image.name, "shape": list(vol.image.shape), "spacing_mm": list(geometry.ras_zooms),
            "slice_thickness_mm": thickness, "model_spacing_mm": 0.5 * (model_row + model_col),
            "voxel_ml": model_row * model_col * thickness / 1000.0, "stems": stems, "tkv_extra_stems": extra,
            "true_tkv_ml_native": float(vol.mask.sum()) * geometry.voxel_ml})
    for stem, image, ids in mini[: cfg.num_mini_test]:
        writer.write("mini_test", stem, image, ids)
    subject_records = [{"subject_id": s, "group": groups[s], "split": splits[s],
                        "n_scans": sum(1 for x in scans if x.subject == s)} for s in subjects]
    return {"raw": str(cfg.raw), "subjects": subject_records, "scans": scan_records}
