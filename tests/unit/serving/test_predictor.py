"""serving.predictor.TiledPredictor on tiny ONNX models (tests/onnx_models.py): parity, input
conversion, background skip, MLflow URIs and every bad-input error (one line each)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from common.errors import UserError
from serving.load import load_predictor
from serving.predictor import TiledPredictor
from serving.settings import MAX_TILE_SIZE, TilingSettings
from serving.tissue import TileCount, TissueSkip, tissue_mask
from tests.onnx_models import make_tiny_onnx, tiny_card, tiny_model_proto


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "rgb": make_tiny_onnx(d / "rgb.onnx"),
        "pixelwise": make_tiny_onnx(d / "pixelwise.onnx", kernel_size=1, tile_size=16),
        "grey": make_tiny_onnx(d / "grey.onnx", channels=1, num_classes=2, size_multiple=8),
    }


def _direct(path: Path, image: np.ndarray) -> np.ndarray:
    """One plain onnxruntime pass over the whole image: the reference."""
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"image": image[None].astype(np.float32)})[0][0]


def _image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    ramp = np.linspace(0, 255, w)[None, :, None]
    noise = np.random.default_rng(seed).normal(0, 30, (h, w, c))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def _raises(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    return message


# ---------------------------------------------------------------------- parity
def test_one_tile_image_matches_a_direct_onnxruntime_pass(models):
    predictor = TiledPredictor.from_onnx(models["rgb"])
    assert predictor.tile_size == 32 and predictor.card.num_classes == 3
    image = _image(32, 32)
    expected = _direct(models["rgb"], image)
    probs = predictor.predict_proba(image)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert np.array_equal(predictor.predict(image), expected.argmax(-1))
    np.testing.assert_allclose(predictor.predict_fn(image[None].astype(np.float32))[0], expected, atol=0)


@pytest.mark.parametrize("h,w", [(1, 1), (5, 7), (17, 31), (16, 16), (37, 101), (67, 53), (97, 16)])
def test_pixelwise_model_tiled_equals_whole_image(models, h, w):
    """A 1x1-conv model has no context: any tiling must reproduce the whole-image pass."""
    predictor = TiledPredictor.from_onnx(models["pixelwise"], overlap=0.5)
    image = _image(h, w, seed=h * w)
    np.testing.assert_allclose(predictor.predict_proba(image), _direct(models["pixelwise"], image), atol=2e-6)


@pytest.mark.parametrize("h,w", [(5, 7), (20, 31), (31, 32)])
def test_image_smaller_than_a_tile_is_reflect_padded(models, h, w):
    image = _image(h, w, seed=3)
    padded = np.pad(image, ((0, 32 - h), (0, 32 - w), (0, 0)), mode="reflect")
    expected = _direct(models["rgb"], padded)[:h, :w]
    got = TiledPredictor.from_onnx(models["rgb"]).predict_proba(image)
    assert got.shape == (h, w, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_batched_unbatched_tta_and_bands_agree(models):
    image = _image(83, 71, seed=5)   # not a multiple of the tile or of size_multiple 4
    one = TiledPredictor.from_onnx(models["rgb"], batch_size=1).predict_proba(image)
    seven = TiledPredictor.from_onnx(models["rgb"], batch_size=7).predict_proba(image)
    np.testing.assert_allclose(one, seven, atol=1e-6)
    tta = TiledPredictor.from_onnx(models["rgb"], tta=True).predict_proba(image)
    np.testing.assert_allclose(tta, one, atol=1e-5)    # the tiny model is flip-equivariant
    predictor = TiledPredictor.from_onnx(models["rgb"], overlap=0.5, blend="constant")
    labels = predictor.predict(image)
    assert labels.dtype == np.uint8 and labels.shape == (83, 71)
    assert np.array_equal(labels, predictor.predict_proba(image).argmax(-1))
    assert set(np.unique(labels)) == {0, 1, 2}
    bands = list(predictor.iter_bands(image))
    assert np.array_equal(np.concatenate([b for _, b in bands]), predictor.predict_proba(image))


def test_settings_object_and_keyword_changes_are_the_same(models):
    settings = TilingSettings(overlap=0.5, blend="constant", batch_size=3)
    a = TiledPredictor.from_onnx(models["rgb"], settings)
    b = TiledPredictor.from_onnx(models["rgb"], overlap=0.5, blend="constant", batch_size=3)
    assert a.settings == b.settings == settings.replace(tile_size=32)   # unset tile: the card's size
    image = _image(50, 70)
    assert np.array_equal(a.predict_proba(image), b.predict_proba(image))
    _raises("unknown setting.*overlapp", TiledPredictor.from_onnx, models["rgb"], overlapp=0.5)


# ---------------------------------------------------------------------- input conversion
def test_channel_conversion_rules(models):
    rgb_model = TiledPredictor.from_onnx(models["rgb"])
    grey = _image(40, 36, c=1)[..., 0]
    replicated = np.repeat(grey[..., None], 3, axis=2)
    expected = rgb_model.predict_proba(replicated)
    assert np.array_equal(rgb_model.predict_proba(grey), expected)
    assert np.array_equal(rgb_model.predict_proba(grey[..., None]), expected)
    assert np.array_equal(rgb_model.predict_proba(np.stack([grey, grey * 0 + 7], -1)), expected)  # grey+alpha
    rgb = _image(40, 36)
    rgba = np.concatenate([rgb, np.full((40, 36, 1), 9, np.uint8)], axis=2)
    assert np.array_equal(rgb_model.predict_proba(rgba), rgb_model.predict_proba(rgb))

    grey_model = TiledPredictor.from_onnx(models["grey"])
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(grey_model.predict(rgb), grey_model.predict(luma))
    wide = (grey.astype(np.uint16) * 100 + 1000)       # 16-bit grey: min-max stretched
    stretched = np.round((wide - wide.min()) * (255.0 / (wide.max() - wide.min()))).astype(np.uint8)
    assert np.array_equal(grey_model.predict(wide), grey_model.predict(stretched))


def test_unconvertible_images_are_refused(models):
    predictor = TiledPredictor.from_onnx(models["rgb"])
    _raises("5 channels.*expected 1 .grey.", predictor.predict, np.zeros((8, 8, 5), np.uint8))
    _raises("shape", predictor.predict, np.zeros((8,), np.uint8))
    _raises("0..255", predictor.predict, np.full((8, 8, 3), 300.0))
    _raises("NaN", predictor.predict, np.full((8, 8), np.nan))


# ---------------------------------------------------------------------- background skip
def test_background_skip_runs_only_tissue_tiles(models):
    white = np.full((32, 32, 3), 240, np.uint8)
    pink = white.copy()
    pink[8:24, 8:24] = (200, 120, 170)
    assert not tissue_mask(white, 220).any() and tissue_mask(pink, 220).mean() == 0.25
    assert tissue_mask(white, 241).all()                            # the threshold is the rule's parameter
    assert tissue_mask(np.full((32, 32, 3), 150, np.uint8), 220).all()   # grey tissue is not glass
    count = TileCount()
    skip = TissueSkip(220, count)
    assert skip(white) and not skip(pink) and (count.tiles, count.skipped) == (2, 1)
    assert not TissueSkip(None)(white)                              # unset: nothing is skipped

    slide = np.full((64, 128, 3), 245, np.uint8)
    slide[10:30, 70:100] = (180, 90, 160)
    predictor = TiledPredictor.from_onnx(models["rgb"], overlap=0.0, batch_size=1, tissue_threshold=220)
    seen: list[float] = []
    run = predictor.session

    class Spy:
        def __call__(self, batch):
            seen.append(float(batch.mean()))
            return run(batch)

    predictor.session = Spy()
    tiles = TileCount()
    labels = predictor.predict(slide, tiles)
    assert len(seen) == 2                                    # 8 windows, only 2 hold tissue
    assert (tiles.tiles, tiles.skipped) == (8, 6)
    assert labels[:, :64].max() == 0 and labels[32:, :].max() == 0
    plain = TiledPredictor.from_onnx(models["rgb"], overlap=0.0).predict(slide)
    assert np.array_equal(labels[:32, 64:], plain[:32, 64:])


# ---------------------------------------------------------------------- loading: paths and URIs
def test_folders_and_mlflow_run_uri(models, tmp_path, monkeypatch):
    folder = tmp_path / "download" / "model"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(models["rgb"].read_bytes())
    assert load_predictor(tmp_path / "download").card.channels == 3
    (folder / "model.int8.onnx").write_bytes(models["grey"].read_bytes())
    assert load_predictor(tmp_path / "download").card.channels == 3           # fp32 model.onnx wins
    (folder / "model.onnx").rename(folder / "other.onnx")
    _raises("exactly one .onnx.*model.int8.onnx, model/other.onnx", load_predictor, tmp_path / "download")

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)   # what a user sets; the global URI is untouched
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(models["grey"]), "onnx")
    predictor = load_predictor(f"runs:/{run.info.run_id}/onnx", tile_size=16)
    assert predictor.card.channels == 1 and predictor.tile_size == 16
    msg = _raises("models:/nope@champion: cannot download the model from MLflow", load_predictor,
                  "models:/nope@champion")
    assert uri in msg


def test_mlflow_uri_without_mlflow_names_the_extra(monkeypatch, models):
    monkeypatch.delitem(sys.modules, "serving.pyfunc", raising=False)
    monkeypatch.setitem(sys.modules, "mlflow", None)     # as if mlflow were not installed
    _raises(r"models:/m@champion: MLflow URIs need the mlflow extra: pip install 'flexunet\[mlflow\]'",
            load_predictor, "models:/m@champion")
    _raises("overlap 2", load_predictor, "models:/m@champion", overlap=2)   # settings fail first


def test_missing_and_corrupt_model_files(tmp_path):
    _raises("model not found", load_predictor, tmp_path / "nope.onnx")
    _raises("model file not found", TiledPredictor.from_onnx, tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    _raises("not a readable ONNX model.*flexunet export", load_predictor, bad)
    truncated = tmp_path / "truncated.onnx"
    make_tiny_onnx(tmp_path / "ok.onnx")
    truncated.write_bytes((tmp_path / "ok.onnx").read_bytes()[:300])
    _raises("not a readable ONNX model", load_predictor, truncated)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def test_models_breaking_the_contract(tmp_path):
    _raises("no model card.*flexunet export", load_predictor, make_tiny_onnx(tmp_path / "nocard.onnx", with_card=False))
    mismatch = tiny_model_proto(channels=3, card=tiny_card(channels=1))
    _raises(r"shape \['N', 'H', 'W', 3\].*1 channel", load_predictor, _save(mismatch, tmp_path / "ch.onnx"))
    four = tiny_model_proto(channels=4, card=tiny_card(channels=4))
    _raises("4 input channels; only 1 or 3", load_predictor, _save(four, tmp_path / "four.onnx"))
    classes = tiny_model_proto(num_classes=3, card=tiny_card(num_classes=4))
    _raises("3 classes but its card says 4", load_predictor, _save(classes, tmp_path / "k.onnx"))

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", "H", "W"])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", "H", "W", 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [3])
    graph = helper.make_graph([helper.make_node("Unsqueeze", ["image", "axes"], ["probs"])], "rank3", [x], [y],
                              initializer=[axes])
    rank3 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rank3.ir_version = 8
    helper.set_model_props(rank3, {"flexunet.card": tiny_card().to_json()})
    _raises("rank 3.*expected rank 4", load_predictor, _save(rank3, tmp_path / "rank3.onnx"))


def test_bad_settings(models):
    path = models["rgb"]
    msg = _raises(f"tile_size 8192: exceeds the cap of {MAX_TILE_SIZE}", load_predictor, path, tile_size=8192)
    assert "use e.g." in msg
    _raises("tile_size 30 is not a multiple of 4.*use 28 or 32", load_predictor, path, tile_size=30)
    _raises("tile_size 0: must be a positive integer", load_predictor, path, tile_size=0)
    for overlap in (-0.1, 1.0, 1.5, True, "0.5"):
        _raises(r"overlap .*must be in \[0, 1\)", load_predictor, path, overlap=overlap)
    _raises("blend 'linear': must be one of gaussian, constant", load_predictor, path, blend="linear")
    _raises("batch_size 0", load_predictor, path, batch_size=0)
    _raises("threads 0", load_predictor, path, threads=0)
    _raises("tta 'yes': must be true or false", load_predictor, path, tta="yes")
    _raises("tissue_threshold 256", load_predictor, path, tissue_threshold=256)
    assert TilingSettings(tissue_threshold=0).tissue_threshold is None     # 0 = off, like unset
    assert load_predictor(path, tile_size=64, threads=1).tile_size == 64
