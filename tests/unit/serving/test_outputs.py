"""Streamed outputs (serving/outputs.py, serving/inputs.py): a whole-slide TIFF in, an
OME-Zarr label image, a zarr uncertainty map and the CSV row out, equal to the in-memory path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import shapely.geometry
import tifffile
import zarr
from scipy import ndimage

from serving.batch import CSV_NAME, predict_folder
from serving.load import load_predictor
from serving.outputs import ZARR_ABOVE_PIXELS, output_stem, resolve_format
from serving.uncertainty import normalised_entropy, to_uint8
from tests.onnx_models import make_tiny_onnx

COLOURS = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
NAMES = ["background", "healthy", "CKD"]


def _slide_pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Glass (bright grey) with two stained islands: a ramp of colours the tiny model splits into classes."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 243, np.uint8)
    img += rng.integers(0, 4, (h, w, 1), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for cy, cx, r in ((h * 0.3, w * 0.25, h * 0.2), (h * 0.7, w * 0.7, h * 0.22)):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        ramp = (xx * 255 // w).astype(np.uint8)
        img[inside] = np.stack([ramp, 255 - ramp, rng.integers(60, 200, (h, w), dtype=np.uint8)], -1)[inside]
    return img


def _write_slide(path: Path, level0: np.ndarray, mpp: float = 0.5, levels: int = 3) -> None:
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
        tif.write(level0, subifds=levels - 1, tile=(128, 128), photometric="rgb", compression="zlib", metadata=meta)
        for i in range(1, levels):
            tif.write(level0[:: 2**i, :: 2**i], subfiletype=1, tile=(128, 128), photometric="rgb",
                      compression="zlib")


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, np.ndarray]:
    folder = tmp_path_factory.mktemp("slides")
    level0 = _slide_pixels(1100, 1500)
    path = folder / "case.ome.tif"
    _write_slide(path, level0)
    return path, level0


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "plain": make_tiny_onnx(folder / "plain.onnx", class_names=NAMES, colours=COLOURS, tile_size=64),
        "single": make_tiny_onnx(folder / "single.onnx", class_names=NAMES, colours=COLOURS, tile_size=64,
                                 single_foreground_class=True),
        "histology": make_tiny_onnx(folder / "histo.onnx", class_names=NAMES, colours=COLOURS, tile_size=64,
                                    tissue_threshold=220, spacing=0.5),
    }


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / CSV_NAME).open(newline="") as fh:
        return {Path(r["file"]).name: r for r in csv.DictReader(fh)}


@pytest.mark.parametrize("kind", ["plain", "single"])
def test_slide_to_ome_zarr_equals_the_in_memory_prediction(tmp_path, slide, models, kind):
    path, level0 = slide
    predictor = load_predictor(models[kind], tissue_threshold=0)
    summary = predict_folder(predictor, [path], tmp_path / "out", geojson=False)
    assert summary.ok == 1
    expected = predictor.predict(level0)           # the whole image in memory, same windows
    root = zarr.open_group(str(tmp_path / "out" / "case.ome.zarr"), mode="r")
    labels = root["labels/segmentation"]
    np.testing.assert_array_equal(labels["0"][:], expected)
    # the pyramid: each level the previous one's every other pixel, down to one chunk
    assert [labels[str(i)].shape for i in range(2)] == [(1100, 1500), (550, 750)] and "2" not in labels
    np.testing.assert_array_equal(labels["1"][:], expected[::2, ::2])
    unc = zarr.open_group(str(tmp_path / "out" / "case.uncertainty.zarr"), mode="r")["uncertainty"][:]
    entropy = normalised_entropy(predictor.predict_proba(level0))
    np.testing.assert_array_equal(unc, to_uint8(entropy))
    row = _rows(tmp_path / "out")["case.ome.tif"]
    counts = [int(row[f"px_{n}"]) for n in NAMES]
    assert counts == np.bincount(expected.ravel(), minlength=3).tolist()
    assert float(row["uncertainty_mean"]) == pytest.approx(float(entropy.mean()), abs=1e-5)
    if kind == "single":
        assert np.count_nonzero(counts[1:]) == 1       # one foreground class for the whole slide


def _check_multiscale(group: zarr.Group) -> list[list[float]]:
    """What OME-Zarr 0.5 (NGFF) asks of a multiscale image group; returns the datasets' scales."""
    assert group.metadata.zarr_format == 3
    meta = group.attrs["ome"]
    assert meta["version"] == "0.5" and len(meta["multiscales"]) == 1
    ms = meta["multiscales"][0]
    axes = [a["name"] for a in ms["axes"]]
    assert axes == ["y", "x"] and all(a["type"] == "space" for a in ms["axes"])
    scales = []
    for i, d in enumerate(ms["datasets"]):
        array = group[d["path"]]
        assert d["path"] == str(i) and list(array.metadata.dimension_names) == axes
        (t,) = d["coordinateTransformations"]
        assert t["type"] == "scale" and len(t["scale"]) == len(axes)
        scales.append(t["scale"])
    assert scales == sorted(scales)                  # finest first, as the spec orders them
    return scales


def test_ome_zarr_metadata_follows_ngff_0_5(tmp_path, slide, models):
    path, _ = slide
    predict_folder(load_predictor(models["plain"], tissue_threshold=0), [path], tmp_path / "out", geojson=False)
    root = zarr.open_group(str(tmp_path / "out" / "case.ome.zarr"), mode="r")
    image_scales = _check_multiscale(root)
    assert root["labels"].attrs["ome"] == {"version": "0.5", "labels": ["segmentation"]}
    label_scales = _check_multiscale(root["labels/segmentation"])
    assert len(image_scales) == len(label_scales)    # readers pair an image's levels with its labels'
    assert all(np.issubdtype(root["labels/segmentation"][str(i)].dtype, np.integer) for i in range(len(label_scales)))
    meta = root["labels/segmentation"].attrs["ome"]
    assert meta["version"] == "0.5" and meta["image-label"]["source"] == {"image": "../../"}
    assert meta["image-label"]["colors"][1] == {"label-value": 1, "rgba": [255, 0, 0, 255]}
    assert [p["class"] for p in meta["image-label"]["properties"]] == NAMES
    scales = [d["coordinateTransformations"][0]["scale"] for d in meta["multiscales"][0]["datasets"]]
    assert scales == [[0.5, 0.5], [1.0, 1.0]]       # micrometres: the slide records 0.5 um/px
    assert meta["multiscales"][0]["axes"][0] == {"name": "y", "type": "space", "unit": "micrometer"}
    assert root["0"].shape == (1100, 1500)   # the preview: the finest level <= 4096 px
    assert root["1"].shape == (550, 750)                           # as many levels as the labels


def test_card_threshold_skips_glass_and_a_level_is_chosen(tmp_path, slide, models):
    path, level0 = slide
    predictor = load_predictor(models["histology"])
    assert predictor.tissue_threshold == 220        # the card's default: no flag needed
    out = tmp_path / "out"
    predict_folder(predictor, [path], out, geojson=False, level=1)
    row = _rows(out)["case.ome.tif"]
    assert (int(row["height"]), int(row["width"]), row["level"]) == (550, 750, "1")
    assert 0 < int(row["skipped_tiles"]) < int(row["tiles"]) and float(row["seconds_saved"]) >= 0
    labels = zarr.open_group(str(out / "case.ome.zarr"), mode="r")["labels/segmentation/0"][:]
    unskipped = load_predictor(models["histology"], tissue_threshold=0).predict(level0[::2, ::2])
    corner = (slice(0, 120), slice(620, 750))          # glass, far from both islands
    assert labels[corner].max() == 0 and unskipped[corner].max() > 0   # the tiny model calls glass a class
    centre = (slice(150, 180), slice(170, 200))         # inside the first island, windows all run
    np.testing.assert_array_equal(labels[centre], unskipped[centre])
    meta = zarr.open_group(str(out / "case.ome.zarr"), mode="r")["labels/segmentation"].attrs["ome"]
    assert meta["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0]


def test_resume_reads_the_zarr_summary_and_png_inputs_keep_pngs(tmp_path, slide, models):
    path, _ = slide
    predictor = load_predictor(models["plain"], tissue_threshold=0)
    out = tmp_path / "out"
    predict_folder(predictor, [path], out, geojson=False)
    first = _rows(out)["case.ome.tif"]
    summary = predict_folder(predictor, [path], out, geojson=False)
    again = _rows(out)["case.ome.tif"]
    assert summary.skipped == 1 and again["status"] == "skipped-existing"
    assert all(again[k] == first[k] for k in ("px_background", "px_healthy", "px_CKD", "tiles", "level"))
    assert sorted(p.name for p in out.iterdir()) == ["case.ome.zarr", "case.uncertainty.zarr", CSV_NAME]


def test_format_rules():
    assert output_stem(Path("a/slide.ome.tiff")) == "slide" and output_stem(Path("x.png")) == "x"
    assert resolve_format("auto", True, 10) == "ome-zarr"
    assert resolve_format("auto", False, ZARR_ABOVE_PIXELS) == "png"
    assert resolve_format("auto", False, ZARR_ABOVE_PIXELS + 1) == "ome-zarr"
    assert resolve_format("png", True, 10) == "png"


def _features(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    return data["features"]


@pytest.mark.parametrize("level", [0, 1])
def test_geojson_is_what_qupath_reads_and_covers_the_predicted_pixels(tmp_path, slide, models, level):
    path, _ = slide
    predictor = load_predictor(models["plain"], tissue_threshold=0, min_object_px=0)
    out = tmp_path / "out"
    predict_folder(predictor, [path], out, level=level)           # OME-Zarr outputs: GeoJSON by default
    labels = zarr.open_group(str(out / "case.ome.zarr"), mode="r")["labels/segmentation/0"][:]
    features = _features(out / "case.geojson")
    assert int(_rows(out)["case.ome.tif"]["objects"]) == len(features) > 2
    scale = 2.0 ** level                                           # coordinates are level-0 pixels
    for class_id in (1, 2):
        mine = [f for f in features if f["properties"]["classification"]["name"] == NAMES[class_id]]
        assert all(f["type"] == "Feature" and f["geometry"]["type"] in ("Polygon", "MultiPolygon") for f in mine)
        assert all(f["properties"]["classification"]["color"] == list(COLOURS[class_id]) for f in mine)
        shapes = [shapely.geometry.shape(f["geometry"]) for f in mine]
        assert all(s.is_valid for s in shapes)
        pixels = int((labels == class_id).sum())
        assert abs(sum(s.area for s in shapes) / scale**2 - pixels) <= 0.02 * pixels
        assert sum(s.area for s in shapes) == pixels * scale**2     # traced along pixel edges: exact
        structure = ndimage.generate_binary_structure(2, 2)          # objects are 8-connected
        assert len(mine) == ndimage.label(labels == class_id, structure)[1]
        xs = [x for s in shapes for x in s.bounds[::2]]
        assert max(xs) <= 1500 and max(xs) > 1500 * 0.5              # level-0 extent, whatever the level


def test_specks_under_min_object_px_are_dropped(tmp_path, slide, models):
    path, _ = slide
    out = tmp_path / "out"
    predict_folder(load_predictor(models["plain"], tissue_threshold=0, min_object_px=40), [path], out)
    labels = zarr.open_group(str(out / "case.ome.zarr"), mode="r")["labels/segmentation/0"][:]
    areas = [shapely.geometry.shape(f["geometry"]).area for f in _features(out / "case.geojson")]
    structure = ndimage.generate_binary_structure(2, 2)
    sizes = [c for k in (1, 2) for c in np.bincount(ndimage.label(labels == k, structure)[0].ravel())[1:]]
    assert min(areas) >= 40 and len(areas) == sum(1 for c in sizes if c >= 40) < len(sizes)


def test_tta_writes_the_flip_variance_beside_the_entropy(tmp_path, slide, models):
    path, level0 = slide
    out = tmp_path / "out"
    predictor = load_predictor(models["plain"], tissue_threshold=0, tta=True)
    session = predictor.session

    def skewed(batch: np.ndarray) -> np.ndarray:       # the tiny model is flip-symmetric: break that
        p = session(batch) * np.linspace(0.2, 1.0, batch.shape[2], dtype=np.float32)[None, None, :, None] ** \
            np.arange(1, 4, dtype=np.float32)
        return p / p.sum(-1, keepdims=True)

    predictor.predict_fn = skewed
    predict_folder(predictor, [path], out, geojson=False)
    unc = zarr.open_group(str(out / "case.uncertainty.zarr"), mode="r")
    assert set(unc.array_keys()) == {"uncertainty", "tta_variance"}
    assert unc["tta_variance"].shape == level0.shape[:2] and unc["tta_variance"][:].max() > 0


def test_png_inputs_write_the_uncertainty_png_and_geojson_on_request(tmp_path, models):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    image = _slide_pixels(200, 260)
    Image.fromarray(image).save(folder / "small.png")
    out = tmp_path / "out"
    predictor = load_predictor(models["plain"], tissue_threshold=0)
    predict_folder(predictor, [folder / "small.png"], out, geojson=True)
    assert (out / "small.png").is_file() and (out / "uncertainty" / "small.png").is_file()
    ids = np.asarray(Image.open(out / "small.png"))
    features = _features(out / "small.geojson")
    assert sum(shapely.geometry.shape(f["geometry"]).area for f in features) == np.count_nonzero(ids)


def test_level_choice_and_its_errors(tmp_path, slide, models, caplog):
    from common.errors import UserError
    from serving.card import ModelCard
    from serving.inputs import open_input

    path, _ = slide
    card = load_predictor(models["histology"]).card            # trained at 0.5 um/px, like level 0
    assert open_input(path, card).level == 0
    coarse = ModelCard(**{**card.__dict__, "spacing": 1.0})        # a model trained at 1 um/px: level 1
    source = open_input(path, coarse)
    assert (source.level, source.downsample, source.height) == (1, 2.0, 550)
    source.close()
    with caplog.at_level("WARNING"):
        open_input(path, card, level=2).close()                # 2 um/px for a 0.5 um/px model
    assert "level 2 is 2 um/px but the model was trained at 0.5 um/px" in caplog.text
    with pytest.raises(UserError, match="level 5"):
        open_input(path, card, level=5)
    png = tmp_path / "plain.png"
    from PIL import Image

    Image.fromarray(_slide_pixels(40, 50)).save(png)
    with pytest.raises(UserError, match="this file has one level"):
        open_input(png, card, level=1)
