"""Charts people would rather look at than read: curves, confusion matrix, dataset stats."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.atomic import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def training_curves(history: dict[str, list[float]], path: Path) -> None:
    """Loss, seed Dice and per-class Dice per epoch, train vs validation."""
    groups = [("loss", "loss"), ("dice_coef_multiclass", "Dice (all classes, seed metric)")]
    groups += [(k, k) for k in history if k.startswith("dice_") and not k.startswith("dice_coef")]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4))
    for ax, (key, title) in zip(np.atleast_1d(axes), groups):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + key)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=(prefix or "train_").rstrip("_"))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    """Row-normalised confusion matrix with pixel counts, truth on rows."""
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(class_names), 1.2 + 1.0 * len(class_names)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            colour = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, f"{norm[i, j]:.3f}\n{int(matrix[i, j]):,}", ha="center", va="center",
                    fontsize=7, color=colour)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title("test pixels (row-normalised)", fontsize=9)
    _save(fig, path)


def dataset_statistics(stats: dict, path: Path) -> None:
    """Images per split (bars) and class pixel fractions per split (stacked bars)."""
    splits = [s for s in ("train", "valid", "test", "mini_test") if s in stats["images"]]
    names = stats["class_names"]
    colours = [np.array(c) / 255.0 for c in stats["class_colours"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    counts = [stats["images"][s] for s in splits]
    bars = ax1.bar(splits, counts, color="#4c72b0")
    ax1.bar_label(bars)
    ax1.set_title(f"{stats['dataset']}: images per split", fontsize=9)
    # Background dwarfs everything else; show the foreground classes side by side.
    width = 0.8 / max(len(names) - 1, 1)
    x = np.arange(len(splits))
    for c, name in enumerate(names[1:], start=1):
        frac = [100 * stats["class_fraction"][s][c] for s in splits]
        ax2.bar(x + (c - 1) * width, frac, width, color=colours[c], edgecolor="black", label=name)
    ax2.set_xticks(x + width * (len(names) - 2) / 2, splits)
    ax2.set_ylabel("% of pixels")
    ax2.set_title("foreground class pixel fraction per split", fontsize=9)
    ax2.legend(fontsize=8)
    _save(fig, path)


def tune_plots(study, history_path: Path, importance_path: Path) -> None:
    """Optuna's own optimisation-history and parameter-importance plots (matplotlib
    backend). Importance needs two finished trials that differ; until then the figure
    says so instead of being left out (DVC expects the file)."""
    import warnings

    import optuna.visualization.matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the matplotlib backend is flagged experimental
        ax = ovm.plot_optimization_history(study)
        _save(ax.figure, history_path)
        try:
            ax = ovm.plot_param_importances(study)
            fig = ax.figure
        except (RuntimeError, ValueError, ZeroDivisionError) as exc:
            fig, ax = plt.subplots(figsize=(6, 2))
            ax.axis("off")
            ax.text(0.5, 0.5, f"parameter importance not available yet:\n{exc}", ha="center", va="center", wrap=True)
        _save(fig, importance_path)


def bland_altman(rows: list[dict], series: list[tuple[str, str, dict]], path: Path, *, reason: str | None = None,
                 title: str = "TKV agreement") -> None:
    """TKV agreement: difference (predicted - true) against the mean, one colour per series
    (key of the predicted ml, label, its agreement statistics), with each series' bias and
    95 % limits over subjects (first scans, filled); further repeat scans drawn hollow."""
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    if not rows or not series:
        ax.axis("off")
        ax.text(0.5, 0.5, "TKV not available:\n" + str(reason), ha="center", va="center")
        _save(fig, path)
        return
    first = {}
    for r in sorted(rows, key=lambda r: r["scan"]):
        first.setdefault(r["subject_id"], r)
    for (key, label, stats), colour in zip(series, ("tab:blue", "tab:orange", "tab:green")):
        for hollow in (False, True):
            pts = [r for r in rows if (first[r["subject_id"]] is r) != hollow]
            if pts:
                mean = [(r[key] + r["true_ml"]) / 2 for r in pts]
                diff = [r[key] - r["true_ml"] for r in pts]
                ax.scatter(mean, diff, s=28, facecolors="none" if hollow else colour, edgecolors=colour,
                           label=f"{label}: repeat scan (not in the limits)" if hollow else f"{label}: subject")
        for value, style, name in ((stats["bias_ml"], "-", "bias"), (stats["loa_low_ml"], "--", "-1.96 SD"),
                                   (stats["loa_high_ml"], "--", "+1.96 SD")):
            ax.axhline(value, color=colour, linestyle=style, linewidth=1)
            ax.annotate(f"{label}: {name} {value:+.1f} ml", (1.0, value), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7, color=colour)
    stats = series[0][2]
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("mean of predicted and true TKV (ml)")
    ax.set_ylabel("predicted - true TKV (ml)")
    ax.set_title(f"{title}, {stats['subjects']} subjects ({stats['scans']} scans)")
    ax.legend(loc="upper left", fontsize=7)
    _save(fig, path)
