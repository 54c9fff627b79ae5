"""`flexunet predict` on a scan: a NIfTI volume or a DICOM series in; labels in the scan's
own space, kidney volumes and a diagnosis out.

For each scan, in the output folder (the stem: the file's name without .nii[.gz], or the
series folder's name):
- `<stem>_seg.nii.gz`: uint8 class ids (0 background, then the card's classes) on the
  scan's grid, with its affine and header (serving.volumes.write_like);
- `<stem>_seg.label.txt`: ITK-SNAP's label descriptions (id, colour, name);
- `<stem>_uncertainty.nii.gz`: uint8 normalised entropy x 255 (serving.uncertainty);
- `qc/<stem>.png`: every slice with the kidney outlined (serving.montage);
- `<stem>_seg.json`: the scan's row, its geometry and the label table; written last, so
  its presence means the scan is done (a rerun skips it, as it skips finished images).

How: serving.preparation's steps 1-4 (those of the kidney-nifti import), each display
slice padded and resampled to the model size and predicted in batches of `batch_size`
slices (with --tta, the card's flips), the probabilities restored onto the slice and put
back in the scan's voxel order, where the argmax is taken; then the volume rules and the
kidney volumes of serving.kidneys. Memory: the scan as uint8, the labels, the
uncertainty (uint8) and the foreground probabilities (float16), plus a batch of slices;
never the decoded input.

The row (predictions.csv): the display slice's height and width, voxels per class,
`slices`, `spacing_mm` (the scan's voxel sizes), `tkv_ml`, `right_kidney_ml`,
`left_kidney_ml` (after the rules), `tkv_ml_without_rules`, `diagnosis` and
`diagnosis_probability` (one per scan, from the kept kidney), `uncertainty_mean` (over
the kept kidney, or the whole scan when there is none), `seconds`, `status`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from common.atomic import write_json
from common.errors import UserError
from common.imageio import save_rgb_png
from serving.card import ModelCard
from serving.kidneys import KidneyVolumes, apply_rules, body_midline, diagnose, kidney_volumes
from serving.montage import qc_montage
from serving.preparation import Placement, PreparedScan, ScanGeometry, check_spacing, prepare_scan
from serving.uncertainty import normalised_entropy, to_uint8
from serving.outputs import output_stem
from serving.volumes import ScanSource, open_scan, write_label_table, write_like

if TYPE_CHECKING:
    from serving.batch import Predictor

log = logging.getLogger(__name__)

QC_DIR = "qc"
SCAN_COLUMNS = ("slices", "spacing_mm", "tkv_ml", "right_kidney_ml", "left_kidney_ml", "tkv_ml_without_rules",
                "diagnosis", "diagnosis_probability")


@dataclass(frozen=True)
class ScanTargets:
    """The files one scan writes into `folder`."""

    folder: Path
    stem: str

    @property
    def labels(self) -> Path:
        return self.folder / f"{self.stem}_seg.nii.gz"

    @property
    def label_table(self) -> Path:
        return self.folder / f"{self.stem}_seg.label.txt"

    @property
    def uncertainty(self) -> Path:
        return self.folder / f"{self.stem}_uncertainty.nii.gz"

    @property
    def montage(self) -> Path:
        return self.folder / QC_DIR / f"{self.stem}.png"

    @property
    def summary(self) -> Path:
        return self.folder / f"{self.stem}_seg.json"


def existing_row(targets: ScanTargets) -> dict[str, Any] | None:
    """The row a finished earlier run recorded for this scan, or None (predict it)."""
    if not targets.summary.is_file() or not targets.labels.is_file():
        return None
    try:
        return dict(json.loads(targets.summary.read_text(encoding="utf-8"))["row"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s: exists but is not a finished flexunet summary; predicting the scan again", targets.summary)
        return None


def predict_scan(predictor: Predictor, path: Path, folder: Path) -> dict[str, Any]:
    """Predict one scan and write its outputs (module doc); return its row (without file,
    seconds and status, which serving.batch adds). Raises UserError for a bad scan."""
    card = predictor.card
    if card.plane is None or card.scale != "whole":
        raise UserError(f"{path}: a scan needs a model trained on scan slices (its card records a slicing plane); "
                        f"{predictor.source} takes 2-D images")
    targets = ScanTargets(folder, output_stem(path))
    targets.summary.unlink(missing_ok=True)   # a run that fails from here on must not leave an old summary
    source = open_scan(path)
    prepared = prepare_scan(source.slabs, source.shape, source.affine, plane=card.plane,
                            intensity_percentiles=card.intensity_percentiles, source=path)
    g = prepared.geometry
    first = prepared.display(0)
    size = predictor.tile_size
    check_spacing(Placement(*first.shape, size).spacing(*g.in_plane_spacing()), card.spacing_range,
                  card.spacing_unit, path)
    k = card.num_classes
    ids = np.zeros(g.shape, np.uint8)
    uncertainty = np.zeros(g.shape, np.uint8)
    foreground = np.zeros(g.shape + (k - 1,), np.float16)
    ids_ras, unc_ras, fg_ras = g.ras(ids), g.ras(uncertainty), g.ras(foreground)
    batch = predictor.settings.batch_size
    for start in tqdm(range(0, g.num_slices, batch), desc=f"{output_stem(path)} slices", unit="batch",
                      leave=False, disable=None):
        numbers = range(start, min(start + batch, g.num_slices))
        inputs = [prepared.model_slice(n, size) for n in numbers]
        images = np.stack([predictor.prepare(small) for small, _ in inputs]).astype(np.float32)
        for n, (_, place), small_probs in zip(numbers, inputs, predictor.forward(images)):
            probs = place.restore(small_probs)
            g.put(ids_ras, n, probs.argmax(axis=-1).astype(np.uint8))
            g.put(unc_ras, n, to_uint8(normalised_entropy(probs)))
            g.put(fg_ras, n, probs[..., 1:].astype(np.float16))
    voxel_ml = g.voxel_ml
    midline = body_midline(g.ras(prepared.image))
    raw_kidney = ids_ras != 0
    raw_tkv = kidney_volumes(raw_kidney, voxel_ml, midline).tkv_ml
    kept = apply_rules(raw_kidney, voxel_ml, plane_axis=g.axis, min_component_ml=card.min_component_ml,
                       midline=midline)
    del raw_kidney   # a scan's volumes are large: each is let go as soon as it is done with
    classes, diagnosis, probability = _classes(kept, ids_ras, fg_ras, card.single_foreground_class)
    del ids, ids_ras, foreground, fg_ras
    labels = np.zeros(g.shape, np.uint8)
    g.ras(labels)[...] = classes   # back into the scan's voxel order
    del classes
    volumes = kidney_volumes(kept, voxel_ml, midline)
    row = _row(card, labels, uncertainty, kept, first.shape, g, volumes, raw_tkv, diagnosis, probability)
    _write(targets, source, prepared, labels, uncertainty, card, row)
    return row


def _classes(kept: np.ndarray, argmax: np.ndarray, foreground: np.ndarray, single: bool
             ) -> tuple[np.ndarray, int | None, float | None]:
    """Class ids of the kept kidney (RAS order): one diagnosis for the whole scan when the
    card says so (serving.kidneys.diagnose), else each voxel's own foreground argmax."""
    mass = foreground[kept].sum(axis=0, dtype=np.float64) if kept.any() else np.zeros(foreground.shape[-1])
    diagnosis, probability = diagnose(mass)
    if single or foreground.shape[-1] == 1:
        return kept.astype(np.uint8) * np.uint8(diagnosis or 0), diagnosis, probability
    labels = np.where(kept, argmax, np.uint8(0))
    filled = kept & (argmax == 0)      # holes the rules filled: their most probable foreground class
    labels[filled] = 1 + foreground[filled].argmax(axis=-1).astype(np.uint8)
    return labels, diagnosis, probability


def _row(card: ModelCard, labels: np.ndarray, uncertainty: np.ndarray, kept: np.ndarray,
         slice_shape: tuple[int, int], g: ScanGeometry, volumes: KidneyVolumes, raw_tkv: float,
         diagnosis: int | None, probability: float | None) -> dict[str, Any]:
    counts = [np.count_nonzero(labels == c) for c in range(card.num_classes)]   # bincount would copy to int64
    unc = g.ras(uncertainty)
    mean = float(unc[kept].mean() if kept.any() else unc.mean()) / 255.0
    row: dict[str, Any] = {"height": int(slice_shape[0]), "width": int(slice_shape[1])}
    row.update({f"#{c}": int(n) for c, n in enumerate(counts)})
    row.update(level="", objects="", uncertainty_mean=round(mean, 5), tiles=g.num_slices, skipped_tiles=0,
               seconds_saved="", slices=g.num_slices, spacing_mm="x".join(f"{z:.4g}" for z in g.zooms),
               **volumes.as_dict(), tkv_ml_without_rules=round(raw_tkv, 3),
               diagnosis="" if diagnosis is None else card.class_names[diagnosis],
               diagnosis_probability="" if probability is None else round(probability, 4))
    return row


def _write(targets: ScanTargets, source: ScanSource, prepared: PreparedScan, labels: np.ndarray,
           uncertainty: np.ndarray, card: ModelCard, row: dict[str, Any]) -> None:
    """Every output atomically; the summary last (its presence marks the scan done)."""
    write_like(targets.labels, labels, source, f"flexunet labels: {', '.join(card.class_names)}")
    write_like(targets.uncertainty, uncertainty, source, "flexunet uncertainty: normalised entropy x 255")
    write_label_table(targets.label_table, card.class_names, card.colours)
    g = prepared.geometry
    labels_ras = g.ras(labels)
    title = (f"{targets.stem}: TKV {row['tkv_ml']:.0f} ml (R {row['right_kidney_ml']:.0f}, L {row['left_kidney_ml']:.0f})"
             + (f", {row['diagnosis']} p={row['diagnosis_probability']:.2f}" if row["diagnosis"] else ", no kidney"))
    save_rgb_png(targets.montage, qc_montage([prepared.display(k) for k in range(g.num_slices)],
                                             [np.ascontiguousarray(g.display(labels_ras, k)) for k in range(g.num_slices)],
                                             card.colours, title))
    write_json(targets.summary, {
        "row": row, "input": str(source.path), "kind": source.kind, "shape": list(source.shape),
        "affine": np.round(source.affine, 6).tolist(), "plane": g.plane, "intensity_window": list(prepared.window),
        "labels": {str(i): {"name": n, "colour": list(c)} for i, (n, c) in enumerate(zip(card.class_names, card.colours))},
        "outputs": {"labels": targets.labels.name, "uncertainty": targets.uncertainty.name,
                    "label_table": targets.label_table.name, "qc": f"{QC_DIR}/{targets.montage.name}"}})
