"""Predict stage (tiled evaluation of mini_test): seam geometry, Dice bookkeeping, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data.masks import read_mask
from pipeline.stages.prepare import prepare
from pipeline.layout import Layout
from pipeline.config.load import params_from_dict
from pipeline.stages.evaluate_tiled import evaluate_tiled, seam_mask
from pipeline.tracking import start_run
from common.atomic import write_json
from common.errors import UserError
from pipeline.scoring.confusion import confusion, dice_scores
from pipeline.scoring.objects import ObjectCounts, detection_scores
from tests.conftest import tiny_dict
from tests.onnx_models import make_tiny_onnx


def test_seam_mask_marks_inner_window_borders_only():
    # 64 px, tile 32, overlap 0: windows at 0 and 32 -> one inner border at 32 on each axis.
    mask = seam_mask(64, 64, 32, 0.0, 4)
    assert mask[28:36, :].all() and mask[:, 28:36].all()
    assert not mask[:28, :28].any() and not mask[36:, 36:].any()
    # 80 px, tile 32, overlap 0.5: windows 0, 16, 32, 48 -> borders 16, 32, 48 (and 64 = 48 + 16).
    mask = seam_mask(32, 80, 32, 0.5, 2)
    assert set(np.flatnonzero(mask[0])) == {14, 15, 16, 17, 30, 31, 32, 33, 46, 47, 48, 49, 62, 63, 64, 65}
    assert not seam_mask(32, 32, 32, 0.25, 4).any()  # one window: no seams


@pytest.fixture
def glomeruli_layout(tmp_path) -> Layout:
    raw = tiny_dict("glomeruli")
    raw["predict"]["seam_width"] = 4
    layout = Layout(tmp_path, params_from_dict(raw))
    manifest = prepare(layout)
    p = layout.params
    make_tiny_onnx(layout.onnx_file, num_classes=2, tile_size=32, size_multiple=4, kernel_size=3,
                   class_names=p.mask.class_names, colours=p.mask.colours, spacing=2.0)
    with start_run(p.mlflow, tmp_path, tags={"dataset.fingerprint": manifest["fingerprint"]}) as run:
        pass
    write_json(layout.run_file, {"run_id": run.run_id})
    return layout


def test_tiled_evaluation_writes_masks_metrics_and_panel(glomeruli_layout):
    layout = glomeruli_layout
    report = evaluate_tiled(layout)
    on_disk = json.loads((layout.metrics / "tiled.json").read_text())
    images = sorted((layout.data_dir / "mini_test" / "images").iterdir())
    assert on_disk["images"] == report["images"] == len(images) >= 1 and on_disk["failed"] == 0
    assert (layout.plots / "tiled_panel.png").is_file()
    # The reported tiled Dice is the Dice of the masks written to disk.
    total = np.zeros((2, 2), np.int64)
    for image in images:
        pred = read_mask(layout.tiled_predictions / f"{image.stem}.png", layout.params.mask)
        truth = read_mask(layout.data_dir / "mini_test" / "masks" / image.name, layout.params.mask)
        assert pred.shape == truth.shape == (64, 64)  # whole large images, not tiles
        total += confusion(truth, pred, 2)
    expected = dice_scores(total, layout.params.mask.class_names, "tiled_")["tiled_mean_foreground_dice"]
    assert report["tiled_mean_foreground_dice"] == pytest.approx(expected)
    # 64 px images with 32 px tiles have seams: both seam and interior Dice exist.
    assert report["seam_mean_foreground_dice"] is not None and "seam_cost" in report
    assert report["resized_mean_foreground_dice"] is not None
    assert (layout.tiled_predictions / "predictions.csv").is_file()
    # 64 px images, 32 px tiles at overlap 0.25: 3 x 3 windows each; no tissue skip by default
    assert report["tiles"] == 9 * len(images) and report["skipped_tiles"] == 0
    assert report["tissue_threshold"] is None
    # Object scores of the same whole masks (glomeruli: detection at IoU >= 0.5).
    assert on_disk["object_metrics"] == "detection"
    objects = ObjectCounts()
    for image in images:
        objects += detection_scores(read_mask(layout.data_dir / "mini_test" / "masks" / image.name, layout.params.mask),
                                    read_mask(layout.tiled_predictions / f"{image.stem}.png", layout.params.mask))
    assert {f"tiled_{k}": v for k, v in objects.metrics().items()}.items() <= on_disk.items()
    assert on_disk["tiled_objects_true"] >= 1
    assert 0 <= on_disk["tiled_objects_matched"] <= min(on_disk["tiled_objects_true"], on_disk["tiled_objects_predicted"])
    assert on_disk["tiled_object_f1"] is None or 0 <= on_disk["tiled_object_f1"] <= 1
    # The real PAS tiles through flexunet predict at 0.5 um/px: their own file, panel and MLflow metrics.
    real = json.loads(layout.real_sample_predict_file.read_text())
    assert (real["available"], real["real_tiles"], real["spacing"], real["real_objects_true"]) == (True, 6, 0.5, 9)
    assert len(real["per_tile"]) == 6 and "predict_real_kidney_dice" not in on_disk
    assert (layout.plots / "real_sample_predict_panel.png").is_file()
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import resolve_tracking_uri

    logged = MlflowClient(resolve_tracking_uri(layout.params.mlflow, layout.root)).get_run(
        json.loads(layout.run_file.read_text())["run_id"]).data.metrics
    assert logged["real_glomerulus_dice"] == pytest.approx(real["real_glomerulus_dice"])
    assert logged["real_object_f1_ci_high"] == pytest.approx(real["real_object_f1_ci_high"])
    assert "mini_test_real_glomerulus_dice" not in logged and "mini_test_tiled_mean_foreground_dice" in logged


def test_failed_tiled_evaluation_leaves_no_outputs(glomeruli_layout):
    layout = glomeruli_layout
    layout.onnx_file.write_bytes(b"not an onnx model")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        evaluate_tiled(layout)
    assert not (layout.metrics / "tiled.json").exists() and not layout.tiled_predictions.exists()
    assert not layout.real_sample_predict_file.exists()
