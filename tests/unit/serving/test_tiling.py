"""serving.tiling without a model: window geometry, importance maps, exact stitching, streaming."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from serving.tiling import importance_map, iter_bands, sliding_window_inference, tta_flips, window_starts

SIZES = [1, 2, 3, 7, 31, 32, 33, 47, 63, 64, 65, 97, 101, 127, 128, 129, 131, 255, 256, 257, 521, 1009]


def _image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def plus_one(batch: np.ndarray) -> np.ndarray:
    return batch + 1.0


def position_model(batch: np.ndarray) -> np.ndarray:
    """A model whose output depends on the position inside the window (like a real CNN's
    border effects), so wrong blending or wrong placement shows up in the result."""
    h, w = batch.shape[1:3]
    ramp = (np.arange(h)[:, None] * 0.01 + np.arange(w)[None, :] * 0.003).astype(np.float32)
    grey = batch.mean(axis=-1, keepdims=True) / 255.0
    return np.concatenate([grey + ramp[..., None], 1.0 - grey, grey * ramp[..., None]], axis=-1)


# ---------------------------------------------------------------------- geometry
@pytest.mark.parametrize("tile", [8, 32, 128])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_window_starts_cover_exactly_and_spread_evenly(tile, overlap):
    for length in SIZES:
        starts = window_starts(length, tile, overlap)
        if length <= tile:
            assert starts == [0]
            continue
        assert starts[0] == 0 and starts[-1] == length - tile
        assert starts == sorted(set(starts))
        covered = np.zeros(length, dtype=int)
        for s in starts:
            covered[s: s + tile] += 1
        assert covered.min() >= 1, (length, tile, overlap)
        steps = np.diff(starts)
        assert steps.max() - steps.min() <= 1                      # evenly spread (rounding only)
        assert steps.max() <= math.ceil(tile * (1 - overlap))      # overlap at least as asked
        n = math.ceil((length - tile) / (tile * (1 - overlap)) - 1e-9) + 1
        assert len(starts) == min(n, length - tile + 1)                                   # nnU-Net's count: no extra window


def test_window_starts_known_values_and_no_border_hugging_window():
    assert window_starts(100, 32, 0.25) == [0, 23, 45, 68]
    assert window_starts(96, 32, 0.25) == [0, 21, 43, 64]
    assert window_starts(96, 32, 0.0) == [0, 32, 64]
    assert window_starts(97, 32, 0.0) == [0, 22, 43, 65]
    # MONAI would place windows at 0, 24, 48 and a last one at 68 (4 px after 64): here the
    # four steps are equal instead.
    assert np.diff(window_starts(100, 32, 0.25)).tolist() == [23, 22, 23]
    assert len(window_starts(2048, 128, 0.25)) == 21 and len(window_starts(2048, 128, 0.5)) == 31


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_window_starts_rejects_bad_overlap(bad):
    with pytest.raises(ValueError, match="overlap"):
        window_starts(100, 32, bad)


# ---------------------------------------------------------------------- importance map
@pytest.mark.parametrize("hw", [(128, 128), (32, 32), (33, 47), (1, 5), (2, 2), (4096, 64)])
def test_gaussian_map_is_centred_symmetric_and_never_zero(hw):
    m = importance_map(hw)
    assert m.dtype == np.float32 and m.shape == hw
    assert np.array_equal(m, m[::-1]) and np.array_equal(m, m[:, ::-1])
    assert m.max() == 1.0 and m.min() > 0
    h, w = hw
    # an independent float64 formula: sigma = side / 8, centre (side - 1) / 2
    gy, gx = (np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in hw)
    expected = np.outer(gy, gx) / (gy.max() * gx.max())
    np.testing.assert_allclose(m, np.maximum(expected, m.min()), rtol=1e-6)
    if h % 2 and w % 2:
        assert m[h // 2, w // 2] == 1.0


def test_gaussian_map_floor_prevents_underflow():
    m = importance_map((64, 64), sigma_scale=0.01)   # exp(-(32/0.64)^2/2) underflows float32
    assert m.min() > 0 and np.isfinite(1.0 / m).all()
    assert m.min() >= np.finfo(np.float32).tiny


def test_constant_map_and_bad_blend():
    assert np.array_equal(importance_map((5, 7), "constant"), np.ones((5, 7), np.float32))
    with pytest.raises(ValueError, match="blend"):
        importance_map((8, 8), "linear")


# ---------------------------------------------------------------------- stitching
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_constant_model_is_reproduced_exactly(blend):
    value = np.array([0.5, 0.25, 0.125, 0.125], dtype=np.float32)
    const = lambda x: np.broadcast_to(value, x.shape[:3] + (4,)).copy()  # noqa: E731
    for h, w in [(1, 1), (5, 200), (31, 33), (64, 64), (97, 130), (257, 61)]:
        out = sliding_window_inference(_image(h, w), const, tile_size=32, blend=blend)
        assert out.shape == (h, w, 4) and out.dtype == np.float32
        assert np.array_equal(out, np.broadcast_to(value, out.shape))


@pytest.mark.parametrize("h,w", [(1, 1), (3, 7), (31, 31), (32, 32), (33, 65), (101, 67), (131, 257)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_pixelwise_model_is_stitched_exactly(h, w, overlap):
    """lambda x: x + 1 gives image + 1 everywhere: every pixel placed right, weights sum right."""
    image = _image(h, w)
    out = sliding_window_inference(image, plus_one, tile_size=32, overlap=overlap, multiple=8)
    np.testing.assert_allclose(out, image + 1.0, rtol=1e-6, atol=0)   # float32 rounding only
    grey = image[..., :1]
    out = sliding_window_inference(grey[..., 0], plus_one, tile_size=(16, 32), overlap=overlap, batch_size=3)
    np.testing.assert_allclose(out, grey + 1.0, rtol=1e-6, atol=0)


def test_batched_and_unbatched_runs_are_identical():
    image = _image(150, 97)
    one = sliding_window_inference(image, position_model, tile_size=32, batch_size=1)
    seven = sliding_window_inference(image, position_model, tile_size=32, batch_size=7)
    assert np.array_equal(one, seven)


def test_batches_have_a_fixed_shape():
    shapes: set[tuple[int, ...]] = set()

    def spy(batch: np.ndarray) -> np.ndarray:
        shapes.add(batch.shape)
        return plus_one(batch)

    sliding_window_inference(_image(100, 70), spy, tile_size=32, batch_size=4)   # 4 x 3 windows
    assert shapes == {(4, 32, 32, 3)}
    shapes.clear()
    sliding_window_inference(_image(100, 70), spy, tile_size=32, batch_size=5, tta=True)
    assert shapes == {(20, 32, 32, 3)}
    shapes.clear()
    sliding_window_inference(_image(100, 70), spy, tile_size=32, batch_size=5, tta=("lr",))
    assert shapes == {(10, 32, 32, 3)}


def test_tta_flips_subset_undoes_only_those_flips():
    """A model that depends on the column only: averaging it with its left-right flip gives a
    left-right symmetric result; an up-down flip would leave it as it was."""
    image = _image(32, 32)

    def column_model(batch: np.ndarray) -> np.ndarray:
        cols = np.broadcast_to(np.arange(batch.shape[2], dtype=np.float32), batch.shape[:3])
        return np.stack([cols, 31 - cols], axis=-1) / 31

    lr = sliding_window_inference(image, column_model, tile_size=32, tta=("lr",))
    np.testing.assert_allclose(lr, 0.5, atol=1e-6)
    ud = sliding_window_inference(image, column_model, tile_size=32, tta=("ud",))
    np.testing.assert_allclose(ud, sliding_window_inference(image, column_model, tile_size=32), atol=1e-6)
    assert tta_flips(True) == ("lr", "ud", "lrud") and tta_flips(False) == ()
    with pytest.raises(ValueError, match="tta flips \\['diag'\\]"):
        tta_flips(("lr", "diag"))


def test_iter_bands_equals_whole_image_and_streams_rows():
    image = _image(300, 90)
    whole = sliding_window_inference(image, position_model, tile_size=32, overlap=0.5)
    bands = list(iter_bands(image, position_model, tile_size=32, overlap=0.5))
    assert len(bands) == len(window_starts(300, 32, 0.5))
    rows = [r for r, _ in bands]
    assert rows[0] == 0 and all(a < b for a, b in zip(rows, rows[1:]))
    assert all(b.shape[0] <= 32 for _, b in bands)                # a band never exceeds a tile
    assert np.array_equal(np.concatenate([b for _, b in bands]), whole)


def test_bands_are_emitted_before_the_whole_image_is_predicted():
    calls = []
    image = _image(256, 64)

    def counting(batch: np.ndarray) -> np.ndarray:
        calls.append(1)
        return plus_one(batch)

    gen = iter_bands(image, counting, tile_size=32, overlap=0.0, batch_size=2)
    row0, band = next(gen)
    assert row0 == 0 and band.shape == (32, 64, 3)
    assert len(calls) <= 2   # a window row + at most the one batch read ahead
    assert sum(1 for _ in gen) == 7


def test_gaussian_blend_weights_centres_of_windows():
    """Where two windows overlap, the Gaussian trusts the window whose centre is nearer."""
    def which_window(batch: np.ndarray) -> np.ndarray:  # encodes the window's column in its output
        return np.broadcast_to(batch[:, :1, :1, :1], batch.shape[:3] + (1,)).astype(np.float32).copy()

    image = np.broadcast_to(np.arange(48, dtype=np.float32)[None, :, None], (32, 48, 1))
    out = sliding_window_inference(image, which_window, tile_size=32, overlap=0.5)[0, :, 0]
    # windows at x=0 (value 0) and x=16 (value 16); in their overlap [16, 32) pixel 23 is
    # nearer window 0's centre (15.5) and pixel 24 nearer window 16's (31.5): mirror images.
    assert out[:16].max() == 0 and out[32:].min() == 16
    assert out[16] < out[23] < 8 < out[24] < out[31]
    assert out[23] + out[24] == pytest.approx(16.0, abs=1e-4)
    assert np.all(np.diff(out[16:32]) > 0)


def test_flip_tta_of_a_flip_equivariant_model_equals_no_tta():
    image = _image(70, 90)
    plain = sliding_window_inference(image, plus_one, tile_size=32)
    tta = sliding_window_inference(image, plus_one, tile_size=32, tta=True)
    np.testing.assert_allclose(tta, plain, rtol=1e-6)

    def left_biased(batch: np.ndarray) -> np.ndarray:  # not flip-equivariant: TTA must change it
        return position_model(batch)

    a = sliding_window_inference(image, left_biased, tile_size=32)
    b = sliding_window_inference(image, left_biased, tile_size=32, tta=True)
    assert not np.allclose(a, b)


def test_skip_fn_skipped_windows_count_as_class_zero():
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, :32] = 255       # the left window is "background"
    calls = []

    def model(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        return np.broadcast_to(np.array([0.0, 1.0], np.float32), batch.shape[:3] + (2,)).copy()

    out = sliding_window_inference(image, model, tile_size=32, overlap=0.0, batch_size=1,
                                   skip_fn=lambda y, x, h, w: bool(image[y:y + h, x:x + w].min() == 255))
    assert len(calls) == 4                     # 6 windows, 2 skipped
    assert np.array_equal(out[:, :32].argmax(-1), np.zeros((64, 32)))
    assert np.array_equal(out[:, :32, 0], np.ones((64, 32), np.float32))
    assert np.array_equal(out[:, 32:, 1], np.ones((64, 64), np.float32))
    everything = sliding_window_inference(image, model, tile_size=32, skip_fn=lambda *window: True)
    assert np.array_equal(everything[..., 0], np.ones((64, 96), np.float32))


def test_non_finite_output_names_the_window():
    def nan_at_second(batch: np.ndarray) -> np.ndarray:
        out = plus_one(batch)
        if batch[1].mean() > 0:
            out[1, 3, 3, 0] = np.nan
        return out

    image = np.ones((32, 64, 1), np.uint8)
    with pytest.raises(ValueError, match="non-finite.*row 0, column 32"):
        sliding_window_inference(image, nan_at_second, tile_size=32, overlap=0.0, batch_size=2)


def test_bad_arguments_raise_clear_errors():
    image = _image(40, 40)
    with pytest.raises(ValueError, match="multiples of 16"):
        sliding_window_inference(image, plus_one, tile_size=40, multiple=16)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(image, plus_one, tile_size=32, overlap=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        sliding_window_inference(image, plus_one, tile_size=32, batch_size=0)
    with pytest.raises(ValueError, match="shape"):
        sliding_window_inference(image, lambda x: x[:, :8], tile_size=32)
    with pytest.raises(ValueError, match="image must be"):
        sliding_window_inference(np.zeros((0, 5, 3)), plus_one, tile_size=32)


def test_tiles_are_read_while_the_model_runs():
    """The next batch is cut out in a worker thread, not the thread that runs predict_fn."""
    threads: set[str] = set()

    def skip(y: int, x: int, h: int, w: int) -> bool:
        threads.add(threading.current_thread().name)
        return False

    sliding_window_inference(_image(100, 100), plus_one, tile_size=32, skip_fn=skip)
    assert threads and all(name.startswith("tile-reader") for name in threads)


class LazyArray:
    """A (H, W, C) array that counts its reads and only supports 2-D slicing, like a slide level."""

    def __init__(self, data: np.ndarray, chunks: tuple[int, int]):
        self.data, self.chunks, self.shape, self.reads = data, chunks, data.shape, []

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        self.reads.append(key)
        return self.data[key].copy()


def test_lazy_image_gives_the_same_bands_and_reads_each_chunk_once():
    image = _image(200, 300)
    lazy = LazyArray(image, (64, 64))
    expected = sliding_window_inference(image, plus_one, tile_size=32, overlap=0.5)
    got = sliding_window_inference(lazy, plus_one, tile_size=32, overlap=0.5)
    assert np.array_equal(got, expected)
    keys = [(k[0].start, k[1].start) for k in lazy.reads]
    assert len(keys) == len(set(keys)) == 4 * 5            # 200/64 -> 4 chunk rows, 300/64 -> 5 columns


def test_skipped_windows_of_a_lazy_image_are_never_read():
    image = _image(128, 256)
    lazy = LazyArray(image, (64, 64))
    sliding_window_inference(lazy, plus_one, tile_size=64, overlap=0.0,
                             skip_fn=lambda y, x, h, w: x >= 128)   # the right half is "glass"
    assert {k[1].start for k in lazy.reads} == {0, 64}


def test_tta_variance_is_an_extra_channel_and_zero_for_a_flip_invariant_model():
    image = _image(64, 64)
    bands = list(iter_bands(image, lambda b: np.full(b.shape[:3] + (2,), 0.5, np.float32), tile_size=32,
                            tta=True, tta_variance=True))
    assert all(band.shape[-1] == 3 and np.array_equal(band[..., 2], np.zeros(band.shape[:2])) for _, band in bands)

    def left_biased(batch: np.ndarray) -> np.ndarray:
        out = np.zeros(batch.shape[:3] + (2,), np.float32)
        out[:, :, :16, 0] = 1.0
        out[:, :, 16:, 1] = 1.0
        return out

    (_, band), = iter_bands(np.zeros((32, 32, 1), np.uint8), left_biased, tile_size=32, tta=("lr",), tta_variance=True)
    # identity says class 0 on the left, the flipped pass class 1: each prob is 0.5 +- 0.5
    assert np.allclose(band[..., :2], 0.5) and np.allclose(band[..., 2], 0.25)
    (_, plain), = iter_bands(np.zeros((32, 32, 1), np.uint8), left_biased, tile_size=32, tta=False, tta_variance=True)
    assert plain.shape[-1] == 2                              # no flips: no variance channel
