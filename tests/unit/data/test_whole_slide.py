"""The synthetic whole slide: a readable pyramid, a fixed tissue fraction, aligned truth,
determinism, bounded memory, and render_glomeruli left exactly as the dataset uses it."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from common.errors import UserError
from pipeline.cli import main
from pipeline.data.synthetic.glomeruli import render_glomeruli
from pipeline.data.synthetic.whole_slide import TISSUE_THRESHOLD, _halve, write_whole_slide
from serving.slide import open_slide
from serving.tissue import tissue_mask


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, Path, dict]:
    d = tmp_path_factory.mktemp("slide")
    summary = write_whole_slide(d / "s.ome.tif", 2048, seed=3, mask_path=d / "truth.tif", progress=False)
    return d / "s.ome.tif", d / "truth.tif", summary


def test_render_glomeruli_unchanged() -> None:
    """The whole slide draws its islands with render_glomeruli, and the dataset's
    fingerprint depends on these exact pixels: a change here is a new dataset, made on
    purpose (a new hash in this test), never as a side effect of the slide's code."""
    image, mask = render_glomeruli(256, 0, 0)
    assert hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest() == \
        "1a2a670b2721b3081ce0a0dae89f9af834ba66a70c3627a699a4aba9b62ba6af"


def test_pyramid_is_readable_with_mpp_and_box_averaged_levels(slide) -> None:
    path, _, summary = slide
    assert summary["levels"] == [[2048, 2048], [1024, 1024]] and summary["size"] == [2048, 2048]
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.ome.tif", "truth.tif"]   # no temp file left
    with open_slide(path) as s:
        assert [(lv.height, lv.width, lv.downsample) for lv in s.levels] == [(2048, 2048, 1.0), (1024, 1024, 2.0)]
        assert s.channels == 3 and s.mpp == pytest.approx(2.0)
        level0 = s.read(0)
        np.testing.assert_array_equal(s.read(1), _halve(level0))
        np.testing.assert_array_equal(s.array(0)[700:1300, 100:900], level0[700:1300, 100:900])


def test_tissue_fraction_is_the_one_asked_for(slide) -> None:
    path, _, summary = slide
    with open_slide(path) as s:
        fraction = tissue_mask(s.read(0), TISSUE_THRESHOLD).mean()
    assert fraction == pytest.approx(summary["tissue_fraction"], abs=1e-9)
    assert abs(fraction - 0.10) < 0.01


@pytest.mark.parametrize(("size", "fraction", "seed", "levels"), [((1500, 2600), 0.2, 1, 3), (2048, 0.04, 5, 2)])
def test_other_fractions_and_shapes(tmp_path: Path, size, fraction: float, seed: int, levels: int) -> None:
    summary = write_whole_slide(tmp_path / "x.ome.tif", size, seed=seed, tissue_fraction=fraction, progress=False)
    with open_slide(tmp_path / "x.ome.tif") as s:
        assert len(s.levels) == levels and max(s.levels[-1].height, s.levels[-1].width) <= 1024
        assert abs(tissue_mask(s.read(0), TISSUE_THRESHOLD).mean() - fraction) < 0.01
    assert abs(summary["tissue_fraction"] - fraction) < 0.01


def test_truth_is_aligned_with_the_tissue(slide) -> None:
    path, truth_path, summary = slide
    with open_slide(path) as s, open_slide(truth_path) as t:
        tissue = tissue_mask(s.read(0), TISSUE_THRESHOLD)
        assert t.levels[0].height == t.levels[0].width == 2048 and t.channels == 1
        truth = t.read(0)[..., 0]
    assert set(np.unique(truth)) <= {0, 1} and int(truth.sum()) == summary["glomerulus_pixels"] > 1000
    # Bowman's space is pale (glass-like by the tissue rule), so not every glomerulus pixel
    # is tissue; but every one lies in an island, and most are tissue.
    near_tissue = ndimage.binary_dilation(tissue, iterations=12)
    assert near_tissue[truth > 0].all()
    assert tissue[truth > 0].mean() > 0.6


def test_deterministic_for_size_and_seed(tmp_path: Path, slide) -> None:
    path, _, _ = slide
    write_whole_slide(tmp_path / "again.ome.tif", 2048, seed=3, progress=False)
    write_whole_slide(tmp_path / "other.ome.tif", 2048, seed=4, progress=False)
    with open_slide(path) as a, open_slide(tmp_path / "again.ome.tif") as b, \
            open_slide(tmp_path / "other.ome.tif") as c:
        level0 = a.read(0)
        assert level0.tobytes() == b.read(0).tobytes()
        assert not np.array_equal(level0, c.read(0))


def test_memory_stays_near_one_band(tmp_path: Path) -> None:
    """32768 x 1536 is 151 MB of level 0; the writer holds a few 512-row bands (2.4 MB each),
    tifffile's 8 MB encode buffer and one island's render (about 17 MB of temporaries:
    tubules drawn on a padded canvas, then warped), whatever the height."""
    shape = (32768, 1536)
    tracemalloc.start()
    try:
        write_whole_slide(tmp_path / "tall.ome.tif", shape, tissue_fraction=0.02, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < shape[0] * shape[1] * 3 / 3, f"peak {peak / 1e6:.0f} MB: the writer holds far more than a few bands"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": 100}, ">= 256 px"),
    ({"size": 2048, "tissue_fraction": 0.5}, "between 0 and 0.3"),
    ({"size": 2048, "mpp": 0.0}, "must be > 0"),
])
def test_bad_arguments_are_user_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        write_whole_slide(tmp_path / "x.ome.tif", progress=False, **kwargs)
    assert not list(tmp_path.iterdir())


def test_cli_synthesize(tmp_path: Path, capsys) -> None:
    out, truth = tmp_path / "cli.ome.tif", tmp_path / "cli_truth.tif"
    assert main(["synthesize", "--whole-slide", str(out), "--size", "600x1100", "--seed", "2",
                 "--tissue-fraction", "0.1", "--mask", str(truth)]) == 0
    assert "levels 1100x600, 550x300 (width x height)" in capsys.readouterr().out
    with open_slide(out) as s:
        assert (s.levels[0].height, s.levels[0].width) == (600, 1100)
    assert truth.is_file()
    assert main(["synthesize", "--whole-slide", str(out), "--size", "600", "--tissue-fraction", "0.9"]) == 2
    assert "between 0 and 0.3" in capsys.readouterr().err
