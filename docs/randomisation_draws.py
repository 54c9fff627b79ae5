"""Render docs/randomisation_draws.png: several domain-randomised draws of one label map.

One synthetic subject, one coronal slice: its tissue label map, the realistic
T2w-like rendering, then draws of `appearance: randomised` (dataset.randomise ranges of
params.yaml), each with its own contrast, deformation, bias field, resolution, noise and
gamma, with the kidney mask (which follows the deformation) outlined in red. Shows what
the model sees in training: only the anatomy is the same from one draw to the next.

    python docs/randomisation_draws.py [--subject 3] [--draws 10] [--size 128] [--out docs/randomisation_draws.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", type=int, default=3, help="1-based subject number")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "docs" / "randomisation_draws.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.config.load import load_params
    from pipeline.config.schema import RandomiseParams
    from pipeline.data.synthetic.kidney_t2w import Tissue, make_subjects, render_scan

    cfg = load_params(REPO / "params.yaml").dataset
    subject = make_subjects(cfg.num_subjects, cfg.repeat_fraction, cfg.repeat_scans, cfg.seed)[args.subject - 1]
    n = cfg.slices_per_scan
    z = n // 2
    still = RandomiseParams(realistic_fraction=1.0, rotation_deg=0, scaling=0, shear=0, elastic_mm=0)
    base = render_scan(subject, 0, args.size, n, cfg.seed, "randomised", still)
    # Each draw is the same slice of another scan index: same anatomy, new randomisation
    # (the anatomy's rigid scanner offset changes a little too, as between real repeat scans).
    draws = [render_scan(subject, i, args.size, n, cfg.seed, "randomised", cfg.randomise) for i in range(args.draws)]

    cols = 6
    rows = -(-(args.draws + 2) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows))
    panels = [("tissue labels", base.labels[z], None), ("realistic (T2w-like)", base.image[z], base.kidney[z])]
    panels += [(f"draw {i + 1}", d.image[z], d.kidney[z]) for i, d in enumerate(draws)]
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, image, mask) in zip(axes.ravel(), panels):
        if mask is None:
            ax.imshow(image, cmap="tab20", vmin=0, vmax=len(Tissue) - 1, interpolation="nearest")
        else:
            ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.contour(mask.astype(float), levels=[0.5], colors="red", linewidths=0.7)
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{subject.subject_id} ({subject.group}), slice {z}: one label map, "
                 f"{args.draws} randomised draws of its scans (kidney mask in red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
