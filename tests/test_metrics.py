import pytest
import numpy as np
from sklearn import metrics as skm

from xfer.metrics import classification_metrics, confusion_matrix, format_results


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 5, 300))
    pred[pred == 4] = 3  # a class never predicted: precision 0 by convention
    m = classification_metrics(y, pred, 6)  # class 5 absent from both: ignored
    assert m["n"] == 300
    assert np.isclose(m["accuracy"], skm.accuracy_score(y, pred))
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    assert np.isclose(m["macro_precision"], p) and np.isclose(m["macro_recall"], r) and np.isclose(m["macro_f1"], f)
    assert (confusion_matrix(y, pred, 6)[:5, :5] == skm.confusion_matrix(y, pred, labels=range(5))).all()


def test_perfect_and_hand_checked():
    y = np.array([0, 0, 1, 1])
    assert classification_metrics(y, y, 2)["macro_f1"] == 1.0
    m = classification_metrics(y, np.array([0, 1, 1, 1]), 2)
    # class 0: P=1, R=0.5; class 1: P=2/3, R=1
    assert np.isclose(m["macro_precision"], (1 + 2 / 3) / 2) and np.isclose(m["macro_recall"], 0.75)
    assert confusion_matrix(y, np.array([0, 1, 1, 1]), 2).tolist() == [[1, 1], [0, 2]]


def test_format_results_has_a_row_per_model_and_split():
    m = {"accuracy": 0.5, "macro_precision": 0.25, "macro_recall": 0.125, "macro_f1": 1.0, "n": 4}
    table = format_results({"head": {"source_test": m, "target_test": m}, "finetune": {"target_test": m}})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["model", "split", "accuracy"]
    assert lines[3].split() == ["finetune", "target_test", "0.500", "0.250", "0.125", "1.000"]


def test_fusion_averages_probabilities_and_can_fix_a_model():
    from xfer.metrics import fuse_probabilities, softmax

    head = np.array([[0.45, 0.55], [0.2, 0.8]])  # wrong on row 0
    finetune = np.array([[0.9, 0.1], [0.6, 0.4]])  # wrong on row 1
    fused = fuse_probabilities([head, finetune])
    np.testing.assert_allclose(fused, [[0.675, 0.325], [0.4, 0.6]])
    assert fused.argmax(1).tolist() == [0, 1]
    np.testing.assert_allclose(softmax(np.array([[0.0, np.log(3.0)]])), [[0.25, 0.75]])
    with pytest.raises(ValueError, match="one shape"):
        fuse_probabilities([head, finetune[:1]])
