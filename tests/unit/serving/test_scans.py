"""`flexunet predict` on scans: one synthetic subject stored in four orientations and at two
spacings gives one TKV; outputs in the scan's space; DICOM like NIfTI; mixed folders;
resume; every bad scan one line with nothing written."""

from __future__ import annotations

import csv
import json
import logging

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from serving import volumes
from serving.batch import predict_folder, resolve_inputs
from serving.load import load_predictor
from tests.onnx_models import make_kidney_onnx, make_tiny_onnx
from tests.scan_files import oracle_scan, save_nifti, write_dicom_series

ORIENTATIONS = ("RAS", "LPS", "ASL", "PIR")     # canonical, flipped, and two with the axes permuted
SPACINGS = (1.5, 3.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_kidney_onnx(tmp_path_factory.mktemp("model") / "kidney.onnx")


@pytest.fixture(scope="module")
def predicted(model, tmp_path_factory):
    """The subject written 8 ways, predicted in one batch: (inputs folder, outputs, rows, truth)."""
    root = tmp_path_factory.mktemp("scans")
    truth = {}
    for spacing in SPACINGS:
        for codes in ORIENTATIONS:
            volume = oracle_scan(spacing_mm=spacing, orientation=codes)
            name = f"sub3_{spacing:g}mm_{codes}"
            save_nifti(root / "in" / f"{name}.nii.gz", volume.image, volume.affine)
            truth[name] = volume.true_ml
    summary = predict_folder(load_predictor(model), resolve_inputs(str(root / "in")), root / "out")
    assert summary.ok == 8 and summary.failed == 0
    rows = {r["file"].rsplit("/", 1)[-1].removesuffix(".nii.gz"): r
            for r in csv.DictReader(open(root / "out" / "predictions.csv"))}
    return root / "in", root / "out", rows, truth


def test_one_subject_in_four_orientations_and_two_spacings_gives_one_tkv(predicted):
    _, _, rows, truth = predicted
    tkv = {name: float(r["tkv_ml"]) for name, r in rows.items()}
    assert max(tkv.values()) / min(tkv.values()) < 1.02
    for name, row in rows.items():
        true = truth[name]
        for key in ("tkv_ml", "right_kidney_ml", "left_kidney_ml"):
            assert float(row[key]) == pytest.approx(true[key], rel=0.02), (name, key)
        assert row["diagnosis"] == "CKD" and float(row["diagnosis_probability"]) == pytest.approx(np.e / (1 + np.e), abs=0.01)
        assert int(row["slices"]) == 18 and row["status"] == "ok"
    # the orientation changes nothing at all: the same voxels are cut into the same slices
    for spacing in SPACINGS:
        same = {rows[f"sub3_{spacing:g}mm_{c}"]["tkv_ml"] for c in ORIENTATIONS}
        assert len(same) == 1, same
    assert truth["sub3_1.5mm_RAS"]["right_kidney_ml"] > 1.5 * truth["sub3_1.5mm_RAS"]["left_kidney_ml"]


def test_outputs_reload_in_the_inputs_space(predicted):
    inputs, out, rows, _ = predicted
    for name in rows:
        scan = nib.load(str(inputs / f"{name}.nii.gz"))
        for suffix in ("_seg.nii.gz", "_uncertainty.nii.gz"):
            back = nib.load(str(out / f"{name}{suffix}"))
            assert back.shape == scan.shape and np.allclose(back.affine, scan.affine), (name, suffix)
            assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 1
        labels = np.asarray(nib.load(str(out / f"{name}_seg.nii.gz")).dataobj)
        assert set(np.unique(labels)) == {0, 1}            # one diagnosis: CKD (1) everywhere
        assert int(rows[name]["px_CKD"]) == int((labels == 1).sum())
        summary = json.loads((out / f"{name}_seg.json").read_text())
        assert summary["row"]["tkv_ml"] == pytest.approx(float(rows[name]["tkv_ml"]))
        assert summary["labels"]["1"] == {"name": "CKD", "colour": [255, 0, 0]}
        assert '"CKD"' in (out / f"{name}_seg.label.txt").read_text()
        montage = Image.open(out / "qc" / f"{name}.png")
        assert montage.width >= 5 * 150 and montage.height > 4 * 150      # 18 slices in a 5 x 4 grid


def test_a_dicom_series_gives_the_niftis_labels_and_a_folder_mixes_kinds(model, tmp_path):
    volume = oracle_scan(spacing_mm=3.0, orientation="LIP")   # a coronal series as a scanner stores it
    scans = tmp_path / "scans"
    save_nifti(scans / "as_nifti.nii.gz", volume.image, volume.affine)
    write_dicom_series(scans / "as_dicom", volume.image, volume.affine)
    Image.fromarray(np.full((40, 30), 90, np.uint8)).save(scans / "slice.png")
    inputs = resolve_inputs(str(scans))
    assert [p.name for p in inputs] == ["as_dicom", "as_nifti.nii.gz", "slice.png"]
    assert predict_folder(load_predictor(model), inputs, tmp_path / "out").ok == 3
    dicom = nib.load(str(tmp_path / "out" / "as_dicom_seg.nii.gz"))
    nifti = nib.load(str(tmp_path / "out" / "as_nifti_seg.nii.gz"))
    assert np.allclose(dicom.affine, nifti.affine, atol=1e-4)
    assert np.array_equal(np.asarray(dicom.dataobj), np.asarray(nifti.dataobj))
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))}
    assert rows["as_dicom"]["tkv_ml"] == rows["as_nifti.nii.gz"]["tkv_ml"] != ""
    assert rows["slice.png"]["tkv_ml"] == "" and rows["slice.png"]["status"] == "ok"
    assert resolve_inputs(str(scans / "as_dicom")) == [scans / "as_dicom"]     # the series folder itself
    assert resolve_inputs(str(scans / "as_*")) == [scans / "as_dicom", scans / "as_nifti.nii.gz"]   # a glob


def test_a_rerun_reuses_finished_scans(model, tmp_path):
    volume = oracle_scan(spacing_mm=3.0, slices=14)
    path = save_nifti(tmp_path / "in" / "a.nii.gz", volume.image, volume.affine)
    predictor = load_predictor(model)
    first = predict_folder(predictor, [path], tmp_path / "out")
    again = predict_folder(predictor, [path], tmp_path / "out")
    assert (first.ok, again.skipped) == (1, 1)
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert rows[0]["status"] == "skipped-existing" and float(rows[0]["tkv_ml"]) > 100
    (tmp_path / "out" / "a_seg.json").unlink()          # the summary is written last: without it, predict again
    assert predict_folder(predictor, [path], tmp_path / "out").ok == 1
    save_nifti(path, np.full((8, 8, 8), 3, np.int16), volume.affine)   # a redo that fails drops the old summary
    assert predict_folder(predictor, [path], tmp_path / "out", overwrite=True).failed == 1
    assert not (tmp_path / "out" / "a_seg.json").exists()


def _bad(tmp_path, how: str):
    """A bad scan in tmp_path/in; returns (its path, a fragment of its one-line error)."""
    folder = tmp_path / "in"
    volume = oracle_scan(spacing_mm=6.0, slices=12)
    if how == "2-D":
        return save_nifti(folder / "flat.nii.gz", volume.image[:, 0, :], np.eye(4)), "a 2-D image of shape (64, 64)"
    if how == "5-D":
        return (save_nifti(folder / "five.nii.gz", volume.image[..., None, None], volume.affine),
                "a 5-D image of shape (64, 12, 64, 1, 1)")
    if how == "NaN":
        image = volume.image.astype(np.float32)
        image[3, 3, 3] = np.inf
        return save_nifti(folder / "nan.nii.gz", image, volume.affine), "1 voxels are NaN or infinite"
    if how == "constant":
        return save_nifti(folder / "flat.nii.gz", np.full((8, 8, 8), 3, np.int16), volume.affine), \
            "the volume is constant (3); not an image"
    if how == "two-series":
        write_dicom_series(folder / "mixed", volume.image, volume.affine)
        write_dicom_series(folder / "mixed", volume.image, volume.affine, start=100)
        return folder / "mixed", "holds 2 DICOM series"
    if how == "gap":
        return write_dicom_series(folder / "gap", volume.image, volume.affine, skip=(5,)), "a slice is missing"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["2-D", "5-D", "NaN", "constant", "two-series", "gap"])
def test_every_bad_scan_is_one_line_and_writes_nothing(model, tmp_path, how, caplog):
    path, fragment = _bad(tmp_path, how)
    with caplog.at_level(logging.ERROR):
        status = main(["predict", "--model", str(model), "--input", str(path.parent if how in ("two-series", "gap")
                                                                         else path), "--output", str(tmp_path / "out")])
    assert status == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and str(path) in errors[0] and fragment in errors[0], errors
    written = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == ["predictions.csv"], written


def test_an_oblique_scan_is_warned_about_and_keeps_its_exact_affine(model, tmp_path, caplog):
    volume = oracle_scan(spacing_mm=3.0, slices=14)
    angle = np.radians(18)
    rotation = np.eye(4)
    rotation[:3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    path = save_nifti(tmp_path / "oblique.nii.gz", volume.image, rotation @ volume.affine)
    straight = save_nifti(tmp_path / "straight" / "s.nii.gz", volume.image, volume.affine)
    predictor = load_predictor(model)
    with caplog.at_level(logging.WARNING):
        assert predict_folder(predictor, [path], tmp_path / "out").ok == 1
    assert "oblique.nii.gz: the scan's axes are 18.0 degrees oblique" in caplog.text
    out = nib.load(str(tmp_path / "out" / "oblique_seg.nii.gz"))
    assert np.allclose(out.affine, rotation @ volume.affine)
    predict_folder(predictor, [straight], tmp_path / "out2")      # sliced along its own axes, as if straight
    assert np.array_equal(np.asarray(out.dataobj), np.asarray(nib.load(str(tmp_path / "out2" / "s_seg.nii.gz")).dataobj))


def test_a_scan_is_read_a_few_slices_at_a_time(model, tmp_path, monkeypatch):
    volume = oracle_scan(spacing_mm=6.0, slices=12)
    path = save_nifti(tmp_path / "a.nii.gz", volume.image, volume.affine)
    monkeypatch.setattr(volumes, "SLAB", 3)
    reads = []
    original = volumes.ScanSource.slabs

    def counted(self):
        for slab in original(self):
            reads.append(slab.shape)
            yield slab

    monkeypatch.setattr(volumes.ScanSource, "slabs", counted)
    assert predict_folder(load_predictor(model), [path], tmp_path / "out").ok == 1
    assert reads and max(s[2] for s in reads) == 3 and all(s[:2] == volume.image.shape[:2] for s in reads)


def test_a_model_for_2d_images_refuses_a_scan_in_one_line(tmp_path):
    volume = oracle_scan(spacing_mm=6.0, slices=12)
    path = save_nifti(tmp_path / "a.nii.gz", volume.image, volume.affine)
    tiled = load_predictor(make_tiny_onnx(tmp_path / "tiny.onnx"))
    summary = predict_folder(tiled, [path], tmp_path / "out")
    assert summary.failed == 1 and "a scan needs a model trained on scan slices" in summary.errors[0]
