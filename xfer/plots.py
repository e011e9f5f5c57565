"""Figures people look at (confusion matrices, per-class accuracy, t-SNE, reliability
diagrams, learning curves), and the small CSV files `dvc plots show` draws from."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from xfer.io import save_with, write_text  # noqa: E402

if TYPE_CHECKING:
    # For annotations only: head and finetune draw with this module, and must not
    # depend (in dvc.yaml) on the metrics code only evaluate runs.
    from xfer.metrics import ReliabilityBins

# File names inside plots/<stage>/, which dvc.yaml's top-level `plots:` names too.
LEARNING_CURVE_CSV = "learning_curve.csv"
LEARNING_CURVES_PNG = "learning_curves.png"


def confusion_matrix_figure(cm: np.ndarray, class_names: Sequence[str], title: str):
    """Row-normalised colours, raw counts written in the cells."""
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45 if len(class_names) > 10 else 0)
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(class_names) <= 30:
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    return fig


def save_confusion_matrix(path: Path, cm: np.ndarray, class_names: Sequence[str], title: str) -> Path:
    return save_figure(path, confusion_matrix_figure(cm, class_names, title))


def tsne_figure(panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], class_names: Sequence[str], title: str):
    """One panel per feature space: source dots, target crosses, coloured by class.

    panels: name -> (2-D coordinates, domain per row (0 source, 1 target), class label per row).
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for ax, (name, (coords, domain, labels)) in zip(axes[0], panels.items()):
        for d, marker, label in ((0, "o", "source"), (1, "x", "target")):
            rows = domain == d
            ax.scatter(
                coords[rows, 0],
                coords[rows, 1],
                c=[cmap(int(v) % cmap.N) for v in labels[rows]],
                marker=marker,
                s=10 if d == 0 else 14,
                linewidths=0.8,
                alpha=0.7,
            )
            # Colour is the class; the legend names only the marker.
            ax.scatter([], [], c="grey", marker=marker, label=label)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{title}; colour = class ({', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''})")
    fig.tight_layout()
    return fig


def per_class_accuracy_figure(accuracies: dict[str, np.ndarray], class_names: Sequence[str], title: str):
    """Grouped bars: one group per class, one bar per model."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(class_names) + 2), 3.8))
    width = 0.8 / max(len(accuracies), 1)
    x = np.arange(len(class_names))
    for i, (model, acc) in enumerate(accuracies.items()):
        ax.bar(x + (i - (len(accuracies) - 1) / 2) * width, acc, width, label=model)
    ax.set_xticks(x, class_names, rotation=45 if len(class_names) > 10 else 0)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (recall)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def roc_figure(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], aucs: dict[str, float | None], class_names: Sequence[str], title: str):
    """One panel per model: each class's ROC curve against the rest, the chance diagonal, the macro AUC on top.

    `curves[model][c]` is class c's (false positive rate, true positive rate); an empty
    curve (a class absent from the split) is left out.
    """
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves) + 0.4, 4.0), squeeze=False)
    colours = plt.get_cmap("tab20" if len(class_names) > 10 else "tab10")
    for ax, (model, by_class) in zip(axes[0], curves.items()):
        for c, (fpr, tpr) in enumerate(by_class):
            if fpr.size:
                ax.plot(fpr, tpr, lw=1, color=colours(c % colours.N), label=class_names[c])
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        auc = aucs.get(model)
        ax.set_title(f"{model}\nmacro AUC {'n/a' if auc is None else f'{auc:.3f}'}", fontsize=10)
        ax.set_xlabel("false positive rate")
    axes[0][0].set_ylabel("true positive rate")
    if len(class_names) <= 20:
        axes[0][-1].legend(fontsize=7, loc="lower right", ncol=2 if len(class_names) > 10 else 1)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def importance_weights_figure(weights: np.ndarray, labels: np.ndarray, class_names: Sequence[str], summary: dict):
    """How the source rows' importance weights spread (log scale), and each class's share of the weight."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    positive = np.maximum(weights, 1e-6)
    left.hist(positive, bins=np.logspace(np.log10(positive.min()), np.log10(max(positive.max(), positive.min() * 10)), 40), color="tab:blue")
    left.set_xscale("log")
    left.axvline(1.0, color="k", lw=0.8, ls="--")
    left.set_xlabel("importance weight (mean 1)")
    left.set_ylabel("source train rows")
    left.set_title(f"effective sample size {summary['effective_sample_size']:g} of {summary['rows']}; {summary['clipped']} clipped", fontsize=9)
    x = np.arange(len(class_names))
    rows = np.bincount(labels, minlength=len(class_names)) / len(labels)
    weighted = np.bincount(labels, weights=weights, minlength=len(class_names)) / weights.sum()
    right.bar(x - 0.2, rows, 0.4, label="rows")
    right.bar(x + 0.2, weighted, 0.4, label="weight")
    right.set_xticks(x, class_names, rotation=45 if len(class_names) > 10 else 0)
    right.set_ylabel("share of the source")
    right.set_title(f"domain classifier AUC {summary['domain_auc']:.3f} (1/2: domains alike)", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def translation_grid_figure(source: np.ndarray, translated: np.ndarray, target: np.ndarray, title: str):
    """Three rows of images (n, h, w, 3) uint8: source, its translation, random target images."""
    n = len(source)
    fig, axes = plt.subplots(3, n, figsize=(1.1 * n + 1.2, 3.8), squeeze=False)
    for row, (name, images) in enumerate((("source", source), ("translated", translated), ("target", target))):
        for col in range(n):
            ax = axes[row][col]
            ax.imshow(images[col], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(path: Path, fig) -> Path:
    """Write a figure atomically and free it."""
    try:
        save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


def reliability_figure(bins: ReliabilityBins, title: str):
    """Accuracy per confidence bin against the diagonal of perfect calibration; ECE in the title.

    Bars below the diagonal are overconfident bins. Each bar is labelled with
    its row count, since a far-off bar of three rows says little.
    """
    fig, ax = plt.subplots(figsize=(5, 5))
    width = np.diff(bins.edges)
    filled = bins.count > 0
    ax.bar(bins.edges[:-1][filled], bins.accuracy[filled], width[filled], align="edge", color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")
    # The gap to each bin's mean confidence, what the ECE adds up.
    ax.bar(
        bins.edges[:-1][filled],
        bins.confidence[filled] - bins.accuracy[filled],
        width[filled],
        bottom=bins.accuracy[filled],
        align="edge",
        fill=False,
        hatch="///",
        edgecolor="tab:red",
        linewidth=0.5,
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for left, w, acc, n in zip(bins.edges[:-1][filled], width[filled], bins.accuracy[filled], bins.count[filled]):
        ax.text(left + w / 2, min(acc, 0.97) + 0.01, str(int(n)), ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (top class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {bins.ece:.3f} ({len(bins.count)} bins, {int(bins.count.sum())} rows)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def learning_curve_rows(history: Sequence[dict[str, float]], first_epoch: int) -> list[dict[str, float]]:
    """One row per epoch record, numbered from `first_epoch`: the head's epochs count from 1,
    fine-tuning's from 0 (the model before its first step)."""
    return [{"epoch": first_epoch + i, **record} for i, record in enumerate(history)]


def write_rows_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Rows as CSV, columns in order of first appearance; a value a row lacks is left blank
    (fine-tuning's epoch 0 has no train loss)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


VALIDATOR_COLUMN = "validator_"


def learning_curves_figure(rows: Sequence[dict[str, float]], title: str):
    """Losses (left), accuracies (middle) and the label-free validators (right) per epoch, from learning_curve_rows.

    Validators live on different scales (entropies, accuracies, nuclear norms), so
    each is drawn rescaled to [0, 1] over the epochs: what matters is where it peaks.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "epoch"))
    validators = [c for c in columns if c.startswith(VALIDATOR_COLUMN)]
    fig, axes = plt.subplots(1, 3 if validators else 2, figsize=(15 if validators else 10, 3.8), sharex=True)
    loss_ax, acc_ax = axes[:2]
    for ax, suffix in ((loss_ax, "_loss"), (acc_ax, "_accuracy")):
        for column in (c for c in columns if c.endswith(suffix)):
            points = [(row["epoch"], row[column]) for row in rows if column in row]
            ax.plot(*zip(*points), marker="o", markersize=3, label=column)
    if validators:
        for column in validators:
            epochs, values = zip(*[(row["epoch"], row[column]) for row in rows if column in row])
            values = np.asarray(values, dtype=float)
            span = values.max() - values.min()
            axes[2].plot(epochs, (values - values.min()) / span if span > 0 else np.zeros_like(values), label=column[len(VALIDATOR_COLUMN) :])
        axes[2].set_ylabel("validator, rescaled to [0, 1]")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
    loss_ax.set_ylabel("loss")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0, 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_learning_curves(plot_dir: Path, history: Sequence[dict[str, float]], first_epoch: int, title: str) -> tuple[Path, Path]:
    """plots/<stage>/learning_curve.csv (for `dvc plots show`) and learning_curves.png (for MLflow): (csv, png)."""
    rows = learning_curve_rows(history, first_epoch)
    table = write_rows_csv(plot_dir / LEARNING_CURVE_CSV, rows)
    figure = save_figure(plot_dir / LEARNING_CURVES_PNG, learning_curves_figure(rows, title))
    return table, figure


def prediction_rows(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Per test row: true and predicted class names and the confidence (top probability).

    DVC's confusion template counts (actual, predicted) pairs; the confidence is
    what the reliability diagram and the ECE are computed from.
    """
    predicted = probabilities.argmax(1)
    confidence = probabilities.max(1)
    return [{"actual": class_names[int(t)], "predicted": class_names[int(p)], "confidence": float(c)} for t, p, c in zip(labels, predicted, confidence)]


def rank_figure(rows: list[dict], scores: Sequence[str], recommended: str):
    """One panel per transferability score, a bar per candidate backbone; the recommended one darker."""
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 0.5 * len(rows) + 1.8), sharey=True, squeeze=False)
    names = [row["candidate"] for row in rows]
    colours = ["#1f4e79" if n == recommended else "#9dc3e6" for n in names]
    for ax, score in zip(axes[0], scores):
        ax.barh(range(len(rows)), [row[score] for row in rows], color=colours)
        ax.set_title(score)
        ax.invert_yaxis()
    axes[0][0].set_yticks(range(len(rows)), names)
    fig.suptitle(f"transferability before training (higher is better); recommended: {recommended}")
    fig.tight_layout()
    return fig


def drift_projection_figure(reference: np.ndarray, new: np.ndarray, title: str):
    """Reference and new features on the reference window's first two principal components."""
    center = reference.mean(0)
    # The reference's own axes: a shift shows as new points leaving its cloud.
    _, _, vt = np.linalg.svd(reference - center, full_matrices=False)
    axes2 = vt[:2].T
    ref2, new2 = (reference - center) @ axes2, (new - center) @ axes2
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(ref2[:, 0], ref2[:, 1], s=8, alpha=0.4, label=f"reference ({len(reference)})")
    ax.scatter(new2[:, 0], new2[:, 1], s=10, alpha=0.7, marker="x", label=f"new ({len(new)})")
    ax.set_xlabel("reference PC 1")
    ax.set_ylabel("reference PC 2")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def drift_history_figure(rows: Sequence[dict], tests: Sequence[str], alpha_per_test: float):
    """Each drift test's p-value (log scale, with its level) and the estimated accuracy, run after run."""
    runs = np.arange(1, len(rows) + 1)
    fig, (p_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for test in tests:
        p_ax.plot(runs, [max(float(row[f"{test}_p_value"]), 1e-6) for row in rows], marker="o", markersize=3, label=test)
    p_ax.axhline(alpha_per_test, color="grey", linestyle="--", linewidth=1, label=f"level {alpha_per_test:.3g}")
    p_ax.set_yscale("log")
    p_ax.set_ylabel("p-value")
    acc_ax.plot(runs, [float(row["accuracy_estimate"]) for row in rows], marker="o", markersize=3, label="estimated (ATC)")
    acc_ax.plot(runs, [float(row["accuracy_target_val"]) for row in rows], linestyle="--", label="target val")
    # Runs before the per-image flag existed have no share: a gap in the line.
    acc_ax.plot(runs, [float(row.get("ood_share") or "nan") for row in rows], marker="s", markersize=3, label="share flagged OOD")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_ylabel("accuracy / share")
    for ax in (p_ax, acc_ax):
        ax.set_xlabel("monitor run")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
