"""pipeline.data.samples: the images the panels and epoch-change inference show, with the
mini_test fallback to test images."""

from __future__ import annotations

from pipeline.data.samples import load_infer_samples, load_large_samples
from pipeline.layout import Layout
from tests.unit.data.conftest import write_data


def test_samples_without_mini_test_are_test_images(tmp_path, tiny_params):
    write_data(tmp_path, mini=False)
    layout = Layout(tmp_path, tiny_params)
    images, truths = load_infer_samples(layout, 2)
    assert images.shape == (2, 32, 32, 3) and len(truths) == 2 and truths[0].shape == (32, 32, 3)
    large, large_truths = load_large_samples(layout, 3)
    assert len(large) == len(large_truths) == 3
    write_data(tmp_path / "m", mini=True)
    images, _ = load_infer_samples(Layout(tmp_path / "m", tiny_params), 2)   # 48 px mini_test resized
    assert images.shape == (2, 32, 32, 3)
