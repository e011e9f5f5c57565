"""Figures people look at: confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from xfer.io import save_with  # noqa: E402


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
            ax.scatter(coords[rows, 0], coords[rows, 1], c=[cmap(int(v) % cmap.N) for v in labels[rows]], marker=marker, s=10 if d == 0 else 14, linewidths=0.8, alpha=0.7)
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


def save_figure(path: Path, fig) -> Path:
    """Write a figure atomically and free it."""
    try:
        save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path
