import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from xfer.metrics import binary_roc_auc, classification_metrics, confusion_matrix, format_results, one_vs_rest_roc_auc, roc_curve


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
    # An eval.json written before ROC AUC existed has no roc_auc: shown as n/a, no crash.
    assert lines[3].split() == ["finetune", "target_test", "0.500", "0.250", "0.125", "1.000", "n/a"]
    assert format_results({"head": {"target_test": {**m, "roc_auc": 0.875}}}).splitlines()[1].split()[-1] == "0.875"


# ---- ROC AUC, one class against the rest ----


def generated_predictions(rows: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and class-probability rows that lean towards the right class, rounded so that scores tie."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    logits = rng.normal(size=(rows, classes)) + 1.5 * np.eye(classes)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, np.round(p, 2)


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_one_vs_rest_roc_auc_matches_scikit_learn(classes):
    y, p = generated_predictions(400, classes, seed=classes)
    assert len(np.unique(p[:, 0])) < len(p)  # ties, which count half
    macro, per_class = one_vs_rest_roc_auc(y, p)
    for c in range(classes):
        assert per_class[c] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]), abs=1e-12)
    # scikit-learn's own multi-class macro (it renormalises rows that do not sum to 1: these are rounded).
    expected = skm.roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr", average="macro") if classes > 2 else np.mean(per_class)
    assert macro == pytest.approx(np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in range(classes)]), abs=1e-12)
    if classes > 2:
        renormalised, _ = one_vs_rest_roc_auc(y, p / p.sum(1, keepdims=True))
        assert renormalised == pytest.approx(expected, abs=1e-12)
    assert 0.5 < macro < 1


def test_a_class_absent_from_the_split_has_no_auc_and_the_macro_skips_it():
    y, p = generated_predictions(300, 4, seed=7)
    y[y == 2] = 1  # class 2 never occurs: scikit-learn's macro is NaN then, with a warning
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(skm.roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr", labels=[0, 1, 2, 3]))
    macro, per_class = one_vs_rest_roc_auc(y, p)
    assert per_class[2] is None
    present = [skm.roc_auc_score(y == c, p[:, c]) for c in (0, 1, 3)]
    assert [per_class[c] for c in (0, 1, 3)] == pytest.approx(present, abs=1e-12)
    assert macro == pytest.approx(np.mean(present), abs=1e-12)
    # A split of one class has no AUC at all.
    assert one_vs_rest_roc_auc(np.zeros(5, int), p[:5]) == (None, [None] * 4)


def test_roc_auc_by_hand():
    assert binary_roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert binary_roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert binary_roc_auc(np.full(4, 0.5), np.array([0, 1, 0, 1])) == 0.5  # all tied: half
    # Positives 0.4 and 0.8 against negatives 0.4 and 0.1: pairs won 1 + 1 + 0.5 (tie) + 1 of 4.
    assert binary_roc_auc(np.array([0.4, 0.8, 0.4, 0.1]), np.array([1, 1, 0, 0])) == 0.875
    # A broken model (a NaN probability) has no AUC.
    assert np.isnan(binary_roc_auc(np.array([0.1, np.nan, 0.8]), np.array([0, 0, 1])))
    assert one_vs_rest_roc_auc(np.array([0, 1]), np.array([[np.nan, 0.5], [0.5, 0.5]]))[1][0] is None


def test_roc_curve_is_scikit_learns_at_every_threshold():
    y, p = generated_predictions(200, 3, seed=1)
    fpr, tpr = roc_curve(p[:, 1], y == 1)
    expected_fpr, expected_tpr, _ = skm.roc_curve(y == 1, p[:, 1], drop_intermediate=False)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(binary_roc_auc(p[:, 1], y == 1))
    assert [a.size for a in roc_curve(p[:, 1], np.zeros(len(y), bool))] == [0, 0]


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


def test_reliability_bins_and_ece_by_hand():
    from xfer.metrics import reliability_bins

    # 5 bins: (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1].
    confidence = np.array([0.25, 0.35, 0.65, 0.75, 0.95, 0.85])
    correct = np.array([0, 1, 1, 1, 1, 0])
    bins = reliability_bins(confidence, correct, n_bins=5)
    assert bins.count.tolist() == [0, 2, 0, 2, 2]
    np.testing.assert_allclose(bins.confidence[[1, 3, 4]], [0.3, 0.7, 0.9])
    np.testing.assert_allclose(bins.accuracy[[1, 3, 4]], [0.5, 1.0, 0.5])
    assert np.isnan(bins.accuracy[[0, 2]]).all()  # empty bins have no mean
    # |0.5 - 0.3|, |1.0 - 0.7|, |0.5 - 0.9|, each bin a third of the rows.
    assert bins.ece == pytest.approx((0.2 + 0.3 + 0.4) / 3)


def test_reliability_bins_are_right_closed():
    from xfer.metrics import reliability_bins

    # 4 bins: a confidence on an edge belongs to the bin it closes.
    bins = reliability_bins(np.array([0.5, 0.75, 1.0, 0.2501]), np.ones(4), n_bins=4)
    assert bins.count.tolist() == [0, 2, 1, 1]


def test_ece_from_probability_rows_by_hand():
    from xfer.metrics import expected_calibration_error

    probabilities = np.array(
        [
            [0.70, 0.20, 0.10],  # predicts 0, right; confidence .70
            [0.15, 0.62, 0.23],  # predicts 1, wrong; .62
            [0.20, 0.18, 0.62],  # predicts 2, right; .62
            [0.44, 0.56, 0.00],  # predicts 1, wrong; .56
        ]
    )
    labels = np.array([0, 2, 2, 0])
    # 10 bins: (.6, .7] holds .70, .62, .62 (mean .6467, accuracy 2/3); (.5, .6] holds .56 (accuracy 0).
    expected = (3 * abs(2 / 3 - (0.70 + 0.62 + 0.62) / 3) + 1 * 0.56) / 4
    assert expected_calibration_error(probabilities, labels, n_bins=10) == pytest.approx(expected)
    assert expected == pytest.approx(0.155)


def test_calibrated_set_scores_zero_and_overconfident_set_its_gap():
    from xfer.metrics import DEFAULT_CALIBRATION_BINS, reliability_bins

    # 100 rows at each confidence level, exactly that fraction of them right.
    levels = [0.55, 0.65, 0.75, 0.85, 0.95]
    confidence = np.repeat(levels, 100)
    calibrated = np.concatenate([np.arange(100) < round(100 * c) for c in levels])
    overconfident = np.concatenate([np.arange(100) < round(100 * (c - 0.25)) for c in levels])
    assert DEFAULT_CALIBRATION_BINS == 15
    assert reliability_bins(confidence, calibrated).ece == pytest.approx(0.0, abs=1e-12)
    # Every level is right 25 points less often than it claims.
    assert reliability_bins(confidence, overconfident).ece == pytest.approx(0.25)
    # A random sample drawn calibrated lands near 0; drawn at confidence**2, near E[c - c**2].
    rng = np.random.default_rng(0)
    c = rng.uniform(0.4, 1.0, 100_000)
    assert reliability_bins(c, rng.random(c.size) < c).ece < 0.01
    assert reliability_bins(c, rng.random(c.size) < c**2).ece == pytest.approx(np.mean(c - c**2), abs=0.01)


def test_reliability_bins_refuse_mismatched_inputs():
    from xfer.metrics import reliability_bins

    with pytest.raises(ValueError, match="one length"):
        reliability_bins(np.array([0.5, 0.6]), np.array([1]))
    with pytest.raises(ValueError, match="at least 1"):
        reliability_bins(np.array([0.5]), np.array([1]), n_bins=0)
