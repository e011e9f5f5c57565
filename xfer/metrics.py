"""Classification metrics from labels and scores, in plain numpy: accuracy, macro P/R/F1,
confusion matrices, ROC curves and one-vs-rest ROC AUC, and calibration (reliability
bins, expected calibration error)."""

from __future__ import annotations

from dataclasses import dataclass

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


# eval.json's keys for the cross-validations (evaluate.cv_folds; with finetune.cv, the fine-tuning
# recipe's too) and what each cross-validates: every other key is a model.
CROSS_VALIDATION = "cross_validation"
CROSS_VALIDATION_FINETUNE = "cross_validation_finetune"
CROSS_VALIDATIONS = {CROSS_VALIDATION: "the head", CROSS_VALIDATION_FINETUNE: "fine-tuning"}
TABLE_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "roc_auc")


def model_results(results: dict) -> dict[str, dict[str, dict]]:
    """eval.json's models: model -> split -> figures (without the cross-validation)."""
    return {model: by_split for model, by_split in results.items() if model not in CROSS_VALIDATIONS}


def format_results(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """eval.json as a small table: one row per (model, test split); then the cross-validation, if run."""
    cols = TABLE_METRICS
    lines = [f"{'model':<10}{'split':<13}" + "".join(f"{c:>17}" for c in cols)]
    for model, by_split in model_results(results).items():
        for split, m in by_split.items():
            lines.append(f"{model:<10}{split:<13}" + "".join(f"{figure(m.get(c)):>17}" for c in cols))
    for key, what in CROSS_VALIDATIONS.items():
        if key in results:
            lines += ["", *cross_validation_lines(results[key], what)]
    return "\n".join(lines)


def mean_std(summary: dict[str, float | None]) -> str:
    return "n/a" if summary["mean"] is None else f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def recipe_words(recipe: dict) -> str:
    """A cross-validated recipe in a few words: its strategy (fine-tuning), method and epoch rule."""
    return ", ".join([*([recipe["strategy"]] if "strategy" in recipe else []), recipe["method"], f"epoch by {recipe['selection']}"])


def cross_validation_lines(cv: dict, what: str = "the head") -> list[str]:
    """A cross-validation in plain words and a small table: mean ± std over the folds."""
    lines = [
        f"cross-validation of {what} ({recipe_words(cv['recipe'])}): {cv['folds']} stratified folds "
        f"of {cv['rows']} labelled training rows (sizes {', '.join(map(str, cv['fold_sizes']))}); mean ± std over the folds",
        f"{'rows':<23}" + "".join(f"{c:>17}" for c in TABLE_METRICS),
    ]
    for where in ("held_out", "target_test"):
        lines.append(f"{where:<23}" + "".join(f"{mean_std(cv[where][c]):>17}" for c in TABLE_METRICS))
    return lines


def figure(value: float | None) -> str:
    """A metric for a table: three decimals; `n/a` where it is not defined (an AUC with one class) or
    not in the file (an eval.json written before the metric existed)."""
    return "n/a" if value is None else f"{value:.3f}"


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


def binary_roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the rows where `positive` is true.

    The Mann-Whitney statistic: the chance that a random positive row scores above
    a random negative one, ties counting half (average ranks). NaN when the rows
    hold no positive or no negative (the area is not defined then), or a score
    that is NaN or infinite (a broken model has no area).
    """
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0 or not np.isfinite(scores).all():
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based; a tie group shares its mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct score taken as the threshold,
    from (0, 0) to (1, 1). Empty arrays where binary_roc_auc is NaN."""
    scores = np.asarray(scores, dtype=float).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0 or not np.isfinite(scores).all():
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-scores, kind="mergesort")
    ranked = scores[order]
    # The last row of each group of equal scores: a threshold lets a whole tie group through at once.
    ends = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    true_positives = np.cumsum(positive[order])[ends]
    false_positives = ends + 1 - true_positives
    return np.r_[0.0, false_positives / n_neg], np.r_[0.0, true_positives / n_pos]


def one_vs_rest_roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float | None, list[float | None]]:
    """(macro ROC AUC, each class's ROC AUC) of class-probability rows, one class against the rest.

    A class with no row in `labels` (or with every row) has no defined AUC: its entry
    is None, and the macro mean is over the classes that have one (None if none has).
    With every class present this is scikit-learn's roc_auc_score(multi_class="ovr", average="macro").
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0]:
        raise ValueError(f"probabilities must be (rows, classes) with one row per label, got {probabilities.shape} for {labels.shape[0]} labels")
    per_class = [binary_roc_auc(probabilities[:, c], labels == c) for c in range(probabilities.shape[1])]
    defined = [a for a in per_class if not np.isnan(a)]
    return (float(np.mean(defined)) if defined else None), [None if np.isnan(a) else a for a in per_class]


# Guo et al. (2017) use 15 equal-width bins; so do most calibration reports, which keeps ECEs comparable.
DEFAULT_CALIBRATION_BINS = 15


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins over [0, 1]: bin b holds confidences in (edges[b], edges[b + 1]].

    confidence and accuracy are the means over a bin's rows (NaN for an empty bin);
    count is how many rows fell in it.
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of |accuracy - confidence|, weighted by the bin's share of rows."""
        filled = self.count > 0
        if not filled.any():
            return 0.0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((gaps * self.count[filled]).sum() / self.count.sum())


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_CALIBRATION_BINS) -> ReliabilityBins:
    """Bin each prediction's confidence (its top class probability) with whether it was right."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if confidence.shape != correct.shape or confidence.ndim != 1:
        raise ValueError(f"confidence and correct must be 1-D of one length, got {confidence.shape} and {correct.shape}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins, as Guo et al.: a confidence on an edge belongs to the bin below it
    # (and 0, which no argmax can have, to the first bin).
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    return ReliabilityBins(edges, mean_confidence, accuracy, count)


def reliability_from_probabilities(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_CALIBRATION_BINS) -> ReliabilityBins:
    """Reliability bins of a classifier's class-probability rows against the true labels."""
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = probabilities.argmax(1)
    return reliability_bins(probabilities.max(1), predicted == np.asarray(labels), n_bins)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_CALIBRATION_BINS) -> float:
    """ECE of class-probability rows: 0 when each confidence level is right exactly that often."""
    return reliability_from_probabilities(probabilities, labels, n_bins).ece


def selection_lines(head: dict) -> list[str]:
    """How the head was chosen, in plain words: the rule, whether target labels were read,
    the search's verdict and its warning (metrics/head.json, or the head spec's `selection`)."""
    labels = "an oracle: it reads target val labels" if head["uses_target_labels"] else "no target labels"
    lines = [f"head: {head['method']} (head.method {head['method_requested']}), kept by {head['selection']} ({labels})"]
    search = head.get("search")
    if search:
        lines.append(f"search: {search['why']}")
        if search.get("warning"):
            lines.append(f"WARNING: {search['warning']}")
    return lines
