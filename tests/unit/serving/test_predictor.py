"""serving.predictor.TiledPredictor on tiny ONNX models (tests/onnx_models.py): parity, input
conversion and bad-image errors (one line each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from serving.predictor import TiledPredictor
from tests.unit.serving.conftest import raises_one_line, ramp_image


def _direct(path: Path, image: np.ndarray) -> np.ndarray:
    """One plain onnxruntime pass over the whole image: the reference."""
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"image": image[None].astype(np.float32)})[0][0]


# ---------------------------------------------------------------------- parity
def test_one_tile_image_matches_a_direct_onnxruntime_pass(models):
    predictor = TiledPredictor.from_onnx(models["rgb"])
    assert predictor.tile_size == 32 and predictor.card.num_classes == 3
    image = ramp_image(32, 32)
    expected = _direct(models["rgb"], image)
    probs = predictor.predict_proba(image)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert np.array_equal(predictor.predict(image), expected.argmax(-1))
    np.testing.assert_allclose(predictor.predict_fn(image[None].astype(np.float32))[0], expected, atol=0)


@pytest.mark.parametrize("h,w", [(1, 1), (5, 7), (17, 31), (16, 16), (37, 101), (67, 53), (97, 16)])
def test_pixelwise_model_tiled_equals_whole_image(models, h, w):
    """A 1x1-conv model has no context: any tiling must reproduce the whole-image pass."""
    predictor = TiledPredictor.from_onnx(models["pixelwise"], overlap=0.5)
    image = ramp_image(h, w, seed=h * w)
    np.testing.assert_allclose(predictor.predict_proba(image), _direct(models["pixelwise"], image), atol=2e-6)


@pytest.mark.parametrize("h,w", [(5, 7), (20, 31), (31, 32)])
def test_image_smaller_than_a_tile_is_reflect_padded(models, h, w):
    image = ramp_image(h, w, seed=3)
    padded = np.pad(image, ((0, 32 - h), (0, 32 - w), (0, 0)), mode="reflect")
    expected = _direct(models["rgb"], padded)[:h, :w]
    got = TiledPredictor.from_onnx(models["rgb"]).predict_proba(image)
    assert got.shape == (h, w, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_batched_unbatched_tta_and_bands_agree(models):
    image = ramp_image(83, 71, seed=5)   # not a multiple of the tile or of size_multiple 4
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


# ---------------------------------------------------------------------- input conversion
def test_channel_conversion_rules(models):
    rgb_model = TiledPredictor.from_onnx(models["rgb"])
    grey = ramp_image(40, 36, c=1)[..., 0]
    replicated = np.repeat(grey[..., None], 3, axis=2)
    expected = rgb_model.predict_proba(replicated)
    assert np.array_equal(rgb_model.predict_proba(grey), expected)
    assert np.array_equal(rgb_model.predict_proba(grey[..., None]), expected)
    assert np.array_equal(rgb_model.predict_proba(np.stack([grey, grey * 0 + 7], -1)), expected)  # grey+alpha
    rgb = ramp_image(40, 36)
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
    raises_one_line("5 channels.*expected 1 .grey.", predictor.predict, np.zeros((8, 8, 5), np.uint8))
    raises_one_line("shape", predictor.predict, np.zeros((8,), np.uint8))
    raises_one_line("0..255", predictor.predict, np.full((8, 8, 3), 300.0))
    raises_one_line("NaN", predictor.predict, np.full((8, 8), np.nan))


# ---------------------------------------------------------------------- scale
class _Spy:
    """An onnxruntime session that records the shape of every batch it is given."""

    def __init__(self, session):
        self.session, self.calls = session, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.shape)
        return self.session(batch)

    def __getattr__(self, name: str):
        return getattr(self.session, name)

def test_a_whole_slice_model_predicts_an_image_whole_at_its_size(tmp_path, caplog):
    """Scale 'whole' (the kidney models): padded to a square, one pass at the model size,
    probabilities restored onto the image: exactly serving.preparation.whole_slice_probs."""
    from serving.preparation import whole_slice_probs
    from tests.onnx_models import make_tiny_onnx

    path = make_tiny_onnx(tmp_path / "whole.onnx", kernel_size=1, tile_size=16, scale="whole",
                          spacing_range=(2.5, 3.5), spacing_unit="mm")
    predictor = TiledPredictor.from_onnx(path)
    session = predictor.session
    predictor.session = spy = _Spy(session)
    image = ramp_image(40, 24)
    probs = predictor.predict_proba(image)
    assert spy.calls == [(1, 16, 16, 3)] and probs.shape == (40, 24, 3)
    np.testing.assert_allclose(probs, whole_slice_probs(session, image, 16), atol=0)
    assert np.array_equal(predictor.predict(image), probs.argmax(-1))
    # --spacing: 40 px of 1 mm padded to 40 px -> 2.5 mm per model pixel, inside the range; 0.5 mm is not
    for spacing, warned in ((1.0, False), (0.5, True)):
        caplog.clear()
        TiledPredictor.from_onnx(path, spacing=spacing).predict(image)
        assert ("outside the 2.5-3.5 mm/px" in caplog.text) is warned


def test_spacing_tiles_a_histology_image_at_the_training_resolution(models, tmp_path):
    """A tiled model trained at 2 um/px given a 1 um/px image: windows on the image shrunk
    2x, probabilities restored onto the full image."""
    from tests.onnx_models import make_tiny_onnx

    path = make_tiny_onnx(tmp_path / "at2um.onnx", kernel_size=1, tile_size=16, spacing=2.0)
    image = ramp_image(64, 48)
    plain = TiledPredictor.from_onnx(path)
    at_1um = TiledPredictor.from_onnx(path, spacing=1.0)
    at_1um.session = spy = _Spy(at_1um.session)
    probs = at_1um.predict_proba(image)
    assert probs.shape == (64, 48, 3) and max(s[1] for s in spy.calls) == 16
    half = np.asarray(Image.fromarray(image).resize((24, 32), Image.BILINEAR))
    expected = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c), mode="F").resize((48, 64), Image.BILINEAR))
                         for c in np.moveaxis(plain.predict_proba(half), -1, 0)], axis=-1)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    same = TiledPredictor.from_onnx(path, spacing=2.04)        # within 5 %: tiled as it is
    np.testing.assert_allclose(same.predict_proba(image), plain.predict_proba(image), atol=0)


def test_min_object_px_is_counted_at_the_training_resolution(tmp_path):
    """The card's speck size is pixels at the training resolution: on a 0.5 um/px image for
    a 2 um/px model, a training pixel covers 16 image pixels; a user's value is taken as given."""
    from tests.onnx_models import make_tiny_onnx

    tiled = make_tiny_onnx(tmp_path / "tiled.onnx", kernel_size=1, tile_size=16, spacing=2.0, min_object_px=50)
    assert TiledPredictor.from_onnx(tiled).min_object_px == 50
    assert TiledPredictor.from_onnx(tiled, spacing=0.5).min_object_px == 800
    assert TiledPredictor.from_onnx(tiled, spacing=4.0).min_object_px == 12   # a coarser image: fewer pixels
    assert TiledPredictor.from_onnx(tiled, spacing=0.5, min_object_px=30).min_object_px == 30
    whole = make_tiny_onnx(tmp_path / "whole.onnx", kernel_size=1, tile_size=16, spacing=2.0, min_object_px=50,
                           scale="whole")
    assert TiledPredictor.from_onnx(whole, spacing=0.5).min_object_px == 50   # resampled whole, back at its own grid


def test_whole_slices_keep_the_flip_variance_and_a_fixed_batch_size(tmp_path):
    from tests.onnx_models import make_tiny_onnx

    path = make_tiny_onnx(tmp_path / "whole.onnx", kernel_size=3, tile_size=16, scale="whole")
    image = ramp_image(40, 24)
    band = next(TiledPredictor.from_onnx(path, tta=True).stream(image))
    assert band.tta_variance is not None and band.tta_variance.shape == (40, 24)
    assert band.probs.shape == (40, 24, 3) and band.tta_variance.max() > 0
    # a model exported with a fixed batch of 4 gets batches of 4, the last zero-padded
    fixed = TiledPredictor.from_onnx(path)
    spy = _Spy(fixed.session)
    spy.fixed_dim = lambda axis: 4 if axis == 0 else None
    fixed.session = spy
    batch = np.stack([ramp_image(16, 16, seed=s) for s in range(6)]).astype(np.float32)
    out = fixed.forward(batch)
    assert spy.calls == [(4, 16, 16, 3), (4, 16, 16, 3)] and out.shape == (6, 16, 16, 3)
    np.testing.assert_allclose(out, TiledPredictor.from_onnx(path).forward(batch), atol=1e-6)
