"""Render docs/histology_draws.png: real PAS tiles beside synthetic ones, realistic and randomised.

Top row: the real development tiles (data/real-sample/glomeruli-pas) at the training
resolution (0.5 -> 2 um/px, as `flexunet predict --spacing 0.5` resamples them). Middle:
synthetic tiles in the realistic rendering. Bottom: `appearance: randomised` draws (the
glomeruli preset's dataset.stain ranges): a jittered scale, a deformation, and a random
stain and scanner. Glomerulus masks outlined in green.

    python docs/histology_draws.py [--tiles 4] [--out docs/histology_draws.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def outlined(image, mask):
    from scipy import ndimage

    out = image.copy()
    out[mask & ~ndimage.binary_erosion(mask, iterations=2)] = (0, 220, 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "docs" / "histology_draws.png"))
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from common.imageio import resize_image, resize_labels
    from pipeline.config.schema import StainParams
    from pipeline.data.synthetic.glomeruli import DEFAULT_MPP, render_glomeruli

    side = 256
    real = []
    for path in sorted((REPO / "data" / "real-sample" / "glomeruli-pas" / "images").glob("*.png"))[: args.tiles]:
        image = np.asarray(Image.open(path).convert("RGB"))
        mask = np.asarray(Image.open(path.parent.parent / "masks" / path.name).convert("RGB"))[..., 0] > 127
        real.append(outlined(resize_image(image, side, side), resize_labels(mask.astype(np.uint8), side, side) > 0))
    realistic = [outlined(*render_glomeruli(side, i, 137, DEFAULT_MPP)) for i in range(args.tiles)]
    drawn = [outlined(*render_glomeruli(side, i, 137, DEFAULT_MPP, "randomised", StainParams()))
             for i in range(args.tiles, 2 * args.tiles)]
    gap = np.full((side, 4, 3), 255, np.uint8)

    def row(images):
        return np.concatenate([x for image in images for x in (image, gap)][:-1], 1)

    grid = np.concatenate([row(real), np.full((4, row(real).shape[1], 3), 255, np.uint8), row(realistic),
                           np.full((4, row(real).shape[1], 3), 255, np.uint8), row(drawn)], 0)
    Image.fromarray(grid).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
