"""Batch prediction (`flexunet predict`, serving/batch.py) with a real TiledPredictor on a tiny ONNX model."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.cli import main
from serving.batch import CSV_NAME, predict_folder, read_manifest, resolve_inputs
from common.errors import UserError
from serving.load import load_predictor
from serving.settings import TilingSettings
from serving.tiling import window_starts
from serving.uncertainty import normalised_entropy, to_uint8
from tests.conftest import tiny_dict
from tests.onnx_models import make_tiny_onnx

REPO = Path(__file__).resolve().parents[3]
COLOURS = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
NAMES = ["background", "healthy", "CKD"]
RGB_SIZES = {"r1": (20, 30), "r2": (64, 50), "r3": (100, 77)}


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("model") / "model.onnx", class_names=NAMES, colours=COLOURS,
                          tile_size=32, size_multiple=4)


@pytest.fixture(scope="session")
def predictor(model):
    return load_predictor(model)  # the CLI's defaults when no params.yaml: overlap 0.25, gaussian, batch 4


def _gradient(h: int, w: int, seed: int) -> np.ndarray:
    """Left-to-right ramp plus noise: the tiny model's three classes all appear."""
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    noise = np.random.default_rng(seed).normal(0, 20, (h, w, 3))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def _write_images(folder: Path) -> dict[str, np.ndarray]:
    """RGB images of varied sizes, an 8-bit grayscale and an RGBA one; returns the RGB the model sees."""
    folder.mkdir(parents=True, exist_ok=True)
    seen = {}
    for i, (name, (h, w)) in enumerate(RGB_SIZES.items()):
        seen[name] = _gradient(h, w, i)
        Image.fromarray(seen[name]).save(folder / f"{name}.png")
    grey = _gradient(37, 41, 7)[..., 0]
    Image.fromarray(grey, mode="L").save(folder / "g.png")
    seen["g"] = np.repeat(grey[..., None], 3, axis=2)
    rgb = _gradient(45, 33, 8)
    alpha = np.random.default_rng(9).integers(0, 256, (45, 33, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(folder / "a.png")
    seen["a"] = rgb
    (folder / "notes.txt").write_text("not an image; a folder input ignores it")
    return seen


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / CSV_NAME).open(newline="") as fh:
        return {Path(r["file"]).stem: r for r in csv.DictReader(fh)}


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def _predict(*args: str) -> int:
    return main(["predict", *args])


def test_masks_overlays_and_table(tmp_path, monkeypatch, model, predictor):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: plain defaults
    seen = _write_images(tmp_path / "in")
    assert _predict("--model", str(model), "--input", "in", "--output", "out", "--overlay") == 0
    out = tmp_path / "out"
    rows = _rows(out)
    assert sorted(rows) == sorted(seen) and list(rows["r1"]) == [
        "file", "height", "width", "px_background", "px_healthy", "px_CKD", "level", "objects", "uncertainty_mean",
        "tiles", "skipped_tiles", "seconds_saved", "seconds", "status"]
    for name, rgb in seen.items():
        mask = Image.open(out / f"{name}.png")
        assert mask.mode == "P" and mask.getpalette()[:9] == [v for c in COLOURS for v in c]
        ids = np.asarray(mask)
        assert ids.shape == rgb.shape[:2]
        # grey is replicated to RGB and alpha dropped before the model sees the image
        np.testing.assert_array_equal(ids, predictor.predict(rgb))
        row = rows[name]
        counts = [int(row[f"px_{n}"]) for n in NAMES]
        assert row["status"] == "ok" and (int(row["height"]), int(row["width"])) == rgb.shape[:2]
        assert counts == np.bincount(ids.ravel(), minlength=3).tolist() and sum(counts) == ids.size
        assert float(row["seconds"]) > 0 and int(row["skipped_tiles"]) == 0 and row["level"] == "0"
        assert row["objects"] == ""                                  # PNG outputs: no GeoJSON unless asked
        unc = np.asarray(Image.open(out / "uncertainty" / f"{name}.png"))
        probs = predictor.predict_proba(rgb)
        np.testing.assert_array_equal(unc, to_uint8(normalised_entropy(probs)))
        assert float(row["uncertainty_mean"]) == pytest.approx(float(normalised_entropy(probs).mean()), abs=1e-5)
        assert int(row["tiles"]) == len(window_starts(max(rgb.shape[0], 32), 32, 0.25)) * \
            len(window_starts(max(rgb.shape[1], 32), 32, 0.25))
        over = np.asarray(Image.open(out / "overlays" / f"{name}.png"))
        assert over.shape == rgb.shape
        np.testing.assert_array_equal(over[ids == 0], rgb[ids == 0])  # background left transparent
        expected = np.rint(0.6 * rgb.astype(float) + 0.4 * np.asarray(COLOURS, float)[ids])
        np.testing.assert_array_equal(over[ids > 0], expected[ids > 0])
    assert all(np.bincount(np.asarray(Image.open(out / f"{n}.png")).ravel(), minlength=3).min() > 0
               for n in ("r2", "r3"))  # the images exercise every class
    assert _leftovers(out) == []


def test_resume_skips_existing_and_overwrite_rewrites(tmp_path, model):
    _write_images(tmp_path / "in")
    out = tmp_path / "out"
    args = ["--model", str(model), "--input", str(tmp_path / "in"), "--output", str(out)]
    assert _predict(*args) == 0
    masks = sorted(out.glob("*.png"))
    first = _rows(out)
    for m in masks:
        os.utime(m, ns=(10**18, 10**18))  # an old, recognisable mtime
    (out / "r2.png").unlink()
    assert _predict(*args) == 0
    rows = _rows(out)
    assert rows["r2"]["status"] == "ok" and (out / "r2.png").exists()
    for name in ("r1", "r3", "g", "a"):
        assert (out / f"{name}.png").stat().st_mtime_ns == 10**18
        assert rows[name]["status"] == "skipped-existing"
        assert all(rows[name][k] == first[name][k] for k in ("px_CKD", "tiles", "skipped_tiles", "seconds"))
    assert _predict(*args, "--overwrite") == 0
    assert all(m.stat().st_mtime_ns != 10**18 for m in masks)
    assert {r["status"] for r in _rows(out).values()} == {"ok"}


def test_interrupted_run_keeps_a_consistent_table(tmp_path, predictor):
    _write_images(tmp_path / "in")
    inputs = resolve_inputs(str(tmp_path / "in"))
    out = tmp_path / "out"

    class Interrupted:
        card, tile_size, settings, tissue_threshold = (predictor.card, predictor.tile_size, predictor.settings,
                                                       predictor.tissue_threshold)
        calls = 0

        def stream(self, image, tiles=None, tissue=None):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return predictor.stream(image, tiles, tissue)

    with pytest.raises(KeyboardInterrupt):
        predict_folder(Interrupted(), inputs, out, csv_interval=3600)  # only the final write can save the rows
    rows = _rows(out)
    assert [r["status"] for r in rows.values()] == ["ok", "ok"]
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(rows) and _leftovers(out) == []
    summary = predict_folder(predictor, inputs, out)
    assert (summary.ok, summary.skipped, summary.failed) == (3, 2, 0)
    assert len(_rows(out)) == 5


def test_bad_files_are_reported_and_skipped(tmp_path, model, caplog):
    caplog.set_level(logging.INFO)
    seen = _write_images(tmp_path / "in")
    (tmp_path / "in" / "zero.png").write_bytes(b"")
    (tmp_path / "in" / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    out = tmp_path / "out"
    assert _predict("--model", str(model), "--input", str(tmp_path / "in"), "--output", str(out)) == 1
    rows = _rows(out)
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(seen)
    zero = tmp_path / "in" / "zero.png"
    assert rows["zero"]["status"] == f"error: {zero}: file is empty (0 bytes); re-export or remove it"
    assert rows["corrupt"]["status"].startswith(f"error: {tmp_path / 'in' / 'corrupt.jpg'}: not a readable image")
    assert rows["zero"]["px_background"] == ""
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "zero.png: file is empty" in errors[1] and "corrupt.jpg" in errors[0]
    assert "5 ok, 0 skipped (existing), 2 failed" in caplog.text


def test_usage_errors_exit_2_with_one_line(tmp_path, model, capsys):
    (tmp_path / "empty").mkdir()
    _write_images(tmp_path / "in")
    cases = [
        (["--model", str(model), "--input", str(tmp_path / "empty")],
         f"error: {tmp_path / 'empty'}: no image files (.png, .jpg, .jpeg, .tif, .tiff, .bmp), NIfTI volumes "
         f"(.nii.gz, .nii) or DICOM series folders in this folder"),
        (["--model", str(model), "--input", str(tmp_path / "in" / "*.tif")],
         f"error: {tmp_path / 'in' / '*.tif'}: the pattern matches no files"),
        (["--model", str(model), "--input", str(tmp_path / "in"), "--overlap", "1.5"],
         "error: --overlap 1.5: must be in [0, 1): the fraction of a window shared with its neighbour, e.g. 0.25"),
        (["--model", str(model), "--input", str(tmp_path / "in"), "--tissue-threshold", "300"],
         "error: --tissue-threshold 300: must be a grey level 1..255 (220 suits PAS histology), "
         "0 for no background skip, or unset for the model card's"),
        (["--model", str(model), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "in")],
         None),
        (["--model", str(tmp_path / "missing.onnx"), "--input", str(tmp_path / "in")], None),
    ]
    for args, expected in cases:
        if "--output" not in args:
            args = [*args, "--output", str(tmp_path / "out")]
        assert _predict(*args) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert expected is None or lines[0] == expected
    assert "missing.onnx" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing was written by a refused run


def test_resolve_inputs_and_plan_checks(tmp_path, predictor):
    _write_images(tmp_path / "in")
    (tmp_path / "in" / ".hidden.png").write_bytes(b"")
    assert [p.name for p in resolve_inputs(str(tmp_path / "in"))] == ["a.png", "g.png", "r1.png", "r2.png", "r3.png"]
    assert [p.name for p in resolve_inputs(str(tmp_path / "in" / "r*.png"))] == ["r1.png", "r2.png", "r3.png"]
    assert resolve_inputs(str(tmp_path / "in" / "g.png")) == [tmp_path / "in" / "g.png"]
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "in" / "a.jpg")
    with pytest.raises(UserError, match="a.jpg and .*a.png would both write .*out/a\.\*; rename one"):
        predict_folder(predictor, resolve_inputs(str(tmp_path / "in")), tmp_path / "out")
    with pytest.raises(UserError, match="is the folder of input .*; choose another --output"):
        predict_folder(predictor, [tmp_path / "in" / "g.png"], tmp_path / "in")
    assert not (tmp_path / "out").exists()


def test_large_images_refused_unless_allowed(tmp_path, model, predictor, monkeypatch, caplog):
    Image.fromarray(_gradient(60, 50, 3)).save(tmp_path / "big.png")  # 3000 pixels
    summary = predict_folder(predictor, [tmp_path / "big.png"], tmp_path / "o1", max_pixels=2999)
    assert summary.failed == 1 and "decompression bomb" in _rows(tmp_path / "o1")["big"]["status"]
    assert predict_folder(predictor, [tmp_path / "big.png"], tmp_path / "o2", max_pixels=3000).ok == 1
    # The CLI keeps Pillow's limit (2 x MAX_IMAGE_PIXELS) unless --allow-large-images.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    args = ["--model", str(model), "--input", str(tmp_path / "big.png")]
    assert _predict(*args, "--output", str(tmp_path / "o3")) == 1
    assert "refused as a possible decompression bomb" in _rows(tmp_path / "o3")["big"]["status"]
    assert _predict(*args, "--output", str(tmp_path / "o4"), "--allow-large-images") == 0
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's global is restored after the call
    monkeypatch.undo()
    assert np.asarray(Image.open(tmp_path / "o4" / "big.png")).shape == (60, 50)


def test_params_yaml_predict_section_gives_defaults(tmp_path, model, monkeypatch):
    raw = tiny_dict()
    raw["predict"].update(blend="constant", batch_size=2, overlap=0.5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    _write_images(tmp_path / "in")
    seen: list[TilingSettings] = []

    def spy(uri, settings):
        seen.append(settings)
        return load_predictor(uri, settings)

    monkeypatch.setattr("serving.load.load_predictor", spy)
    assert _predict("--model", str(model), "--input", "in", "--output", "out", "--batch-size", "3") == 0
    assert seen[0] == TilingSettings(overlap=0.5, blend="constant", batch_size=3)
    # a typo in the section names the file and the key; an explicit --params makes it an error
    raw["predict"]["overlapp"] = 0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert _predict("--model", str(model), "--input", "in", "--output", "o2", "--params", "params.yaml") == 2


def test_blank_glass_is_skipped_counted_and_background(tmp_path, model, predictor):
    """tissue_threshold: windows of bare (white) glass are not run, are counted in the CSV and are class 0."""
    slide = _gradient(64, 96, 4)
    slide[:, 64:] = 245                                 # the right third is blank glass
    Image.fromarray(slide).save(tmp_path / "slide.png")
    args = ["--model", str(model), "--input", str(tmp_path / "slide.png"), "--overlap", "0"]
    assert _predict(*args, "--output", str(tmp_path / "plain")) == 0
    assert _predict(*args, "--output", str(tmp_path / "skip"), "--tissue-threshold", "220") == 0
    plain, skip = _rows(tmp_path / "plain")["slide"], _rows(tmp_path / "skip")["slide"]
    assert (plain["tiles"], plain["skipped_tiles"]) == ("6", "0")
    assert (skip["tiles"], skip["skipped_tiles"]) == ("6", "2")   # 2 x 3 windows, the right column is glass
    ids = np.asarray(Image.open(tmp_path / "skip" / "slide.png"))
    assert ids[:, 64:].max() == 0 and int(skip["px_background"]) >= 64 * 32
    np.testing.assert_array_equal(ids[:, :64], np.asarray(Image.open(tmp_path / "plain" / "slide.png"))[:, :64])


def test_spacing_resamples_a_real_tile_to_the_models_resolution(tmp_path, monkeypatch):
    """`flexunet predict --spacing 0.5` on a real 1024 px PAS tile (data/real-sample/glomeruli-pas)
    with a model whose card says 2 um/px: the tile is shrunk 4x to 256 px, tiled, and its
    probabilities resampled back, so the mask is 1024 px and is the argmax of those."""
    from serving.predictor import TiledPredictor

    monkeypatch.chdir(tmp_path)   # no params.yaml: the plain defaults
    tile = REPO / "data" / "real-sample" / "glomeruli-pas" / "images" / "10191.png"
    model = make_tiny_onnx(tmp_path / "at2um.onnx", num_classes=2, tile_size=32, spacing=2.0)
    calls: list[tuple[int, ...]] = []
    real_call = TiledPredictor.predict_fn
    monkeypatch.setattr(TiledPredictor, "predict_fn", lambda self, batch: calls.append(batch.shape) or
                        real_call(self, batch))
    assert _predict("--model", str(model), "--input", str(tile), "--output", "out", "--spacing", "0.5") == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "10191.png"))
    assert mask.shape == (1024, 1024) and _rows(tmp_path / "out")["10191"]["tiles"] == "121"   # 11 x 11 windows
    assert {c[1:3] for c in calls} == {(32, 32)} and len(calls) == 31   # the 121 windows in batches of 4
    image = np.asarray(Image.open(tile).convert("RGB"))
    quarter = np.asarray(Image.fromarray(image).resize((256, 256), Image.BILINEAR))
    at_model = TiledPredictor.from_onnx(model).predict_proba(quarter)
    back = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c), mode="F").resize((1024, 1024), Image.BILINEAR))
                     for c in np.moveaxis(at_model, -1, 0)], axis=-1)
    margin = np.abs(back[..., 1] - back[..., 0])
    decided = margin > 1e-5                         # pixels whose argmax float rounding cannot flip
    assert decided.mean() > 0.999 and 0 < mask.mean() < 1
    np.testing.assert_array_equal(mask[decided], back.argmax(-1)[decided])
    # without --spacing the tile is tiled as it is: 43 x 43 windows, another mask
    assert _predict("--model", str(model), "--input", str(tile), "--output", "plain") == 0
    assert _rows(tmp_path / "plain")["10191"]["tiles"] == "1849"
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "plain" / "10191.png")), mask)


def test_mpp_on_a_png_says_to_give_its_pixel_size_with_spacing(tmp_path, model, caplog):
    from serving.inputs import open_input

    Image.fromarray(_gradient(20, 30, 1)).save(tmp_path / "plain.png")
    message = (f"{tmp_path / 'plain.png'}: --mpp chooses a level of a pyramidal TIFF, OME-TIFF or SVS, and this "
               "file has one; a PNG or JPEG records no resolution, so give the image's pixel size with --spacing UM "
               "instead (e.g. --spacing 0.5)")
    with pytest.raises(UserError) as info:
        open_input(tmp_path / "plain.png", load_predictor(model).card, mpp=0.5)
    assert str(info.value) == message
    assert _predict("--model", str(model), "--input", str(tmp_path / "plain.png"), "--output",
                    str(tmp_path / "out"), "--mpp", "0.5") == 1
    assert _rows(tmp_path / "out")["plain"]["status"] == f"error: {message}"
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [message]


def test_console_script_runs_without_tensorflow(tmp_path, model):
    """`flexunet predict` end to end in a fresh process where importing TensorFlow fails."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import os, sys\n"
        "class Block:  # records, then refuses, any attempt (even a guarded optional import)\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'keras', 'ray'):\n"
        "            with open(os.environ['IMPORT_LOG'], 'a') as fh:\n"
        "                fh.write(name + '\\n')\n"
        "            raise ImportError(f'{name} must not be imported by flexunet predict (local engine)')\n"
        "sys.meta_path.insert(0, Block())\n")
    _write_images(tmp_path / "in")
    (tmp_path / "in" / "zero.png").write_bytes(b"")
    exe = Path(sys.executable).with_name("flexunet")
    attempts = tmp_path / "imports.log"
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{blocker}:{REPO}", "IMPORT_LOG": str(attempts)}
    out = subprocess.run([str(exe), "predict", "--model", str(model), "--input", str(tmp_path / "in"),
                          "--output", str(tmp_path / "out"), "--overlay"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert not attempts.exists(), attempts.read_text()
    assert "Traceback" not in out.stderr
    assert f"{tmp_path / 'in' / 'zero.png'}: file is empty (0 bytes)" in out.stderr
    assert "predicted 6 images: 5 ok, 0 skipped (existing), 1 failed" in out.stderr
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 5


def test_manifest_lists_paths_uris_and_relative_paths(tmp_path):
    """A .csv or .parquet manifest: column 'path' (or the only column), in its order; file://
    URIs decoded, relative paths from the manifest's folder; listed files are not checked here
    (a missing one becomes an error row, like a glob's unreadable match)."""
    (tmp_path / "sub dir").mkdir()
    absolute = tmp_path / "sub dir" / "x.png"
    csv_file = tmp_path / "m.csv"
    csv_file.write_text(f"id,path\n1,{absolute}\n2,{absolute.with_name('y.png').as_uri()}\n3,rel/z.png\n4,\n")
    expected = [absolute, absolute.with_name("y.png"), tmp_path / "rel" / "z.png"]
    assert read_manifest(csv_file) == expected == resolve_inputs(str(csv_file))
    single = tmp_path / "single.csv"
    single.write_text("image\nrel/z.png\n")   # no 'path' column: the only column is taken
    assert read_manifest(single) == [tmp_path / "rel" / "z.png"]
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"path": [str(absolute), "rel/z.png"], "n": [1, 2]}), tmp_path / "m.parquet")
    assert resolve_inputs(str(tmp_path / "m.parquet")) == [absolute, tmp_path / "rel" / "z.png"]


def test_bad_manifests_are_one_line_errors(tmp_path):
    from tests.unit.serving.conftest import raises_one_line

    cases = {"two.csv": ("a,b\n1,2\n", "a manifest needs a column 'path' of image paths .*found a, b"),
             "empty.csv": ("path\n\n", "the manifest lists no images"),
             "nothing.csv": ("", "found no columns"),
             "bucket.csv": ("path\ns3://bucket/x.png\n", "s3://bucket/x.png: only local paths and file:// URIs")}
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        raises_one_line(match, resolve_inputs, str(tmp_path / name))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    raises_one_line("bad.parquet: cannot read the manifest", read_manifest, tmp_path / "bad.parquet")


def test_ray_engine_without_ray_names_the_extra(tmp_path, model, monkeypatch, capsys):
    """The light install has no Ray: --engine ray is one line naming the extra, exit 2; the
    Ray options without --engine ray are a usage error too."""
    _write_images(tmp_path / "in")
    monkeypatch.setitem(sys.modules, "ray", None)           # `import ray` now fails as if absent
    monkeypatch.delitem(sys.modules, "serving.ray_engine", raising=False)
    args = ["--model", str(model), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert _predict(*args, "--engine", "ray") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --engine ray needs Ray (ray is not installed): pip install 'flexunet[ray]'"]
    assert _predict(*args, "--workers", "2") == 2
    assert capsys.readouterr().err.strip() == "error: --address and --workers are options of --engine ray"
    assert not (tmp_path / "out").exists()
