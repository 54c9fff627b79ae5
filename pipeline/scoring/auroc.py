"""Does the uncertainty map point at the mistakes? The AUROC of uncertainty for wrong pixels.

An uncertainty map is worth showing a reader only if its bright pixels are where the
model is wrong. Per pixel, uncertainty is serving.uncertainty.normalised_entropy (the one
rule, the same as the maps and the CSV means of `flexunet predict`) and a pixel is wrong
when the argmax of its probabilities differs from the truth: the entropy describes the
per-pixel distribution, whose decision is its argmax (the per-slice class rule of
serving.labels can flip a confident pixel's class, which no per-pixel uncertainty can
foresee). `uncertainty_auroc` is the probability that a random wrong pixel is more
uncertain than a random right one (ties count half): 0.5 is no better than chance,
1.0 every wrong pixel more uncertain than every right one, below 0.5 worse than chance.

A test split is millions of pixels, so no pixel list is kept: the uncertainty of right and
wrong pixels is counted into two histograms of BINS equal bins over [0, 1] and the AUROC
computed from them exactly at that resolution: it is the AUROC of the uncertainty rounded
down to a multiple of 1/BINS, i.e. two pixels whose uncertainty falls in the same bin
count as a tie. The means are of the unrounded values.
"""

from __future__ import annotations

import numpy as np

from serving.uncertainty import normalised_entropy

BINS = 65536   # 2^16: finer than the 8-bit stored maps (256 levels), 1 MB of counts


class UncertaintyAuroc:
    """Histograms of the uncertainty of right and wrong pixels, batch by batch."""

    def __init__(self, bins: int = BINS):
        if bins < 2:
            raise ValueError(f"an AUROC histogram needs at least 2 bins, got {bins}")
        self.bins = bins
        self.hist = np.zeros((2, bins), dtype=np.int64)   # row 0: right pixels, row 1: wrong
        self.sums = np.zeros(2, dtype=np.float64)

    def update(self, probs: np.ndarray, truth: np.ndarray) -> None:
        """probs (..., K) softmax, truth (...) class ids."""
        self.add(normalised_entropy(probs), np.asarray(probs).argmax(-1) != truth)

    def add(self, uncertainty: np.ndarray, wrong: np.ndarray) -> None:
        """Uncertainty in [0, 1] and whether each pixel is wrong, of the same shape."""
        u = np.asarray(uncertainty, dtype=np.float64).ravel()
        w = np.asarray(wrong, dtype=bool).ravel()
        # 1.0 belongs to the last bin, not to a bin of its own.
        index = np.minimum((u * self.bins).astype(np.int64), self.bins - 1)
        self.hist += np.bincount(w * self.bins + index, minlength=2 * self.bins).reshape(2, self.bins)
        self.sums += [u[~w].sum(), u[w].sum()]

    def auroc(self) -> float | None:
        """Mann-Whitney U / (wrong x right) over the binned values; None without both kinds."""
        right, wrong = self.hist.astype(np.float64)
        n_right, n_wrong = right.sum(), wrong.sum()
        if not (n_right and n_wrong):
            return None
        right_below = np.cumsum(right) - right   # right pixels in lower bins than each bin
        return float((wrong * (right_below + 0.5 * right)).sum() / (n_wrong * n_right))

    def metrics(self) -> dict[str, int | float | None]:
        n_right, n_wrong = self.hist.sum(axis=1)
        return {
            "uncertainty_auroc": self.auroc(),
            "uncertainty_mean_wrong": float(self.sums[1] / n_wrong) if n_wrong else None,
            "uncertainty_mean_right": float(self.sums[0] / n_right) if n_right else None,
            "uncertainty_wrong_pixels": int(n_wrong),
        }
