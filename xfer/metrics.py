"""Classification metrics from labels and scores, in plain numpy."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # A class never predicted (or never present) scores 0, as scikit-learn's zero_division=0.
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over the classes present in y_true or y_pred."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(float)
    precision = _safe_div(tp, cm.sum(0).astype(float))
    recall = _safe_div(tp, cm.sum(1).astype(float))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = (cm.sum(0) + cm.sum(1)) > 0
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "n": int(cm.sum()),
    }


def format_results(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """eval.json as a small table: one row per (model, test split)."""
    cols = ["accuracy", "macro_precision", "macro_recall", "macro_f1"]
    lines = [f"{'model':<10}{'split':<13}" + "".join(f"{c:>17}" for c in cols)]
    for model, by_split in results.items():
        for split, m in by_split.items():
            lines.append(f"{model:<10}{split:<13}" + "".join(f"{m[c]:>17.3f}" for c in cols))
    return "\n".join(lines)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each true class (row); 0 for a class with no rows."""
    return _safe_div(np.diag(cm).astype(float), cm.sum(1).astype(float))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(1, keepdims=True)


def fuse_probabilities(probabilities: list[np.ndarray]) -> np.ndarray:
    """The ensemble of several models: the mean of their class-probability rows."""
    if not probabilities or len({p.shape for p in probabilities}) != 1:
        raise ValueError(f"fusion needs one or more probability arrays of one shape, got {[p.shape for p in probabilities]}")
    return np.mean(probabilities, axis=0)
