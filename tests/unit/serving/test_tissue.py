"""serving.tissue: the glass/tissue rule, the window skip and its counts, and a TiledPredictor
that runs only the tissue windows."""

from __future__ import annotations

import numpy as np

from serving.predictor import TiledPredictor
from serving.tissue import TileCount, TissueSkip, tissue_mask


def test_background_skip_runs_only_tissue_tiles(models):
    white = np.full((32, 32, 3), 240, np.uint8)
    pink = white.copy()
    pink[8:24, 8:24] = (200, 120, 170)
    assert not tissue_mask(white, 220).any() and tissue_mask(pink, 220).mean() == 0.25
    assert tissue_mask(white, 241).all()                            # the threshold is the rule's parameter
    assert tissue_mask(np.full((32, 32, 3), 150, np.uint8), 220).all()   # grey tissue is not glass
    count = TileCount()
    both = np.concatenate([white, pink], axis=1)
    skip = TissueSkip.from_image(both, 220, count)
    assert skip(0, 0, 32, 32) and not skip(0, 32, 32, 32) and (count.tiles, count.skipped) == (2, 1)
    assert skip(0, 64, 32, 32)                                      # beyond the image (padding): no tissue
    assert not TissueSkip.from_image(both, None)(0, 0, 32, 32)       # unset: nothing is skipped
    coarse = TissueSkip(tissue_mask(both[::8, ::8], 220), 8.0)       # a low-resolution mask (pyramid level)
    assert coarse.tissue_fraction(0, 32, 32, 32) == 0.25 and coarse(0, 0, 32, 32)

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
