"""Real-data sources of the prepare stage on small files made here: kidney-nifti (NIfTI
volumes + subject CSV), glomeruli-png and imagemask; every bad input named in one line."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipeline.data.masks import read_mask
from pipeline.stages.prepare import prepare
from common.errors import DataError, ParamsError
from pipeline.layout import Layout
from pipeline.config.load import params_from_dict
from tests.conftest import tiny_dict

SPACING = (1.5, 5.0, 1.5)   # x, y (coronal slice thickness), z in mm


def _volume(seed: int, small: bool) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) = (24, 6, 30) RAS volume: noisy body, two ellipsoid kidneys (label 1 left, 2 right)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(np.arange(24), np.arange(6), np.arange(30), indexing="ij")
    r = 3.0 if small else 4.5
    mask = np.zeros((24, 6, 30), np.uint8)
    for label, cx in ((1, 7), (2, 17)):
        inside = ((x - cx) / r) ** 2 + ((y - 2.5) / 3.0) ** 2 + ((z - 15) / (1.8 * r)) ** 2 <= 1
        mask[inside] = label
    image = 200 + 40 * rng.standard_normal(mask.shape) + 300 * (mask > 0)
    return image.astype(np.float32), mask


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*SPACING, 1.0]) if affine is None else affine), str(path))


SUBJECTS = {"S01": "CKD", "S02": "CKD", "S03": "CKD", "S04": "CKD",
            "S05": "Healthy Control", "S06": "Healthy Control", "S07": "Healthy Control", "S08": "Healthy Control"}


def make_raw(root: Path, subjects: dict[str, str] = SUBJECTS, repeats: int = 3) -> Path:
    raw = root / "data" / "raw" / "kidney-t2w"
    for i, (subject, group) in enumerate(subjects.items()):
        for scan in range(1, (repeats if subject == "S05" else 1) + 1):
            image, mask = _volume(10 * i + scan, small=group == "CKD")
            _save(raw / "images" / f"{subject}_{scan}.nii.gz", image)
            _save(raw / "masks" / f"{subject}_{scan}.nii.gz", mask)
    with open(raw / "subjects.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["subject_id", "group", "age"])
        writer.writerows([s, g, 50] for s, g in subjects.items())
    return raw


def _layout(root: Path, source: str = "kidney-nifti", **dataset) -> Layout:
    raw = tiny_dict("glomeruli" if source == "glomeruli-png" else "kidney-t2w")
    raw["dataset"].update({"source": source, "raw": str(root / "data" / "raw" / raw["dataset"]["name"]),
                           "kidney_free_fraction": 0.0, **dataset})
    return Layout(root, params_from_dict(raw))


# --------------------------------------------------------------------------- kidney-nifti
def test_nifti_scans_become_group_coloured_slices_split_by_subject(tmp_path):
    make_raw(tmp_path)
    layout = _layout(tmp_path)
    manifest = prepare(layout)
    scans = manifest["scans"]
    assert len(scans) == 10 and {s["subject_id"] for s in scans} == set(SUBJECTS)
    assert [s["scan"] for s in scans if s["subject_id"] == "S05"] == [1, 2, 3]
    assert len({s["split"] for s in scans if s["subject_id"] == "S05"}) == 1   # repeats stay together
    assert {s["split"] for s in scans} == {"train", "valid", "test"}
    first = scans[0]
    assert first["spacing_mm"] == list(SPACING) and first["slice_thickness_mm"] == 5.0
    # coronal slice 30 (z) x 24 (x) padded to 30 x 30 at 1.5 mm, resized to 32: 1.40625 mm pixels
    assert first["voxel_ml"] == pytest.approx((1.5 * 30 / 32) ** 2 * 5.0 / 1000)
    for scan in scans:
        ids = [read_mask(layout.data_dir / scan["split"] / "masks" / f"{stem}.png", layout.params.mask)
               for stem in scan["stems"]]
        expected = 1 if SUBJECTS[scan["subject_id"]] == "CKD" else 2
        assert {int(v) for m in ids for v in np.unique(m)} == {0, expected}
        assert len(scan["stems"]) == 6   # every coronal slice holds kidney here (kidney_free_fraction 0)
        model_ml = sum(int((m > 0).sum()) for m in ids) * scan["voxel_ml"]
        assert model_ml == pytest.approx(scan["true_tkv_ml_native"], rel=0.12)   # resampling, not units
    image = np.asarray(Image.open(layout.data_dir / first["split"] / "images" / f"{first['stems'][0]}.png"))
    assert image.shape == (32, 32, 3) and image.min() == 0 and image.max() > 200   # percentile-normalised


def test_kidney_free_slices_are_kept_by_fraction(tmp_path):
    raw = make_raw(tmp_path)
    for path in (raw / "masks").glob("*.nii.gz"):   # kidneys only in 2 of the 6 coronal slices
        img = nib.load(str(path))
        data = np.asarray(img.dataobj).copy()
        data[:, [0, 1, 4, 5], :] = 0
        nib.save(nib.Nifti1Image(data, img.affine), str(path))
    none = prepare(_layout(tmp_path / "a", raw=str(raw), kidney_free_fraction=0.0))
    every = prepare(_layout(tmp_path / "b", raw=str(raw), kidney_free_fraction=1.0))
    assert sum(len(s["stems"]) for s in none["scans"]) == 2 * 10
    assert sum(len(s["stems"]) for s in every["scans"]) == 6 * 10
    for scan in none["scans"]:   # test scans keep their dropped slices for TKV, outside the test split
        assert len(scan["tkv_extra_stems"]) == (4 if scan["split"] == "test" else 0)
        for stem in scan["tkv_extra_stems"]:
            assert (tmp_path / "a" / "data" / "kidney-t2w" / "tkv_extra" / "images" / f"{stem}.png").is_file()
    half = prepare(_layout(tmp_path / "c", raw=str(raw), kidney_free_fraction=0.5))
    kept = {(s["subject_id"], s["scan"]): s["stems"] for s in half["scans"]}
    assert 2 * 10 < sum(map(len, kept.values())) < 6 * 10
    # one more subject changes no other scan's slices (each scan draws from its own generator)
    image, mask = _volume(99, small=True)
    _save(raw / "images" / "S09_1.nii.gz", image)
    _save(raw / "masks" / "S09_1.nii.gz", mask * (np.arange(6)[None, :, None] % 5 == 2))
    with open(raw / "subjects.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["S09", "CKD", 60])
    again = prepare(_layout(tmp_path / "d", raw=str(raw), kidney_free_fraction=0.5))
    for s in again["scans"]:
        if s["subject_id"] != "S09":
            assert s["stems"] == kept[(s["subject_id"], s["scan"])]


def test_orientation_is_respected(tmp_path):
    """The same anatomy stored flipped (LPS affine, data reversed along x and y) gives the
    same slices: volumes are reoriented to RAS before slicing."""
    make_raw(tmp_path / "ras")
    flipped = make_raw(tmp_path / "lps")
    lps = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    lps[:3, 3] = [23 * SPACING[0], 5 * SPACING[1], 0]   # same world position of the first voxel
    for kind in ("images", "masks"):
        for path in (flipped / kind).glob("*.nii.gz"):
            data = np.asarray(nib.load(str(path)).dataobj)
            nib.save(nib.Nifti1Image(data[::-1, ::-1, :].copy(), lps), str(path))
    a, b = _layout(tmp_path / "ras"), _layout(tmp_path / "lps")
    prepare(a)
    prepare(b)
    for split in ("train", "valid", "test"):
        for kind in ("images", "masks"):
            names = sorted(p.name for p in (a.data_dir / split / kind).iterdir())
            assert names == sorted(p.name for p in (b.data_dir / split / kind).iterdir())
            for name in names:
                assert np.array_equal(np.asarray(Image.open(a.data_dir / split / kind / name)),
                                      np.asarray(Image.open(b.data_dir / split / kind / name))), name


def _break(raw: Path, how: str) -> str:
    """Damage the raw folder one way; return a fragment the error must contain."""
    image, mask = raw / "images" / "S02_1.nii.gz", raw / "masks" / "S02_1.nii.gz"
    data = np.asarray(nib.load(str(mask)).dataobj)
    if how == "shape":
        _save(mask, data[:, :, :-2])
        return "S02_1.nii.gz: mask shape"
    if how == "affine":
        _save(mask, data, np.diag([1.0, 5.0, 1.5, 1.0]))
        return "mask affine differs"
    if how == "labels":
        data = data.copy()
        data[0, 0, 0] = 5
        _save(mask, data)
        return "label(s) outside dataset.nifti.mask_labels [0, 1, 2]: 5 x 1 voxels"
    if how == "nan":
        values = np.asarray(nib.load(str(image)).dataobj).copy()
        values[1, 1, 1] = np.nan
        _save(image, values)
        return "1 voxels are NaN"
    if how == "constant":
        _save(image, np.full((24, 6, 30), 7.0, np.float32))
        return "the volume is constant"
    if how == "missing-subject":
        rows = [r for r in csv.reader(open(raw / "subjects.csv")) if r[0] != "S02"]
        csv.writer(open(raw / "subjects.csv", "w", newline="")).writerows(rows)
        return "subject 'S02' is not in"
    if how == "unknown-group":
        text = (raw / "subjects.csv").read_text().replace("S02,CKD", "S02,Diabetic")
        (raw / "subjects.csv").write_text(text)
        return "line 3: subject 'S02' has unknown group 'Diabetic'"
    if how == "duplicate":
        nib.save(nib.load(str(image)), str(raw / "images" / "S02_1.nii"))
        return "duplicate stem 'S02_1'"
    if how == "mask-missing":
        mask.unlink()
        return "S02_1.nii.gz: mask missing"
    if how == "unreadable":
        image.write_bytes(b"not a nifti file")
        return "not a readable NIfTI volume"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["shape", "affine", "labels", "nan", "constant", "missing-subject",
                                 "unknown-group", "duplicate", "mask-missing", "unreadable"])
def test_bad_nifti_input_is_one_clear_error(tmp_path, how):
    raw = make_raw(tmp_path)
    fragment = _break(raw, how)
    layout = _layout(tmp_path)
    with pytest.raises(DataError) as err:
        prepare(layout)
    assert fragment in str(err.value)
    assert "S02" in str(err.value) or "subjects.csv" in str(err.value)
    assert not layout.data_dir.exists()   # nothing half-written


def test_empty_or_missing_raw_folder(tmp_path):
    (tmp_path / "data" / "raw" / "kidney-t2w").mkdir(parents=True)
    with pytest.raises(DataError, match="raw data folder missing or empty.*dvc add"):
        prepare(_layout(tmp_path))
    (tmp_path / "data" / "raw" / "kidney-t2w" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no .nii/.nii.gz image volumes"):
        prepare(_layout(tmp_path))


# --------------------------------------------------------------------------- glomeruli-png
def _glomeruli_raw(root: Path, sizes: list[tuple[int, int]]) -> Path:
    raw = root / "data" / "raw" / "glomeruli"
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        (raw / "images").mkdir(parents=True, exist_ok=True)
        (raw / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(raw / "images" / f"g{i}.png")
        mask = np.zeros((h, w, 3), np.uint8)
        mask[h // 3: h // 2, w // 3: w // 2] = (255, 0, 0)
        Image.fromarray(mask).save(raw / "masks" / f"g{i}.png")
    return raw


def test_glomeruli_png_tiles_cover_whole_images_and_keep_test_images_whole(tmp_path):
    _glomeruli_raw(tmp_path, [(64, 64)] * 5 + [(80, 64)])
    layout = _layout(tmp_path, "glomeruli-png")
    manifest = prepare(layout)
    records = {r["id"]: r for r in manifest["images"]}
    assert records["g5"]["multiple_of_tile"] is False and records["g0"]["multiple_of_tile"] is True
    split = records["g5"]["split"]
    tiles = sorted(p.stem for p in (layout.data_dir / split / "images").glob("g5_*.png"))
    # 80 px wide, 32 px tiles: 3 columns spread evenly (x = 0, 24, 48), 2 rows
    assert tiles == [f"g5_y{y}_x{x}" for y in (0, 32) for x in (0, 24, 48)]
    for name in tiles:
        assert Image.open(layout.data_dir / split / "images" / f"{name}.png").size == (32, 32)
    test_ids = [r for r, v in records.items() if v["split"] == "test"]
    whole = sorted(p.stem for p in (layout.data_dir / "mini_test" / "images").iterdir())
    assert whole == sorted(test_ids)[: len(whole)] and whole
    assert Image.open(layout.data_dir / "mini_test" / "images" / f"{whole[0]}.png").size == \
        tuple(records[whole[0]]["size"])


def test_glomeruli_image_smaller_than_a_tile_is_an_error(tmp_path):
    _glomeruli_raw(tmp_path, [(64, 64)] * 4 + [(40, 20)])
    with pytest.raises(DataError, match=r"g4.png: 40x20 is smaller than one 32 px tile"):
        prepare(_layout(tmp_path, "glomeruli-png"))


# --------------------------------------------------------------------------- imagemask
def _seed_layout(root: Path, size: int = 48) -> Path:
    raw = root / "data" / "raw" / "kidney-t2w"
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("valid", 2), ("test", 2), ("mini_test", 1)):
        for i in range(n):
            side = 96 if split == "mini_test" else size
            for kind in ("images", "masks"):
                (raw / split / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(raw / split / "images" / f"{split}{i}.png")
            mask = np.zeros((side, side, 3), np.uint8)
            mask[: side // 2, : side // 2] = (0, 255, 0)
            Image.fromarray(mask).save(raw / split / "masks" / f"{split}{i}.png")
    return raw


def test_imagemask_is_validated_and_imported_at_the_model_size(tmp_path):
    _seed_layout(tmp_path)
    layout = _layout(tmp_path, "imagemask")
    manifest = prepare(layout)
    assert manifest["counts"] == {"train": 4, "valid": 2, "test": 2, "mini_test": 1}
    image = np.asarray(Image.open(layout.data_dir / "train" / "images" / "train0.png"))
    assert image.shape == (32, 32, 3)   # greyscale -> RGB, resized to the model size
    ids = read_mask(layout.data_dir / "train" / "masks" / "train0.png", layout.params.mask)
    assert (ids[:16, :16] == 2).all() and (ids[16:, 16:] == 0).all()
    assert Image.open(layout.data_dir / "mini_test" / "images" / "mini_test0.png").size == (96, 96)


def test_imagemask_bad_colour_and_missing_split_are_named(tmp_path):
    raw = _seed_layout(tmp_path)
    bad = np.zeros((48, 48, 3), np.uint8)
    bad[0, :3] = (255, 255, 0)
    Image.fromarray(bad).save(raw / "valid" / "masks" / "valid1.png")
    with pytest.raises(DataError, match=r"valid1.png: colour\(s\) not in mask.rgb_map: \(255, 255, 0\) x 3 px"):
        prepare(_layout(tmp_path, "imagemask"))
    for path in (raw / "valid").rglob("*.png"):
        path.unlink()
    for folder in ("images", "masks"):
        (raw / "valid" / folder).rmdir()
    (raw / "valid").rmdir()
    with pytest.raises(DataError, match=r"split folder\(s\) \['valid'\] missing"):
        prepare(_layout(tmp_path, "imagemask"))


def test_synthetic_manifest_lists_scans_for_tkv(tmp_path):
    layout = Layout(tmp_path, params_from_dict(tiny_dict()))
    manifest = json.loads(json.dumps(prepare(layout)))
    scans = manifest["scans"]
    repeated = [s for s in manifest["subjects"] if s["n_scans"] > 1]
    assert len(scans) == sum(s["n_scans"] for s in manifest["subjects"])
    for scan in scans:
        assert scan["voxel_ml"] > 0
        for stem in scan["stems"]:
            assert (layout.data_dir / scan["split"] / "images" / f"{stem}.png").is_file()
    assert all(len([s for s in scans if s["subject_id"] == r["subject_id"]]) == r["n_scans"] for r in repeated)


@pytest.mark.parametrize("dataset, message", [
    ({"source": "kidney-nifti", "name": "glomeruli"}, "makes the 'kidney-t2w' dataset"),
    ({"nifti": {"scan_pattern": "^(?P<id>.+)$"}}, "needs a named group 'subject'"),
    ({"nifti": {"scan_pattern": "^(unclosed"}}, "is not a regular expression"),
    ({"nifti": {"intensity_percentiles": [99, 1]}}, "0 <= low < high <= 100"),
    ({"nifti": {"mask_labels": [1, 2]}}, "must include 0"),
    ({"source": "dicom"}, "dataset.source"),
])
def test_bad_raw_data_params_are_named(dataset, message):
    raw = tiny_dict()
    raw["dataset"].update(dataset)
    if raw["dataset"]["name"] == "glomeruli":
        raw = {**tiny_dict("glomeruli"), "dataset": {**tiny_dict("glomeruli")["dataset"], **dataset}}
    with pytest.raises(ParamsError, match=re.escape(message)) as err:
        params_from_dict(raw, source="params.yaml")
    assert message in str(err.value) and "params.yaml" in str(err.value)


def test_duplicate_stems_in_an_image_folder_are_an_error(tmp_path):
    raw = _glomeruli_raw(tmp_path, [(64, 64)] * 5)
    Image.open(raw / "images" / "g1.png").convert("RGB").save(raw / "images" / "g1.jpg")
    with pytest.raises(DataError, match=r"g1\.(png|jpg): duplicate stem 'g1'"):
        prepare(_layout(tmp_path, "glomeruli-png"))


def test_nifti_data_trains_and_evaluates_with_tkv(tmp_path, caplog):
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.train import train

    make_raw(tmp_path)
    raw = tiny_dict()
    raw["dataset"].update(source="kidney-nifti", raw=str(tmp_path / "data" / "raw" / "kidney-t2w"))
    raw["train"].update(epochs=1, epoch_change_infer=False)
    raw["mlflow"]["log_model"] = False
    raw["evaluate"].update(min_dice=0.999, min_real_dice=0.999)   # a 1-epoch model is under any sensible floor
    layout = Layout(tmp_path, params_from_dict(raw))
    manifest = prepare(layout)
    train(layout)
    evaluate(layout)
    report = json.loads((layout.eval_metrics_file).read_text())
    real = json.loads((layout.real_sample_file).read_text())["real_kidney_dice"]
    assert report["below_min_dice"] and report["min_dice"] == 0.999
    assert report["below_min_real_dice"] and report["min_real_dice"] == 0.999
    assert report["warnings"] == [f"test mean foreground Dice {report['mean_foreground_dice']:.4f} is below "
                                  "evaluate.min_dice 0.999 (the real sample, not this floor, decides the champion)",
                                  f"real-sample kidney Dice {real:.4f} is below evaluate.min_real_dice 0.999"]
    assert any("below evaluate.min_dice" in r.message and r.levelname == "WARNING" for r in caplog.records)
    # Kidney slices: stray components (evaluate.object_metrics components) and the uncertainty AUROC.
    assert report["object_metrics"] == "components"
    assert report["stray_components"] >= report["slices_with_stray_components"] >= 0
    assert report["stray_pixels"] >= report["stray_components"] and report["stray_components_per_slice"] >= 0
    assert "object_f1" not in report
    assert report["uncertainty_wrong_pixels"] > 0 and 0 <= report["uncertainty_auroc"] <= 1
    assert 0 <= report["uncertainty_mean_right"] <= 1 and 0 <= report["uncertainty_mean_wrong"] <= 1
    tkv = json.loads((layout.metrics / "tkv.json").read_text())
    test_scans = [s for s in manifest["scans"] if s["split"] == "test"]
    assert tkv["available"] and tkv["scans"] == len(test_scans)
    truth = {(s["subject_id"], s["scan"]): s for s in test_scans}
    for row in tkv["per_scan"]:   # true TKV from the evaluated masks equals the manifest's slices
        scan = truth[(row["subject_id"], row["scan"])]
        pixels = sum(int((read_mask(layout.data_dir / "test" / "masks" / f"{stem}.png", layout.params.mask) > 0).sum())
                     for stem in scan["stems"])
        assert row["true_ml"] == pytest.approx(pixels * scan["voxel_ml"], abs=1e-3)
    assert (layout.plots / "bland_altman.png").stat().st_size > 5000


def test_slices_are_displayed_superior_up_patient_right_on_the_left(tmp_path):
    """A kidney voxel at the superior-right corner of coronal slice 3 lands top-left (the
    radiological view), also when the volume is stored with its axes in another order."""
    raw = make_raw(tmp_path / "a", subjects={f"S0{i}": g for i, g in enumerate(["CKD"] * 3 + ["Healthy"] * 3)})
    for path in (raw / "masks").glob("*.nii.gz"):
        data = np.asarray(nib.load(str(path)).dataobj).copy()
        data[22, 3, 28] = 1   # x high = patient's right (RAS), z high = superior
        _save(path, data)
    moved = make_raw(tmp_path / "b", subjects={f"S0{i}": g for i, g in enumerate(["CKD"] * 3 + ["Healthy"] * 3)})
    for kind in ("images", "masks"):   # stored as (X, Z, Y): same world, other axis order
        for src in (raw / kind).glob("*.nii.gz"):
            data = np.asarray(nib.load(str(src)).dataobj)
            affine = np.diag([*SPACING, 1.0])[:, [0, 2, 1, 3]]
            _save(moved / kind / src.name, np.ascontiguousarray(data.transpose(0, 2, 1)), affine)
    a, b = _layout(tmp_path / "a"), _layout(tmp_path / "b")
    ma, mb = prepare(a), prepare(b)
    assert [s["spacing_mm"] for s in ma["scans"]] == [s["spacing_mm"] for s in mb["scans"]]
    assert mb["scans"][0]["slice_thickness_mm"] == 5.0 and mb["scans"][0]["voxel_ml"] == ma["scans"][0]["voxel_ml"]
    for scan in ma["scans"]:
        stem = f"{scan['subject_id']}_scan1_cor003"
        ids = read_mask(a.data_dir / scan["split"] / "masks" / f"{stem}.png", a.params.mask)
        assert ids[:3, 2:7].any(), "corner voxel not at the top left"
        assert not ids[:3, -7:].any() and not ids[-3:, :].any()
        other = read_mask(b.data_dir / scan["split"] / "masks" / f"{stem}.png", b.params.mask)
        assert np.array_equal(ids, other)


def test_more_bad_kidney_input(tmp_path):
    raw = make_raw(tmp_path)
    mask = raw / "masks" / "S03_1.nii.gz"
    _save(mask, np.zeros((24, 6, 30), np.uint8))
    with pytest.raises(DataError, match=r"S03_1.nii.gz: no kidney voxels"):
        prepare(_layout(tmp_path))
    make_raw(tmp_path)
    (raw / "subjects.csv").write_text((raw / "subjects.csv").read_text().replace("S03,CKD", "S03,background"))
    with pytest.raises(DataError, match=r"subject 'S03' has unknown group 'background'"):
        prepare(_layout(tmp_path, nifti={"groups": {"background": "background", "ckd": "CKD",
                                                     "healthy control": "healthy"}}))


def test_imagemask_image_in_two_splits_is_an_error(tmp_path):
    raw = _seed_layout(tmp_path)
    for kind in ("images", "masks"):
        (raw / "test" / kind / "test0.png").rename(raw / "test" / kind / "train1.png")
    with pytest.raises(DataError, match=r"train1.png: duplicate stem 'train1'.*one split only"):
        prepare(_layout(tmp_path, "imagemask"))


# --------------------------------------------------------------------------- imagemask: the seed's own exports
def _imagemask(root: Path, mask: dict | None = None, model: dict | None = None) -> Layout:
    raw = tiny_dict()
    raw["dataset"].update(source="imagemask", raw=str(root / "data" / "raw" / "kidney-t2w"))
    raw["mask"].update(mask or {})
    raw["model"].update(model or {})
    return Layout(root, params_from_dict(raw))


def _resized_seed_layout(root: Path) -> Path:
    """The seed's data as its generator wrote it: grayscale slices and masks drawn in the map
    colours at 24 px, then resized to 64 px with bilinear filtering (Pillow), so every
    kidney edge is a blend; CKD (red) and healthy (green) kidneys touch in the odd slices.
    No mini_test."""
    raw = root / "data" / "raw" / "kidney-t2w"
    rng = np.random.default_rng(3)
    for split, n in (("train", 4), ("valid", 2), ("test", 3)):
        for kind in ("images", "masks"):
            (raw / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            ids = np.zeros((24, 24), np.uint8)
            ids[6:18, 4:11], ids[6:18, 13:20] = 1 + i % 2, 2
            if i % 2:
                ids[10:14, 11:13] = 1
            palette = Image.fromarray(ids, mode="P")
            palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
            palette.convert("RGB").resize((64, 64), Image.BILINEAR).save(raw / split / "masks" / f"{split}{i}.png")
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), mode="L").save(
                raw / split / "images" / f"{split}{i}.png")
    return raw


def test_imagemask_resized_masks_are_named_as_blends_then_snapped_and_reported(tmp_path):
    raw = _resized_seed_layout(tmp_path)
    with pytest.raises(DataError) as err:
        prepare(_imagemask(tmp_path))
    msg = str(err.value)
    assert msg.startswith(f"{raw / 'train' / 'masks' / 'train0.png'} (and 8 more masks): colour(s) not in mask.rgb_map")
    assert "all are blends of two or three map colours" in msg and "\n" not in msg
    assert "mask.color_mode: tolerance with color_tolerance: 1 maps every pixel" in msg

    layout = _imagemask(tmp_path, {"color_mode": "tolerance", "color_tolerance": 1})
    manifest = prepare(layout)
    report = manifest["mask_colours"]
    assert report["color_mode"] == "tolerance" and report["mask_pixels"] == 9 * 64 * 64
    assert {s: v["pixels"] for s, v in report["splits"].items()} == {"train": 4 * 4096, "valid": 2 * 4096,
                                                                     "test": 3 * 4096}
    assert 0 < report["snapped_pixels"] == sum(v["snapped"] for v in report["splits"].values())
    assert report["snapped_fraction"] == pytest.approx(report["snapped_pixels"] / report["mask_pixels"], abs=1e-6)
    assert json.loads((layout.metrics / "dataset.json").read_text())["mask_colours"] == report
    exact = _imagemask(tmp_path / "exact").params.mask   # the imported masks hold map colours only
    ids = read_mask(layout.data_dir / "train" / "masks" / "train1.png", exact)
    assert set(np.unique(ids).tolist()) == {0, 1, 2}
    _resized_seed_layout(tmp_path / "n")   # every unknown colour is a blend: nearest maps them alike
    assert prepare(_imagemask(tmp_path / "n", {"color_mode": "nearest"}))["fingerprint"] == manifest["fingerprint"]

    mask = np.asarray(Image.open(raw / "valid" / "masks" / "valid1.png")).copy()
    mask[0, 0] = (0, 0, 255)   # a foreign colour stays an error in tolerance mode
    Image.fromarray(mask).save(raw / "valid" / "masks" / "valid1.png")
    with pytest.raises(DataError, match=r"valid1.png: colour\(s\) not in mask.rgb_map: \(0, 0, 255\) x 1 px; "
                                        r"none is a blend of map colours"):
        prepare(layout)


def test_imagemask_without_mini_test_panels_use_the_first_test_images(tmp_path, caplog):
    from pipeline.data.samples import load_large_samples
    from pipeline.model.flexunet import build_flexunet
    from pipeline.stages.evaluate import save_mini_test

    _resized_seed_layout(tmp_path)
    layout = _imagemask(tmp_path, {"color_mode": "nearest"})
    assert prepare(layout)["counts"]["mini_test"] == 0
    with caplog.at_level("INFO", logger="pipeline.data.pairs"):
        panel = save_mini_test(build_flexunet(layout.params.model), layout)   # untrained: only the plumbing
    assert "has no mini_test images: using the first 2 test images instead" in caplog.text
    assert sorted(p.name for p in layout.predictions.iterdir()) == ["test0.png", "test1.png"]
    assert (layout.plots / "mini_test_panel.png").is_file() and panel.ndim == 3
    images, truths = load_large_samples(layout, 3)   # the tiled epoch-change inference's samples
    assert [i.shape for i in images] == [(32, 32, 3)] * 3 and len(truths) == 3


def test_imagemask_degenerate_image_is_refused_in_one_line(tmp_path):
    raw = _seed_layout(tmp_path)
    Image.fromarray(np.zeros((1, 40), np.uint8)).save(raw / "test" / "images" / "test1.png")
    Image.fromarray(np.zeros((1, 40, 3), np.uint8)).save(raw / "test" / "masks" / "test1.png")
    with pytest.raises(DataError, match=r"test/images/test1.png: 40x1 px is too small to import; every side must "
                                        r"be at least 8 px$"):
        prepare(_layout(tmp_path, "imagemask"))


def test_imagemask_into_a_one_channel_model(tmp_path):
    _seed_layout(tmp_path)
    layout = _imagemask(tmp_path, model={"image_channels": 1})
    prepare(layout)
    with Image.open(layout.data_dir / "train" / "images" / "train0.png") as img:
        assert img.size == (32, 32) and img.mode == "RGB"
